// Host side of the flash-attention backward: workspace sizing, the (head_dim, dtype) dispatch
// table, and run_flash_bwd, which launches preprocess (D, zeroed dQ accumulator and semaphores),
// the main kernel (flash_bwd_kernel.cuh) and postprocess (dq = scale * accumulator) on a stream.
// Framework-free (raw BwdParams): the torch launcher (csrc/ops/flash_bwd_cuda.cu) and the
// standalone test/benchmark share it.
//
// Workspace (caller-allocated, 16-byte aligned, stream-private):
//   dq_accum: heads * total_q_rows * head_dim floats, total_q_rows = total_q (varlen) or
//             batch * seqlen_q;
//   sems:     batch * heads * ceil(seqlen_q / 64) ints (deterministic mode only; may be null
//             otherwise). seqlen_q is max_seqlen_q in varlen.
// Grid of the main kernel: (ceil(seqlen_k / kBlockN), heads_kv, batch); one CTA per KV tile.
// Requirements (flash_bwd_unsupported_reason): 16-byte-aligned q/k/v/out/dout/dq/dk/dv, row
// and head strides multiples of 8 elements.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include "longctx/flash/flash_params.h"

namespace longctx {
namespace flash {

constexpr int kBwdBlockM = 64;

inline int64_t flash_bwd_total_q_rows(const BwdParams& p, int64_t total_q) {
  return p.fwd.cu_seqlens_q != nullptr ? total_q : int64_t(p.fwd.batch) * p.fwd.seqlen_q;
}
inline int64_t flash_bwd_accum_floats(const BwdParams& p, int64_t total_q) {
  return int64_t(p.fwd.heads) * flash_bwd_total_q_rows(p, total_q) * p.fwd.head_dim;
}
inline int64_t flash_bwd_num_sems(const BwdParams& p) {
  return int64_t(p.fwd.batch) * p.fwd.heads * ((p.fwd.seqlen_q + kBwdBlockM - 1) / kBwdBlockM);
}

inline const char* flash_bwd_unsupported_reason(const BwdParams& p) {
  auto mis = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) != 0; };
  const FwdParams& f = p.fwd;
  if (mis(f.q) || mis(f.k) || mis(f.v) || mis(f.out) || mis(p.dout) || mis(p.dq) || mis(p.dk) ||
      mis(p.dv))
    return "q, k, v, out, dout, dq, dk and dv must be 16-byte aligned";
  const int64_t s[] = {f.q_row_stride,  f.q_head_stride,  f.k_row_stride,   f.k_head_stride,
                       f.v_row_stride,  f.v_head_stride,  f.out_row_stride, f.out_head_stride,
                       p.dout_row_stride, p.dout_head_stride, p.dq_row_stride, p.dq_head_stride,
                       p.dk_row_stride, p.dk_head_stride, p.dv_row_stride,  p.dv_head_stride,
                       f.cu_seqlens_q ? 0 : f.q_batch_stride, f.cu_seqlens_q ? 0 : f.k_batch_stride,
                       f.cu_seqlens_q ? 0 : f.v_batch_stride, f.cu_seqlens_q ? 0 : f.out_batch_stride,
                       f.cu_seqlens_q ? 0 : p.dout_batch_stride, f.cu_seqlens_q ? 0 : p.dq_batch_stride,
                       f.cu_seqlens_q ? 0 : p.dk_batch_stride, f.cu_seqlens_q ? 0 : p.dv_batch_stride};
  for (int64_t x : s)
    if (x % 8 != 0) return "row, head and batch strides must be multiples of 8 elements";
  return nullptr;
}

using FlashBwdFn = cudaError_t (*)(const BwdParams&, int64_t total_q, int64_t total_k,
                                   float* dq_accum, int* sems, cudaStream_t);

inline int flash_bwd_hdim_slot(int head_dim) {
  return head_dim == 64 ? 0 : head_dim == 128 ? 1 : head_dim == 256 ? 2 : -1;
}
inline FlashBwdFn* flash_bwd_table() {
  static FlashBwdFn table[3][2] = {};  // [hdim slot][is_bf16]
  return &table[0][0];
}
inline FlashBwdFn flash_bwd_lookup(int head_dim, bool is_bf16) {
  const int s = flash_bwd_hdim_slot(head_dim);
  return s < 0 ? nullptr : flash_bwd_table()[s * 2 + (is_bf16 ? 1 : 0)];
}
struct FlashBwdRegistration {
  FlashBwdRegistration(int head_dim, bool is_bf16, FlashBwdFn fn) {
    flash_bwd_table()[flash_bwd_hdim_slot(head_dim) * 2 + (is_bf16 ? 1 : 0)] = fn;
  }
};

}  // namespace flash
}  // namespace longctx

#if defined(__CUDACC__)
#include "longctx/flash/flash_bwd_kernel.cuh"
#include "longctx/flash/flash_bwd_postprocess.cuh"
#include "longctx/flash/flash_bwd_preprocess.cuh"

namespace longctx {
namespace flash {

template <typename Element, int kHeadDim, int kBlockN = 64, bool kLdsm = true>
cudaError_t run_flash_bwd_sm90(const BwdParams& p, int64_t total_q, int64_t /*total_k*/,
                               float* dq_accum, int* sems, cudaStream_t stream) {
  using Traits = FlashBwdTraits<Element, kHeadDim, kBlockN, kLdsm>;
  const FwdParams& f = p.fwd;
  if (f.head_dim != kHeadDim) return cudaErrorInvalidValue;
  if (flash_bwd_unsupported_reason(p) != nullptr) return cudaErrorInvalidValue;
  if (p.deterministic && sems == nullptr) return cudaErrorInvalidValue;
  if (f.batch <= 0 || f.heads <= 0 || f.seqlen_q <= 0) return cudaSuccess;
  const int64_t rows = flash_bwd_total_q_rows(p, total_q);
  const int64_t accum = flash_bwd_accum_floats(p, total_q);
  const int64_t nsems = p.deterministic ? flash_bwd_num_sems(p) : 0;
  const int num_m_max = (f.seqlen_q + kBwdBlockM - 1) / kBwdBlockM;

  int dev = 0, sms = 132;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  flash_bwd_preprocess_kernel<Element, kHeadDim><<<sms * 8, 256, 0, stream>>>(
      p, rows, dq_accum, accum, p.deterministic ? sems : nullptr, nsems);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;

  if (f.seqlen_k > 0) {
    auto kernel = flash_bwd_kernel<Traits>;
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             Traits::kSmemBytes);
    if (e != cudaSuccess) return e;
    const dim3 grid((f.seqlen_k + kBlockN - 1) / kBlockN, f.heads_kv, f.batch);
    kernel<<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(p, rows, dq_accum, sems,
                                                                   num_m_max);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  flash_bwd_postprocess_kernel<Element, kHeadDim><<<sms * 8, 256, 0, stream>>>(p, rows, dq_accum);
  return cudaGetLastError();
}

}  // namespace flash
}  // namespace longctx
#endif
