// Host side of the Hopper forward kernel: builds the TMA descriptors for q/k/v, sizes the grid
// and shared memory, launches on a stream. Framework-free (raw FwdParams), so the torch
// launcher (csrc/flash/flash_fwd_cuda.cu) and the standalone tests/benchmarks share it.
//
// The TMA sees q as (rows, D, heads, batch) with element strides (row, 1, head, batch); varlen
// passes the packed tensor as batch 1 with rows = total tokens (total_q / total_k, which
// FwdParams does not carry: the caller passes them). TMA needs a 16-byte-aligned base and
// 16-byte-multiple strides: flash_fwd_tma_unsupported_reason() says why a layout cannot be
// used (the launcher turns that into a user-facing error).
// Grid: persistent, min(#tiles, #SMs) CTAs over ceil(seqlen_q / kBlockM) x heads x batch tiles
// (seqlen_q is max_seqlen_q in varlen).
#pragma once
#include <cuda_runtime.h>
#include <cute/tensor.hpp>
#include "longctx/flash/flash_fwd_dispatch.cuh"
#include "longctx/flash/flash_fwd_kernel.cuh"
#include "longctx/flash/flash_fwd_traits.cuh"
#include "longctx/flash/tile_scheduler.cuh"
#include "longctx/flash/flash_params.h"
#include "longctx/flash/tma_view.cuh"

namespace longctx {
namespace flash {

// The kernel of Traits on validated params (run_flash_fwd_sm90 below).
template <typename Traits>
cudaError_t launch_flash_fwd_sm90(const FwdParams& p, int64_t total_q, int64_t total_k,
                                  int* tile_counter, cudaStream_t stream) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kHeadDim = Traits::kHeadDim;
  const bool varlen = p.cu_seqlens_q != nullptr;
  FwdKernelParams<Traits> kp;
  kp.p = p;
  const int rows_q = int(varlen ? total_q : p.seqlen_q);
  const int rows_k = int(varlen ? total_k : p.seqlen_k);
  const int bt = varlen ? 1 : p.batch;
  kp.shape_q = make_shape(rows_q, p.head_dim, p.heads, bt);
  kp.shape_k = make_shape(rows_k > 0 ? rows_k : 1, p.head_dim, p.heads_kv, bt);
  const bool one_batch = varlen || p.batch == 1;
  auto mQ = tma_view<Element>(p.q, kp.shape_q, p.q_row_stride, p.q_head_stride, p.q_batch_stride,
                              one_batch, rows_q);
  auto mK = tma_view<Element>(p.k, kp.shape_k, p.k_row_stride, p.k_head_stride, p.k_batch_stride,
                              one_batch, rows_k);
  auto mV = tma_view<Element>(p.v, kp.shape_k, p.v_row_stride, p.v_head_stride, p.v_batch_stride,
                              one_batch, rows_k);
  kp.tma_q = make_tma_copy(SM90_TMA_LOAD{}, mQ, typename Traits::SmemLayoutQ{},
                           select<0, 2>(typename Traits::TileShape_MNK{}), _1{});
  kp.tma_k = make_tma_copy(SM90_TMA_LOAD{}, mK, take<0, 2>(typename Traits::SmemLayoutK{}),
                           select<1, 2>(typename Traits::TileShape_MNK{}), _1{});
  kp.tma_v = make_tma_copy(SM90_TMA_LOAD{}, mV, take<0, 2>(typename Traits::SmemLayoutV{}),
                           select<1, 2>(typename Traits::TileShape_MNK{}), _1{});
  // O by TMA store: batched launches whose out batch stride the TMA can take (the other
  // strides and the base are checked above); varlen and hdim 256 store from registers.
  kp.tma_store_o = Traits::kTmaStoreO && !varlen &&
                   (one_batch || (p.out_batch_stride * int64_t(sizeof(Element))) % 16 == 0);
  if (kp.tma_store_o) {
    auto mO = make_tensor(make_gmem_ptr(static_cast<Element*>(p.out)), kp.shape_q,
                          make_stride(p.out_row_stride, _1{}, p.out_head_stride,
                                      one_batch ? p.out_row_stride * rows_q : p.out_batch_stride));
    kp.tma_o = make_tma_copy(SM90_TMA_STORE{}, mO, typename Traits::SmemLayoutOWg{},
                             make_shape(_64{}, Int<kHeadDim>{}), _1{});
  }

