// Host side of the flash-attention backward: run_flash_bwd_sm90_wgmma launches preprocess (D,
// padded lse2/D, zeroed dQ accumulator and semaphores), the TMA + wgmma main kernel
// (flash_bwd_sm90.cuh for kernel widths 64 and 128, flash_bwd_sm90_hdim256.cuh for 256; other
// head dims run the next width up, flash_bwd_dispatch.cuh) and the postprocess (dq = scale *
// accumulator; row-major accumulator at 64/128, fragment order at 256) on a stream.
// Framework-free (raw BwdParams); workspace and requirements: flash_bwd_dispatch.cuh. Grid of
// the main kernels: ceil(seqlen_k / kBlockN) x heads_kv x batch CTAs, one per KV tile
// (kBlockN = 128 at hdim 64/128, 80 at 256): at hdim 128 a 3-D grid (blockIdx = (KV tile,
// kv head, batch); one launch per 65535 x 65535 block of (kv head, batch)), at 64 and 256 one
// dimension in BwdTileOrder.
#pragma once
#include <cuda_runtime.h>
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include "longctx/flash/flash_bwd_dispatch.cuh"
#include "longctx/flash/flash_bwd_postprocess.cuh"
#include "longctx/flash/flash_bwd_preprocess.cuh"
#include "longctx/flash/flash_bwd_sm90.cuh"
#include "longctx/flash/flash_bwd_sm90_hdim256.cuh"
#include "longctx/flash/tma_view.cuh"

