// Host side of the flash-attention backward: workspace sizing, the (head_dim, dtype) dispatch
// table, and run_flash_bwd, which launches preprocess (D, zeroed dQ accumulator and semaphores),
// the main kernel (flash_bwd_kernel.cuh) and postprocess (dq = scale * accumulator) on a stream.
// Framework-free (raw BwdParams): the torch launcher (csrc/ops/flash_bwd_cuda.cu) and the
// standalone test/benchmark share it.
//
// Two main kernels: run_flash_bwd_sm90 (first version, mma.sync, flash_bwd_kernel.cuh) and
// run_flash_bwd_sm90_wgmma (TMA + wgmma, flash_bwd_sm90.cuh; hdim 64 and 128).
// Workspace (caller-allocated, 16-byte aligned, stream-private):
//   dq_accum: heads * total_q_rows * head_dim floats, total_q_rows = total_q (varlen) or
//             batch * seqlen_q, followed by the row-padded lse2 and D buffers of the wgmma
//             kernel (2 * heads * bwd_pad_head_stride floats; flash_bwd_accum_floats counts all);
//   sems:     batch * heads * ceil(seqlen_q / 64) ints (deterministic mode only; may be null
//             otherwise). seqlen_q is max_seqlen_q in varlen.
// Grid of the main kernel: (ceil(seqlen_k / kBlockN), heads_kv, batch); one CTA per KV tile.
// Requirements (flash_bwd_unsupported_reason): 16-byte-aligned q/k/v/out/dout/dq/dk/dv, row
// and head strides multiples of 8 elements.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include "longctx/flash/flash_params.h"
#include "longctx/flash/flash_bwd_preprocess.cuh"

