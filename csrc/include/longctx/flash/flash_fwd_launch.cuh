// Host side of the Hopper forward kernel: builds the TMA descriptors for q/k/v, sizes the grid
// and shared memory, launches on a stream. Framework-free (raw FwdParams), so the torch
// launcher (csrc/ops/flash_fwd_cuda.cu) and the standalone tests/benchmarks share it.
//
// The TMA sees q as (rows, D, heads, batch) with element strides (row, 1, head, batch); varlen
// passes the packed tensor as batch 1 with rows = total tokens (total_q / total_k, which
// FwdParams does not carry: the caller passes them). TMA needs a 16-byte-aligned base and
// 16-byte-multiple strides: flash_fwd_tma_unsupported_reason() says why a layout cannot be
// used (the launcher turns that into a user-facing error).
// Grid: (ceil(seqlen_q / 128), heads, batch); seqlen_q is max_seqlen_q in varlen.
#pragma once
#include <cuda_runtime.h>
#include <cute/tensor.hpp>
#include "longctx/flash/flash_fwd_dispatch.cuh"
#include "longctx/flash/flash_fwd_kernel.cuh"
#include "longctx/flash/flash_fwd_traits.cuh"
#include "longctx/flash/flash_params.h"

namespace longctx {
namespace flash {

// total_q / total_k: rows of the packed tensors in varlen mode (ignored when batched).
template <typename Element, int kHeadDim>
cudaError_t run_flash_fwd_sm90(const FwdParams& p, int64_t total_q, int64_t total_k,
                               cudaStream_t stream) {
  using namespace cute;
  using Traits = FlashFwdTraits<Element, kHeadDim>;
  if (p.head_dim != kHeadDim) return cudaErrorInvalidValue;
  if (flash_fwd_tma_unsupported_reason(p, sizeof(Element)) != nullptr) return cudaErrorInvalidValue;
  const bool varlen = p.cu_seqlens_q != nullptr;
  if (p.batch <= 0 || p.seqlen_q <= 0 || p.heads <= 0) return cudaSuccess;  // nothing to do

  FwdKernelParams<Traits> kp;
  kp.p = p;
  const int rows_q = int(varlen ? total_q : p.seqlen_q);
  const int rows_k = int(varlen ? total_k : p.seqlen_k);
  const int bt = varlen ? 1 : p.batch;
  kp.shape_q = make_shape(rows_q, kHeadDim, p.heads, bt);
  kp.shape_k = make_shape(rows_k > 0 ? rows_k : 1, kHeadDim, p.heads_kv, bt);
  // A batch stride must be valid for the TMA even where the batch extent is 1.
  auto bstride = [&](int64_t s, int64_t row_s, int rows) {
    return varlen || p.batch == 1 ? int64_t(row_s) * (rows > 0 ? rows : 1) : s;
  };
  auto mQ = make_tensor(make_gmem_ptr(static_cast<const Element*>(p.q)), kp.shape_q,
                        make_stride(p.q_row_stride, _1{}, p.q_head_stride,
                                    bstride(p.q_batch_stride, p.q_row_stride, rows_q)));
  auto mK = make_tensor(make_gmem_ptr(static_cast<const Element*>(p.k)), kp.shape_k,
                        make_stride(p.k_row_stride, _1{}, p.k_head_stride,
                                    bstride(p.k_batch_stride, p.k_row_stride, rows_k)));
  auto mV = make_tensor(make_gmem_ptr(static_cast<const Element*>(p.v)), kp.shape_k,
                        make_stride(p.v_row_stride, _1{}, p.v_head_stride,
                                    bstride(p.v_batch_stride, p.v_row_stride, rows_k)));
  kp.tma_q = make_tma_copy(SM90_TMA_LOAD{}, mQ, typename Traits::SmemLayoutQ{},
                           select<0, 2>(typename Traits::TileShape_MNK{}), _1{});
  kp.tma_k = make_tma_copy(SM90_TMA_LOAD{}, mK, take<0, 2>(typename Traits::SmemLayoutK{}),
                           select<1, 2>(typename Traits::TileShape_MNK{}), _1{});
  kp.tma_v = make_tma_copy(SM90_TMA_LOAD{}, mV, take<0, 2>(typename Traits::SmemLayoutV{}),
                           select<1, 2>(typename Traits::TileShape_MNK{}), _1{});

  auto kernel = flash_fwd_sm90_kernel<Traits>;
  constexpr int smem = Traits::kSmemBytes;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const int m_blocks = (p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  dim3 grid(m_blocks, p.heads, p.batch);
  kernel<<<grid, Traits::kNumThreads, smem, stream>>>(kp);
  return cudaGetLastError();
}

}  // namespace flash
}  // namespace longctx