  auto kernel = flash_fwd_sm90_kernel<Traits>;
  constexpr int smem = Traits::kSmemBytes;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  // Tile order: sections of (head, batch) pairs whose K/V (shared by a GQA group) fit in
  // ~32 MB of L2, longest query tiles first inside a section (tile_scheduler.cuh).
  const int num_m = (p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  if (int64_t(num_m) * p.heads * p.batch >= (int64_t(1) << 31)) return cudaErrorInvalidValue;
  const int64_t kv_bytes =
      int64_t(p.seqlen_k > 0 ? p.seqlen_k : 1) * kHeadDim * 2 * sizeof(Element);
  kp.sched = FwdTileScheduler::make(num_m, p.heads, p.batch, kv_bytes,
                                    p.heads / (p.heads_kv > 0 ? p.heads_kv : 1));
  const FwdTileScheduler& sc = kp.sched;
  // Persistent grid: one CTA per SM (the kernel's smem allows one); the dynamic schedule when a
  // tile counter is given, else the static one (same tile order).
  int dev = 0, sms = 132;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int ctas = sc.total < sms ? sc.total : sms;
  dim3 grid(ctas > 0 ? ctas : 1);
  kp.tile_counter = tile_counter;
  if (kp.tile_counter != nullptr) {
    err = cudaMemsetAsync(kp.tile_counter, 0, sizeof(int), stream);
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, Traits::kNumThreads, smem, stream>>>(kp);
  return cudaGetLastError();
}

// hdim 64 runs FA3's 192-row tiles (three consumer warpgroups) when the launch's query
// sequences reach kFwdTallTileMinSeqlenQ rows (seqlen_q, the longest one in varlen), and
// 128-row tiles below: a 192-row tile loses where a head's last tile is mostly empty (1,024
// rows are 5.3 tiles) and under a causal mask on short sequences (docs/kernels/flash_fwd.md).
constexpr int kFwdTallTileMinSeqlenQ = 4096;
inline bool fwd_tall_tiles(int seqlen_q) { return seqlen_q >= kFwdTallTileMinSeqlenQ; }

// total_q / total_k: rows of the packed tensors in varlen mode (ignored when batched).
// tile_counter: >= 4 bytes of device scratch for the dynamic tile scheduler, used by no other
// launch in flight (it is zeroed here, on the stream); nullptr selects the static schedule.
template <typename Element, int kHeadDim>
cudaError_t run_flash_fwd_sm90(const FwdParams& p, int64_t total_q, int64_t total_k,
                               int* tile_counter, cudaStream_t stream) {
  // head_dim <= kHeadDim: the TMA views are head_dim wide, so the columns past it load as zeros
  // (fwd_kernel_head_dim); a multiple of 8 keeps the rows' strides 16-byte multiples.
  if (p.head_dim > kHeadDim || p.head_dim % 8 != 0 || p.head_dim <= 0)
    return cudaErrorInvalidValue;
  if (flash_fwd_tma_unsupported_reason(p, sizeof(Element)) != nullptr) return cudaErrorInvalidValue;
  if (p.batch <= 0 || p.seqlen_q <= 0 || p.heads <= 0) return cudaSuccess;  // nothing to do
  if constexpr (kHeadDim == 64) {
    if (fwd_tall_tiles(p.seqlen_q))
      return launch_flash_fwd_sm90<FlashFwdTraits<Element, 64, 192>>(p, total_q, total_k,
                                                                     tile_counter, stream);
  }
  return launch_flash_fwd_sm90<FlashFwdTraits<Element, kHeadDim>>(p, total_q, total_k,
                                                                  tile_counter, stream);
}

}  // namespace flash
}  // namespace longctx
