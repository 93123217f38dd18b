// Dispatch table of the compiled forward instantiations, keyed by (head_dim, dtype).
//
// Each instantiation file csrc/ops/flash_fwd_hdim<D>_<dtype>_sm90.cu registers its
// run_flash_fwd_sm90<Element, D> at static-initialization time; a build restricted by
// LONGCTX_HEADDIMS / LONGCTX_DTYPES simply leaves slots empty, still links, and the launcher
// reports the missing (head_dim, dtype) instead of failing to link. The table lives in a
// function-local static of an inline function, so registration order across translation units
// does not matter. Framework-free: the standalone tests link the same instantiation files.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include "longctx/flash/flash_params.h"

namespace longctx {
namespace flash {

// total_q / total_k: rows of the packed q / k tensors in varlen mode (ignored when batched).
// tile_counter: 4 bytes of device scratch for the dynamic tile scheduler, private to this
// launch (stream-ordered; it is zeroed on the stream), or nullptr for the static schedule.
using FlashFwdFn = cudaError_t (*)(const FwdParams&, int64_t total_q, int64_t total_k,
                                   int* tile_counter, cudaStream_t);

inline int flash_fwd_hdim_slot(int head_dim) {
  return head_dim == 64 ? 0 : head_dim == 128 ? 1 : head_dim == 256 ? 2 : -1;
}

inline FlashFwdFn* flash_fwd_table() {
  static FlashFwdFn table[3][2] = {};  // [hdim slot][is_bf16]
  return &table[0][0];
}

// nullptr when (head_dim, dtype) is not compiled into this binary.
inline FlashFwdFn flash_fwd_lookup(int head_dim, bool is_bf16) {
  const int s = flash_fwd_hdim_slot(head_dim);
  return s < 0 ? nullptr : flash_fwd_table()[s * 2 + (is_bf16 ? 1 : 0)];
}

// The TMA needs 16-byte-aligned base pointers and strides that are multiples of 16 bytes;
// returns why a layout cannot be used, or nullptr.
inline const char* flash_fwd_tma_unsupported_reason(const FwdParams& p, int elem_bytes) {
  auto misaligned = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) != 0; };
  if (misaligned(p.q) || misaligned(p.k) || misaligned(p.v) || misaligned(p.out))
    return "q, k, v and out must be 16-byte aligned";
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t strides[] = {p.q_row_stride, p.q_head_stride, varlen ? 8 : p.q_batch_stride,
                             p.k_row_stride, p.k_head_stride, varlen ? 8 : p.k_batch_stride,
                             p.v_row_stride, p.v_head_stride, varlen ? 8 : p.v_batch_stride,
                             p.out_row_stride, p.out_head_stride};
  for (int64_t s : strides)
    if ((s * elem_bytes) % 16 != 0) return "q, k, v and out strides must be multiples of 16 bytes";
  return nullptr;
}

struct FlashFwdRegistration {
  FlashFwdRegistration(int head_dim, bool is_bf16, FlashFwdFn fn) {
    flash_fwd_table()[flash_fwd_hdim_slot(head_dim) * 2 + (is_bf16 ? 1 : 0)] = fn;
  }
};

}  // namespace flash
}  // namespace longctx