namespace longctx {
namespace flash {

template <typename Element, int kHeadDim>
struct BwdSm90TraitsFor {  // hdim 64: FA3's 128 x 128 tiles (128-row query tiles in halves)
  using type = FlashBwdSm90Traits<Element, kHeadDim>;
};
template <typename Element>
struct BwdSm90TraitsFor<Element, 256> {
  using type = FlashBwdSm90Hdim256Traits<Element>;
};

// The main kernel of Traits over the workspace of kernel width kHeadDim (the TMA descriptors, the
// instantiation for softcap and the ready-barrier hop, the CTA order).
template <typename Traits, int kHeadDim>
cudaError_t launch_flash_bwd_main(const BwdParams& p, int64_t total_q, int64_t total_k,
                                  float* dq_accum, int* sems, const BwdPad& pad,
                                  cudaStream_t stream) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr bool kFragDq = kHeadDim == 256;  // dQ accumulator in fragment order
  static_assert(bwd_layout_block_m(kHeadDim) % Traits::kBlockM == 0, "the workspace's spacing");
  const FwdParams& f = p.fwd;
  const bool varlen = f.cu_seqlens_q != nullptr;
  const int64_t dq_rows = flash_bwd_dq_rows(p, total_q);  // per head, 64-row query tiles
  BwdKernelParams<Traits> kp;
  kp.p = p;
  const int rows_q = int(varlen ? total_q : f.seqlen_q);
  const int rows_k = int(varlen ? total_k : f.seqlen_k);
  const int bt = varlen ? 1 : f.batch;
  kp.shape_q = make_shape(rows_q > 0 ? rows_q : 1, f.head_dim, f.heads, bt);
  kp.shape_k = make_shape(rows_k > 0 ? rows_k : 1, f.head_dim, f.heads_kv, bt);
  const bool one_batch = varlen || f.batch == 1;
  auto mQ = tma_view<Element>(f.q, kp.shape_q, f.q_row_stride, f.q_head_stride,
                              f.q_batch_stride, one_batch, rows_q);
  auto mdO = tma_view<Element>(p.dout, kp.shape_q, p.dout_row_stride, p.dout_head_stride,
                               p.dout_batch_stride, one_batch, rows_q);
  auto mK = tma_view<Element>(f.k, kp.shape_k, f.k_row_stride, f.k_head_stride,
                              f.k_batch_stride, one_batch, rows_k);
  auto mV = tma_view<Element>(f.v, kp.shape_k, f.v_row_stride, f.v_head_stride,
                              f.v_batch_stride, one_batch, rows_k);
  auto tile_q = Shape<Int<Traits::kBlockM>, Int<kHeadDim>>{};
  auto tile_k = Shape<Int<Traits::kBlockN>, Int<kHeadDim>>{};
  kp.tma_q = make_tma_copy(SM90_TMA_LOAD{}, mQ, take<0, 2>(typename Traits::SmemLayoutQ{}), tile_q, _1{});
  kp.tma_do = make_tma_copy(SM90_TMA_LOAD{}, mdO, take<0, 2>(typename Traits::SmemLayoutQ{}), tile_q, _1{});
  kp.tma_k = make_tma_copy(SM90_TMA_LOAD{}, mK, typename Traits::SmemLayoutK{}, tile_k, _1{});
  kp.tma_v = make_tma_copy(SM90_TMA_LOAD{}, mV, typename Traits::SmemLayoutK{}, tile_k, _1{});
  kp.dq_accum = dq_accum;
  if constexpr (!kFragDq) {
    // dq_accum as (tile rows, head_dim, heads, 1): the padded query tiles of D floats per row
    // (flash_bwd_dispatch.cuh), whole tiles added; the columns past head_dim are clipped.
    if (dq_rows > INT32_MAX) return cudaErrorInvalidValue;  // TMA coordinates are int32
    kp.shape_dq = make_shape(int(dq_rows), f.head_dim, f.heads, 1);
    auto mdQ = make_tensor(make_gmem_ptr(dq_accum), kp.shape_dq,
                           make_stride(int64_t(kHeadDim), _1{}, dq_rows * kHeadDim,
                                       dq_rows * kHeadDim * f.heads));
    kp.tma_dq = make_tma_copy(SM90_TMA_REDUCE_ADD{}, mdQ, typename Traits::SmemLayoutdQ{},
                              tile_q, _1{});
  }
  kp.lse2 = pad.lse2;
  kp.dpad = pad.d;
  kp.pad_head_stride = pad.head_stride;
  kp.dq_rows = dq_rows;
  kp.sems = sems;
  kp.num_m_max = (f.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  const float c = f.mods.softcap;
  kp.cap_in = c != 0.f ? f.softmax_scale / c : 0.f;
  kp.cap_log2 = c * 1.4426950408889634f;

  // Instantiations of the main kernel, chosen here once per launch: softcap or not, and at
  // hdim 64/128 the ready-barrier hop (kReadyHop: varlen launches, and every launch where
  // batched ones keep it too, Traits::kBatchedDirectWait false).
  auto pick = [](auto softcap, auto hop) {
    constexpr bool kCap = decltype(softcap)::value;
    if constexpr (kFragDq) return flash_bwd_sm90_hdim256_kernel<Traits, kCap>;
    else return flash_bwd_sm90_kernel<Traits, kCap, decltype(hop)::value>;
  };
  auto pick_hop = [&](auto softcap) {
    if constexpr (kFragDq) return pick(softcap, std::true_type{});
    else if constexpr (!Traits::kBatchedDirectWait) return pick(softcap, std::true_type{});
    else return varlen ? pick(softcap, std::true_type{}) : pick(softcap, std::false_type{});
  };
  auto kernel = c != 0.f ? pick_hop(std::true_type{}) : pick_hop(std::false_type{});
  constexpr int smem = Traits::kSmemBytes;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  // CTA order (tile_scheduler.cuh): sections of (kv head, batch) pairs whose query heads' Q
  // and dO fit in ~32 MB of L2, the longest (first) KV tiles first inside a section.
  const int64_t qdo_bytes = int64_t(f.heads / f.heads_kv) * (f.seqlen_q > 0 ? f.seqlen_q : 1) *
                            kHeadDim * 2 * int64_t(sizeof(Element));
  kp.order = BwdTileOrder::make((f.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN, f.heads_kv,
                                f.batch, qdo_bytes);
  const BwdTileOrder& order = kp.order;
  const int64_t ctas = int64_t(order.num_n) * order.num_hb;
  if (ctas >= (int64_t(1) << 31)) return cudaErrorInvalidValue;
  bool grid3d = false;
  if constexpr (!kFragDq) grid3d = Traits::kGrid3d;
  if (!grid3d) {
    kernel<<<dim3(unsigned(ctas)), Traits::kNumThreads, smem, stream>>>(kp);
    return cudaGetLastError();
  }
  // (kv head, batch) in blocks of at most 65535 x 65535 (grid y / z limits); the launches
  // share nothing (deterministic mode orders KV tiles of one (kv head, batch) only).
  constexpr int kMaxYZ = 65535;
  for (int hk0 = 0; hk0 < f.heads_kv; hk0 += kMaxYZ) {
    for (int b0 = 0; b0 < f.batch; b0 += kMaxYZ) {
      kp.hk0 = hk0;
      kp.b0 = b0;
      const dim3 grid(unsigned(order.num_n), unsigned(std::min(kMaxYZ, f.heads_kv - hk0)),
                      unsigned(std::min(kMaxYZ, f.batch - b0)));
      kernel<<<grid, Traits::kNumThreads, smem, stream>>>(kp);
      e = cudaGetLastError();
      if (e != cudaSuccess) return e;
    }
  }
  return cudaSuccess;
}

// Preprocess (which also writes the padded lse2 / D), the TMA + wgmma main kernel of the head
// dim, postprocess. hdim 64 walks FA3's 128 x 128 tiles (BwdSm90TraitsFor), hdim 128 64-row
// query tiles (docs/kernels/flash_bwd.md).
template <typename Element, int kHeadDim>
cudaError_t run_flash_bwd_sm90_wgmma(const BwdParams& p, int64_t total_q, int64_t total_k,
                                     float* dq_accum, int* sems, cudaStream_t stream) {
  using Traits = typename BwdSm90TraitsFor<Element, kHeadDim>::type;
  constexpr bool kFragDq = kHeadDim == 256;  // dQ accumulator in fragment order
  const FwdParams& f = p.fwd;
  // head_dim <= kHeadDim: the TMA views are head_dim wide, so the columns past it load as zeros
  // (flash_bwd_dispatch.cuh); the kernel this head_dim runs is the one it must be launched as.
  if (fwd_kernel_head_dim(f.head_dim) != kHeadDim) return cudaErrorInvalidValue;
  if (flash_bwd_unsupported_reason(p) != nullptr) return cudaErrorInvalidValue;
  if (p.deterministic && sems == nullptr) return cudaErrorInvalidValue;
  if (f.batch <= 0 || f.heads <= 0 || f.seqlen_q <= 0) return cudaSuccess;
  const int64_t rows = flash_bwd_total_q_rows(p, total_q);
  const int64_t dq_rows = flash_bwd_dq_rows(p, total_q);  // per head, 64-row query tiles
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
    e = launch_flash_bwd_main<Traits, kHeadDim>(p, total_q, total_k, dq_accum, sems, pad, stream);
    if (e != cudaSuccess) return e;
  }
  const int64_t tiles = dq_rows / kBwdBlockM;
  if constexpr (kFragDq) {
    const int64_t jobs = int64_t(f.heads) * tiles;
    const int grid = int(jobs < int64_t(sms) * 8 ? jobs : int64_t(sms) * 8);
    if (grid > 0)
      flash_bwd_postprocess_frag_kernel<Traits><<<grid, 256, 0, stream>>>(p, tiles, dq_accum);
  } else {
    flash_bwd_postprocess_kernel<Element, kHeadDim><<<sms * 8, 256, 0, stream>>>(p, tiles,
                                                                                dq_accum);
  }
  return cudaGetLastError();
}

// The backward each head dim runs (every head dim has a wgmma kernel).
template <typename Element, int kHeadDim>
cudaError_t run_flash_bwd(const BwdParams& p, int64_t total_q, int64_t total_k, float* dq_accum,
                          int* sems, cudaStream_t stream) {
  return run_flash_bwd_sm90_wgmma<Element, kHeadDim>(p, total_q, total_k, dq_accum, sems, stream);
}

}  // namespace flash
}  // namespace longctx