namespace longctx {
namespace flash {

constexpr int kBwdBlockM = 64;

inline int64_t flash_bwd_total_q_rows(const BwdParams& p, int64_t total_q) {
  return p.fwd.cu_seqlens_q != nullptr ? total_q : int64_t(p.fwd.batch) * p.fwd.seqlen_q;
}
inline int64_t flash_bwd_dq_floats(const BwdParams& p, int64_t total_q) {
  return int64_t(p.fwd.heads) * flash_bwd_total_q_rows(p, total_q) * p.fwd.head_dim;
}
inline int64_t flash_bwd_pad_stride(const BwdParams& p, int64_t total_q) {
  return bwd_pad_head_stride(p.fwd.cu_seqlens_q != nullptr, p.fwd.batch, total_q, p.fwd.seqlen_q);
}
// Whole workspace: dQ accumulator + padded lse2 and D.
inline int64_t flash_bwd_accum_floats(const BwdParams& p, int64_t total_q) {
  return flash_bwd_dq_floats(p, total_q) + 2 * int64_t(p.fwd.heads) * flash_bwd_pad_stride(p, total_q);
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
#include "longctx/flash/flash_bwd_sm90.cuh"

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
  const int64_t accum = flash_bwd_dq_floats(p, total_q);
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


// The TMA + wgmma main kernel (flash_bwd_sm90.cuh) between the same preprocess (which also
// writes the padded lse2 / D) and postprocess.
template <typename Element, int kHeadDim, bool kDqWarp>
cudaError_t run_flash_bwd_sm90_wgmma_impl(const BwdParams& p, int64_t total_q, int64_t total_k,
                                          float* dq_accum, int* sems, cudaStream_t stream) {
  using namespace cute;
  using Traits = FlashBwdSm90Traits<Element, kHeadDim, kDqWarp>;
  const FwdParams& f = p.fwd;
  if (f.head_dim != kHeadDim) return cudaErrorInvalidValue;
  if (flash_bwd_unsupported_reason(p) != nullptr) return cudaErrorInvalidValue;
  if (p.deterministic && sems == nullptr) return cudaErrorInvalidValue;
  if (f.batch <= 0 || f.heads <= 0 || f.seqlen_q <= 0) return cudaSuccess;
  const bool varlen = f.cu_seqlens_q != nullptr;
  const int64_t rows = flash_bwd_total_q_rows(p, total_q);
  const int64_t dq_floats = flash_bwd_dq_floats(p, total_q);
  const int64_t pad_stride = flash_bwd_pad_stride(p, total_q);
  const int64_t nsems = p.deterministic ? flash_bwd_num_sems(p) : 0;
  BwdPad pad;
  pad.lse2 = dq_accum + dq_floats;
  pad.d = pad.lse2 + int64_t(f.heads) * pad_stride;
  pad.head_stride = pad_stride;

  int dev = 0, sms = 132;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  flash_bwd_preprocess_kernel<Element, kHeadDim><<<sms * 8, 256, 0, stream>>>(
      p, rows, dq_accum, dq_floats, p.deterministic ? sems : nullptr, nsems, pad);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;

  if (f.seqlen_k > 0) {
    BwdKernelParams<Traits> kp;
    kp.p = p;
    const int rows_q = int(varlen ? total_q : f.seqlen_q);
    const int rows_k = int(varlen ? total_k : f.seqlen_k);
    const int bt = varlen ? 1 : f.batch;
    kp.shape_q = make_shape(rows_q > 0 ? rows_q : 1, kHeadDim, f.heads, bt);
    kp.shape_k = make_shape(rows_k > 0 ? rows_k : 1, kHeadDim, f.heads_kv, bt);
    auto bstride = [&](int64_t s, int64_t row_s, int rws) {
      return varlen || f.batch == 1 ? int64_t(row_s) * (rws > 0 ? rws : 1) : s;
    };
    auto mQ = make_tensor(make_gmem_ptr(static_cast<const Element*>(f.q)), kp.shape_q,
                          make_stride(f.q_row_stride, _1{}, f.q_head_stride,
                                      bstride(f.q_batch_stride, f.q_row_stride, rows_q)));
    auto mdO = make_tensor(make_gmem_ptr(static_cast<const Element*>(p.dout)), kp.shape_q,
                           make_stride(p.dout_row_stride, _1{}, p.dout_head_stride,
                                       bstride(p.dout_batch_stride, p.dout_row_stride, rows_q)));
    auto mK = make_tensor(make_gmem_ptr(static_cast<const Element*>(f.k)), kp.shape_k,
                          make_stride(f.k_row_stride, _1{}, f.k_head_stride,
                                      bstride(f.k_batch_stride, f.k_row_stride, rows_k)));
    auto mV = make_tensor(make_gmem_ptr(static_cast<const Element*>(f.v)), kp.shape_k,
                          make_stride(f.v_row_stride, _1{}, f.v_head_stride,
                                      bstride(f.v_batch_stride, f.v_row_stride, rows_k)));
    auto tile_q = Shape<Int<Traits::kBlockM>, Int<kHeadDim>>{};
    auto tile_k = Shape<Int<Traits::kBlockN>, Int<kHeadDim>>{};
    kp.tma_q = make_tma_copy(SM90_TMA_LOAD{}, mQ, take<0, 2>(typename Traits::SmemLayoutQ{}), tile_q, _1{});
    kp.tma_do = make_tma_copy(SM90_TMA_LOAD{}, mdO, take<0, 2>(typename Traits::SmemLayoutQ{}), tile_q, _1{});
    kp.tma_k = make_tma_copy(SM90_TMA_LOAD{}, mK, typename Traits::SmemLayoutK{}, tile_k, _1{});
    kp.tma_v = make_tma_copy(SM90_TMA_LOAD{}, mV, typename Traits::SmemLayoutK{}, tile_k, _1{});
    kp.dq_accum = dq_accum;
    kp.lse2 = pad.lse2;
    kp.dpad = pad.d;
    kp.pad_head_stride = pad_stride;
    kp.total_q_rows = rows;
    kp.sems = sems;
    kp.num_m_max = (f.seqlen_q + kBwdBlockM - 1) / kBwdBlockM;

    auto kernel = flash_bwd_sm90_kernel<Traits>;
    constexpr int smem = Traits::kSmemBytes;
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    const dim3 grid((f.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN, f.heads_kv, f.batch);
    kernel<<<grid, Traits::kNumThreads, smem, stream>>>(kp);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  flash_bwd_postprocess_kernel<Element, kHeadDim><<<sms * 8, 256, 0, stream>>>(p, rows, dq_accum);
  return cudaGetLastError();
}

// Builds with LONGCTX_BWD_AB_VARIANTS defined (the standalone benchmark, run_flash_bwd.sh) also
// hold the variant without the dQ writer warp, selected at run time by
// LONGCTX_FLASH_BWD_DQ=barrier (A/B timing); the extension compiles only the default.
template <typename Element, int kHeadDim>
cudaError_t run_flash_bwd_sm90_wgmma(const BwdParams& p, int64_t total_q, int64_t total_k,
                                     float* dq_accum, int* sems, cudaStream_t stream) {
#ifdef LONGCTX_BWD_AB_VARIANTS
  const char* mode = std::getenv("LONGCTX_FLASH_BWD_DQ");
  if (mode != nullptr && std::strcmp(mode, "barrier") == 0)
    return run_flash_bwd_sm90_wgmma_impl<Element, kHeadDim, false>(p, total_q, total_k, dq_accum,
                                                                   sems, stream);
#endif
  return run_flash_bwd_sm90_wgmma_impl<Element, kHeadDim, true>(p, total_q, total_k, dq_accum,
                                                                sems, stream);
}

}  // namespace flash
}  // namespace longctx
#endif
