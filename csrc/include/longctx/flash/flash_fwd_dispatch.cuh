// Host interface of the Hopper forward kernel: the launch function type, the table of compiled
// (head_dim, dtype) instantiations (registry.h) and the layout requirement of its TMA loads.
// Framework-free: the torch launcher (csrc/flash/flash_fwd_cuda.cu) and the standalone test and
// benchmark use it alike.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include "longctx/flash/flash_params.h"
#include "longctx/registry.h"

namespace longctx {
namespace flash {

// total_q / total_k: rows of the packed q / k tensors in varlen mode (ignored when batched).
// tile_counter: 4 bytes of device scratch for the dynamic tile scheduler, private to this
// launch (stream-ordered; it is zeroed on the stream), or nullptr for the static schedule.
using FlashFwdFn = cudaError_t (*)(const FwdParams&, int64_t total_q, int64_t total_k,
                                   int* tile_counter, cudaStream_t);

struct FlashFwdTag {};
// Keyed by (head_dim, dtype); filled by the generated flash_fwd_hdim<D>_<dtype>.cu files.
using FlashFwdTable = KernelTable<FlashFwdTag, FlashFwdFn>;

// The compiled head dim (64, 128 or 256) whose kernel runs head_dim d (a multiple of 8 up to 256):
// d itself, or the next one up. A kernel with kHeadDim > d loads Q, K and V through TMA
// descriptors d columns wide, so the columns past d land in shared memory as zeros (S exact,
// O's extra columns 0), and the epilogue stores d columns: no extra instantiation, at
// kHeadDim / d times the matrix work (head_dim 96: 1.33x).
inline int fwd_kernel_head_dim(int d) { return d <= 64 ? 64 : d <= 128 ? 128 : 256; }

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

}  // namespace flash
}  // namespace longctx
