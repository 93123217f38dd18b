// Flash-attention backward, step 2 of 3 (main kernel), Hopper version: TMA + wgmma, warp
// specialized (FA3 structure, own code); the backward of head dims 64 and 128 (256 has its own
// kernel, flash_bwd_sm90_hdim256.cuh, which shares this file's helpers and preprocess and the
// setup helpers of flash_bwd_cta.cuh).
//
// What it computes. One CTA per (KV tile n of kBlockN = 128 keys, kv head hk, batch b). CTA
// order (Traits::kGrid3d): at hdim 128 the grid (n, hk, b) = blockIdx (x, y, z), indices read
// from special registers (decoding a 1-D index cost the consumers 40 / 44 bytes of spills; the
// 3-D grid with the batched launches' direct barrier waits ran 0-7% faster at 16K on an H100);
// at hdim 64, which has no spills, one dimension in tile_scheduler.cuh's BwdTileOrder (longest
// KV tiles first within L2-sized sections of kv heads: the 3-D grid was 2-3% slower there). K
// and V of the tile are TMA-loaded once. The CTA walks the query tiles m of kBlockM rows (64; 128
// at hdim 64, FA3's 128 x 128 tiles: half the steps and semaphore hand-offs per FLOP) in
// bwd_query_tiles(n), last to
// first (tiles outside the mask are never loaded), and for each the
// query heads h of hk's GQA group; per (m, h), with S^T and dP^T computed transposed ("swapAB",
// keys as the M dimension, so P^T and dS^T come out of the accumulators in the register layout
// of a wgmma A operand):
//   S^T  = K Q^T, dP^T = V dO^T              SS wgmma, 128 x kBlockM, K = D (one 64-key half
//                                               per WG)
//   P^T  = exp2(S^T * scale*log2e - lse2[q])   (lse2 = lse*log2e from the preprocess, +inf for
//                                               rows that see no key and pad rows -> P = 0)
//   dS^T = P^T * (dP^T - D[q])                 (D = rowsum(dO * O), preprocess)
// or, with logit softcap c (logit_mods.h; the kernel's kSoftcap, chosen by the launcher):
//   t    = tanh(S^T * scale / c)               (tanh_approx)
//   P^T  = exp2(t * c*log2e - lse2[q]) ;  dS^T = P^T * (dP^T - D[q]) * (1 - t^2)
//   dV  += P^T dO ; dK += dS^T Q               RS wgmma (A from registers), 128 x D,
//                                               K = kBlockM
//   dQ   = dS K                                 SS wgmma, kBlockM x D, K = 128 (dS through
//                                               smem; the two WGs split the rows of 128-row
//                                               tiles, D of 64-row ones), then written to a
//                                               swizzled fp32 smem tile (float2 stores,
//                                               conflict-free per half-warp) and added to
//                                               the global fp32 accumulator (padded 64-row
//                                               tiles) by ONE TMA reduce-add per tile, issued
//                                               by one thread.
// Issue order per iteration (FA3's): S^T, dP^T; [exp, dS]; dV; barrier B1; dQ; dK; then dQ goes
// to smem while dK still runs on the tensor cores. 128-row tiles take S^T and dP^T in two
// 64-query halves, pipelined inside the warpgroup: S^T_0, dP^T_0, S^T_1; [exp_0]; dV_0; [dS_0];
// dP^T_1, dK_0; [exp_1]; dV_1; [dS_1]; B1; dQ; dK_1. The exponentials of one half run
// under the other half's products, and at most three of the four 64 x 64 S^T / dP^T
// accumulators are allocated at once (the whole tile's took 192 of the 240 registers with dK
// and dV, and spilled). dS^T goes to smem by stmatrix (per half with 128-row tiles).
// Finally dK = scale * dK and dV are written in the input dtype (rows < sk). GQA: the group's
// heads are summed in registers (no dK/dV scratch, deterministic for free).
//
// Warp roles: 3 warpgroups (384 threads). WG 0: producer, 24 registers (setmaxnreg); one thread
// TMA-loads K, V once (transaction barrier) and, per (m, h), Q and dO tiles (kBlockM x D) plus
// the kBlockM lse2 and D values (1-D bulk copies from the padded preprocess buffers) into stage
// s of a 2-stage PipelineTmaAsync. WGs 1-2: consumers, 240 registers; WG w owns keys
// [64w, 64w + 64) of the tile for S^T, dP^T, dK and dV, and rows [64w, 64w + 64) (128-row
// tiles) or columns [wD/2, (w+1)D/2) (64-row tiles) of dQ.
// dQ reduce: warp 1 of WG 0 is the dQ writer; sdQ is double-buffered with full/empty
// mbarriers, so the consumers only wait for a buffer the writer has not yet read.
// Per-iteration synchronization of the consumers: named barrier B1 (256 threads) after dS^T
// is in smem (the dQ product reads both halves); dS^T alternates between two buffers, so B1 of
// the next iteration also orders the other warpgroup's dQ reads before the buffer's next write.
// The stage is released after dK (the last reader of Q) completed.
// The per-element mask (causal/window/key >= sk/query >= sq) runs only on tile pairs that
// tile_fully_visible says need it or that cross sk or sq (bounds: mask.h's tile_mask).
//
// Deterministic mode: per-(batch, head, query tile of kBlockM) semaphore (kv_tile_rank): the
// thread issuing the reduce waits until the counter equals this KV tile's rank among the tiles
// that visit the query tile, issues the reduce, waits for its completion, fences and increments.
// Query tiles are walked from the last to the first, with the group's heads inner: every KV
// tile's range ends at the same or a later query tile than its predecessors' (bwd_query_tiles'
// bounds grow with n), so KV tile n reaches each (query tile, head) no earlier (in iterations)
// than tile n - 1 and waits at most about one reduce for it. (Query tiles first to last: tile n
// of a causal mask would start 2n iterations late; heads outer: tile n - 1 reaches head g about
// 2g iterations after tile n, since it has two more query tiles per head.) A CTA waits only for
// lower KV tiles of its (kv head, batch), which both CTA orders dispatch earlier.
//
// smem (hdim 128): K, V 2 x 32 KB, Q, dO 2 stages x 2 x 16 KB, dS^T 2 x 16 KB, dQ (fp32)
// 2 x 32 KB, lse2/D 1 KB: ~225 KB; (hdim 64, 128-row tiles): K, V 2 x 16 KB, Q, dO 2 x 2 x
// 16 KB, dS^T 2 x 32 KB, dQ 2 x 32 KB, lse2/D 2 KB: ~226 KB. One CTA per SM.
// ptxas (hdim 64, 128-row tiles): 20 / 28 bytes of spill stores / loads, none in the loop (96 /
// 116 with the whole tile's S^T and dP^T at once); with softcap 28 / 40, 2 loads in the loop
// (each half's 1 - t^2 kept for its dS^T).
#pragma once

#ifndef CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#endif

#include <cuda_runtime.h>
#include <cstdint>
#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/atom/copy_traits_sm90.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include "longctx/flash/flash_bwd_cta.cuh"
#include "longctx/flash/flash_bwd_dispatch.cuh"  // bwd_layout_block_m, bwd_pad_base, ...
#include "longctx/flash/flash_params.h"
#include "longctx/flash/flash_bwd_preprocess.cuh"
#include "longctx/flash/mainloop_fwd_sm90.cuh"  // wg_gemm
#include "longctx/flash/mask.h"
#include "longctx/flash/softmax.cuh"  // acc_layout_to_A_regs, convert_fragment, fast_exp2
#include "longctx/flash/tile_scheduler.cuh"
#include "longctx/tanh_approx.cuh"

namespace longctx {
namespace flash {

template <typename Element_, int kHeadDim_>
struct FlashBwdSm90Traits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  // sdQ buffers: a dedicated warp (warp 1 of the producer warpgroup) issues the dQ TMA reduces
  // from a double-buffered sdQ (mbarrier hand-off: the consumers never wait for the reduce).
  static constexpr int kDqBufs = 2;
  // Query rows per iteration: hdim 64 walks FA3's 128 x 128 tiles (in two 64-query halves),
  // hdim 128 64-row tiles.
  static constexpr int kBlockM = kHeadDim == 64 ? 128 : 64;
  static constexpr int kBlockN = 128;       // keys per CTA
  static constexpr int kStages = 2;
  static constexpr int kNumMmaThreads = 256;
  static constexpr int kNumThreads = 384;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  static_assert(128 * kProducerRegs + 256 * kConsumerRegs <= 168 * 384, "setmaxnreg pool");
  static_assert(kHeadDim == 64 || kHeadDim == 128, "wgmma backward: hdim 64 or 128");
  // CTA order (header): a 3-D grid at hdim 128, BwdTileOrder over a 1-D grid at hdim 64; and
  // whether batched launches skip the ready-barrier hop (the kernel's kReadyHop): at hdim 128.
  static constexpr bool kGrid3d = kHeadDim == 128;
  static constexpr bool kBatchedDirectWait = kHeadDim == 128;

  // dQ = dS K, kBlockM x D: with 128-row tiles (hdim 64) warpgroup w takes query rows
  // [64w, 64w + 64) and all D columns (N = D, FA3's hdim-64 split); with 64-row tiles it takes
  // columns [wD/2, (w+1)D/2) of all rows. Either way 64 x kDqCols per warpgroup, kDqRegs fp32
  // registers per thread.
  static constexpr bool kDqSplitM = kBlockM == 128;
  static constexpr int kDqCols = kDqSplitM ? kHeadDim : kHeadDim / 2;
  static constexpr int kDqRegs = 64 * kDqCols / 128;

  using TileSdP = cute::Shape<cute::Int<kBlockN>, cute::Int<kBlockM>, cute::Int<kHeadDim>>;
  using TileDKV = cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>, cute::Int<kBlockM>>;
  using TileDQAtom = cute::Shape<cute::Int<64>, cute::Int<kDqCols>, cute::Int<kBlockN>>;

  using TiledMmaSdP = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float, TileSdP>(),
      cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>{}));
  // 128-row tiles compute S^T and dP^T in two 64-query halves (the consumer loop's header).
  using TileSdPHalf = cute::Shape<cute::Int<kBlockN>, cute::_64, cute::Int<kHeadDim>>;
  using TiledMmaSdPHalf = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float, TileSdPHalf>(),
      cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>{}));
  using TiledMmadKV = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float, TileDKV, cute::GMMA::Major::K,
                                 cute::GMMA::Major::MN>(),
      cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>{}));
  using TiledMmadQ = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float, TileDQAtom, cute::GMMA::Major::MN,
                                 cute::GMMA::Major::MN>(),
      cute::Layout<cute::Shape<cute::Int<kDqSplitM ? 2 : 1>, cute::Int<kDqSplitM ? 1 : 2>,
                               cute::_1>>{}));

  // Q, dO, dS, K, V: 128-byte swizzle. The dQ product reads K^T MN-major, split at D/2 between
  // the warpgroups when they split D (hdim 128), so the swizzle atom (64 elements) must not be
  // wider than kDqCols.
  static_assert(kDqCols % 64 == 0, "dQ's K^T split on a 128-byte swizzle atom");
  using AtomQ = cute::GMMA::Layout_K_SW128_Atom<Element>;
  using AtomK = AtomQ;
  using SmemLayoutQ = decltype(cute::tile_to_shape(
      AtomQ{}, cute::make_shape(cute::Int<kBlockM>{}, cute::Int<kHeadDim>{}, cute::Int<kStages>{})));
  using SmemLayoutK = decltype(cute::tile_to_shape(
      AtomK{}, cute::make_shape(cute::Int<kBlockN>{}, cute::Int<kHeadDim>{})));
  // (D, rows, stage) views: B operands of dV (dO^T) and dK (Q^T), MN-major.
  using SmemLayoutQt = decltype(cute::composition(
      SmemLayoutQ{},
      cute::make_ordered_layout(
          cute::make_shape(cute::Int<kHeadDim>{}, cute::Int<kBlockM>{}, cute::Int<kStages>{}),
          cute::Step<cute::_2, cute::_1, cute::_3>{})));
  // (D, keys) view of K: B operand of dQ, MN-major.
  using SmemLayoutKt = decltype(cute::composition(
      SmemLayoutK{}, cute::make_ordered_layout(
                         cute::make_shape(cute::Int<kHeadDim>{}, cute::Int<kBlockN>{}),
                         cute::Step<cute::_2, cute::_1>{})));
  // dS^T as (keys, queries), queries contiguous; (queries, keys) view: A operand of dQ, MN-major.
  // Two dS^T buffers (iteration it uses it % 2): buffer it % 2 is rewritten in iteration it + 2,
  // after both warpgroups passed barrier B1 of it + 1, which each reaches only once its dQ wgmma
  // of iteration it (the last reader) completed. One buffer would leave the other warpgroup's
  // dQ wgmma ordered before the next write by issue order only.
  static constexpr int kDsBufs = 2;
  using SmemLayoutdS = decltype(cute::tile_to_shape(
      AtomQ{}, cute::make_shape(cute::Int<kBlockN>{}, cute::Int<kBlockM>{}, cute::Int<kDsBufs>{})));
  // dS^T accumulator -> smem by stmatrix (4 8x8 matrices, 16 bytes per thread per instruction):
  // the accumulator's rows are dS^T's rows (keys), its column pairs adjacent queries.
  using SmemCopydS = cute::Copy_Atom<cute::SM90_U32x4_STSM_N, Element>;
  using SmemLayoutdSt = decltype(cute::composition(
      SmemLayoutdS{},
      cute::make_ordered_layout(
          cute::make_shape(cute::Int<kBlockM>{}, cute::Int<kBlockN>{}, cute::Int<kDsBufs>{}),
          cute::Step<cute::_2, cute::_1, cute::_3>{})));
  // dQ tile, fp32, 128-byte swizzled (8 x 32-float atoms, a kBlockM x 32 column block
  // contiguous):
  // the source of one TMA reduce-add per iteration. Row-major and unswizzled, each float2 store
  // of a warp's accumulator fragment (8 rows x 4 lanes) hit the same 8 banks in all 8 rows.
  using SmemLayoutdQ = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<float>{},
      cute::make_shape(cute::Int<kBlockM>{}, cute::Int<kHeadDim>{})));

  using MainloopPipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename cutlass::PipelineState<kStages>;

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>> smem_k;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>> smem_v;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>> smem_q;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>> smem_do;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutdS>> smem_ds;
    alignas(1024) cute::array_aligned<float, kBlockM * kHeadDim * kDqBufs> smem_dq;
    alignas(16) cute::array_aligned<float, kBlockM * kStages> smem_lse;
    alignas(16) cute::array_aligned<float, kBlockM * kStages> smem_d;
    alignas(16) cutlass::arch::ClusterTransactionBarrier barrier_kv;
    alignas(16) cutlass::arch::ClusterBarrier kv_ready;  // kReadyHop: K/V landed, tail zeroed (64)
    alignas(16) cutlass::arch::ClusterBarrier qdo_ready[kStages];  // kReadyHop: Q/dO stage ready
    alignas(16) cutlass::arch::ClusterBarrier dq_full[2];   // kNumMmaThreads arrivals
    alignas(16) cutlass::arch::ClusterBarrier dq_empty[2];  // 1 arrival (the dQ warp)
    alignas(16) typename MainloopPipeline::SharedStorage pipeline;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "shared memory");

  static constexpr uint32_t kTmaBytesKV = 2 * kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kTmaBytesStage = 2 * kBlockM * kHeadDim * sizeof(Element) + 2 * kBlockM * 4;

  using ShapeQKV = cute::Shape<int32_t, int32_t, int32_t, int32_t>;  // (rows, D, heads, batch)
  using StrideQKV = cute::Stride<int64_t, cute::_1, int64_t, int64_t>;
  using TMA_Q = decltype(cute::make_tma_copy(
      cute::SM90_TMA_LOAD{},
      cute::make_tensor(cute::make_gmem_ptr(static_cast<Element const*>(nullptr)), ShapeQKV{}, StrideQKV{}),
      cute::take<0, 2>(SmemLayoutQ{}), cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}, cute::_1{}));
  using StrideDq = cute::Stride<int64_t, cute::_1, int64_t, int64_t>;
  using TMA_dQ = decltype(cute::make_tma_copy(
      cute::SM90_TMA_REDUCE_ADD{},
      cute::make_tensor(cute::make_gmem_ptr(static_cast<float*>(nullptr)), ShapeQKV{}, StrideDq{}),
      SmemLayoutdQ{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}, cute::_1{}));
  using TMA_K = decltype(cute::make_tma_copy(
      cute::SM90_TMA_LOAD{},
      cute::make_tensor(cute::make_gmem_ptr(static_cast<Element const*>(nullptr)), ShapeQKV{}, StrideQKV{}),
      SmemLayoutK{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}, cute::_1{}));
};

template <typename Traits>
struct BwdKernelParams {
  BwdParams p;
  typename Traits::ShapeQKV shape_q, shape_k;
  typename Traits::TMA_Q tma_q, tma_do;
  typename Traits::TMA_K tma_k, tma_v;
  // hdim 64/128: reduce-add into dq_accum as (tile rows, D, heads, 1) of extents shape_dq.
  typename Traits::ShapeQKV shape_dq;
  typename Traits::TMA_dQ tma_dq;
  float* dq_accum;         // (heads, dq_rows, D) fp32, zeroed by the preprocess
                           // in padded 64-row tiles (hdim 256: in fragment order)
  const float* lse2;       // padded, see flash_bwd_preprocess.cuh
  const float* dpad;
  int64_t pad_head_stride;
  int64_t dq_rows;         // rows per head of dq_accum (flash_bwd_dq_rows)
  int* sems;               // deterministic mode
  int num_m_max;           // semaphores per (batch, head)
  BwdTileOrder order;      // 1-D grids: which (KV tile, kv head, batch) CTA blockIdx.x is
  int hk0 = 0, b0 = 0;     // 3-D grid: (kv head, batch) of blockIdx (y, z) = (0, 0)
  // Softcap c (p.fwd.mods.softcap; 0: none): cap_in = softmax_scale / c, cap_log2 = c log2(e).
  // Kernel params, so that the consumers read them as constant-bank operands (no registers).
  float cap_in, cap_log2;
};

namespace bwd_sm90 {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void bulk_g2s(void* smem, const void* gmem, uint32_t bytes,
                                         uint64_t* mbar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
      ::"r"(smem_addr(smem)), "l"(gmem), "r"(bytes), "r"(smem_addr(mbar)) : "memory");
}
__device__ __forceinline__ void st_shared_f32x2(uint32_t addr, float a, float b) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(a), "f"(b) : "memory");
}
// dQ registers -> sdQ (Traits::SmemLayoutdQ: kBlockM x 32-float column blocks of kBlockM x 128
// bytes, 128-byte rows whose 16-byte chunks are XORed with row % 8). The fragment (wgmma C,
// 64 x kDqCols per warpgroup w): register i = 4j + 2v + e of consumer thread tidx holds row
// r0(w) + 16 warp + lane / 4 + 8v, column c0(w) + 8j + 2 (lane % 4) + e (r0 = 64w, c0 = 0 when
// the warpgroups split the rows, hdim 64; r0 = 0, c0 = (D/2) w when they split the columns), so
// row % 8 = x = lane / 4 for all of them. A 64-bit shared store is served per half-warp (4 rows
// of x); rows x and x ^ 1 put group j on the same 32-byte bank group, so in store i = 4j + 2v
// the lanes of odd x write the pair of group j ^ 2 instead (registers dq_store_reg(tidx, i),
// i ^ 8): each half-warp then covers the 32 banks once. The pair's byte offset is
// dq_store_offset(base, i) = (base ^ 32 (j % 4)) + 128 kBlockM (j / 4) + 1024 v with
// dq_store_base folding the odd rows' j ^ 2 into base: one XOR and constants per store.
// tests/flash/flash_bwd_dq_tile_test.cu checks all three against the layout and the MMA
// partition.
template <typename Traits>
__host__ __device__ __forceinline__ uint32_t dq_store_base(int tidx) {
  constexpr int kM = Traits::kBlockM, kD = Traits::kHeadDim;
  const int w = tidx / 128, warp = (tidx % 128) / 32, lane = tidx % 32, x = lane >> 2;
  const int group = (x >> 1) ^ (2 * (x & 1));  // 32-byte group of j = 0 (j ^ 2 for odd x)
  const int r0 = Traits::kDqSplitM ? 64 * w : 0;
  const int block0 = Traits::kDqSplitM ? 0 : w * (kD / 2) / 32;
  return uint32_t(block0 * (kM * 128) + (r0 + 16 * warp + x) * 128 +
                  16 * (((lane & 3) >> 1) ^ (x & 1)) + 8 * (lane & 1) + 32 * group);
}
template <typename Traits>
__host__ __device__ __forceinline__ uint32_t dq_store_offset(uint32_t base, int i) {
  const int j = i / 4, v = (i / 2) % 2;
  return (base ^ uint32_t(32 * (j % 4))) + uint32_t(Traits::kBlockM * 128 * (j / 4) + 1024 * v);
}
__host__ __device__ __forceinline__ int dq_store_reg(int tidx, int i) {
  return i ^ (8 * ((tidx >> 2) & 1));
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_read_all() {
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
// Deterministic dQ: publish a completed reduce to the next KV tile waiting on `sem`.
__device__ __forceinline__ void release_increment(int* sem) {
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
  __threadfence();
  atomicAdd(sem, 1);
}

}  // namespace bwd_sm90

// kSoftcap: the launcher's choice from p.fwd.mods.softcap != 0 (uniform over the launch). A
// template parameter rather than a branch in the kernel: with both paths in one kernel the
// consumers spilled 120 bytes instead of 32 (hdim 128), so the path without the cap would have
// paid for it.
// kReadyHop (the launcher's choice, uniform over the launch): producer warps 2-3 wait for each
// load, zero the next packed sequence's rows of K/V and Q/dO (varlen launches only) and arrive on
// ready barriers (kv_ready, qdo_ready) that the consumers wait on. Varlen launches need it.
// Without it (batched launches at hdim 128: a batched TMA zero-fills rows past the tensor) the
// consumers wait on the loads' own barriers (barrier_kv, the pipeline's full barriers) and warps
// 2-3 have nothing to do. Batched launches at hdim 64 hop too: without the hop they ran
// 0.970-0.978x as fast (H100, 16K, two calls).
template <typename Traits, bool kSoftcap, bool kReadyHop>
__global__ void __launch_bounds__(Traits::kNumThreads, 1)
    flash_bwd_sm90_kernel(const __grid_constant__ BwdKernelParams<Traits> kp) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using namespace cute;
  using namespace bwd_sm90;
  using Element = typename Traits::Element;
  using MainloopPipeline = typename Traits::MainloopPipeline;
  constexpr int kM = Traits::kBlockM, kN = Traits::kBlockN, kD = Traits::kHeadDim;

  extern __shared__ __align__(1024) char smem_buf[];
  auto& ss = *reinterpret_cast<typename Traits::SharedStorage*>(smem_buf);
  const BwdParams& bp = kp.p;
  const FwdParams& p = bp.fwd;
  const bool varlen = p.cu_seqlens_q != nullptr;

  int n_block, hk, b;
  if constexpr (Traits::kGrid3d) {
    n_block = blockIdx.x;
    hk = kp.hk0 + int(blockIdx.y);
    b = kp.b0 + int(blockIdx.z);
  } else {
    kp.order.decode(int(blockIdx.x), n_block, hk, b);
  }
  const SeqLen si = sequence(p, b);
  const int n0 = n_block * kN;
  if (n0 >= si.sk) return;
  const int rows_k = min(kN, si.sk - n0);
  const int wl = p.window_left, wr = p.window_right;
  const TileRange range = bwd_query_tiles(n_block, kM, kN, si.sq, si.sk, wl, wr);
  const int n_m = range.end > range.begin ? range.end - range.begin : 0;
  const int group = p.heads / p.heads_kv;
  const int total = n_m * group;

  Element* gdK = reinterpret_cast<Element*>(bp.dk) + int64_t(b) * bp.dk_batch_stride +
                 int64_t(si.k_start + n0) * bp.dk_row_stride + int64_t(hk) * bp.dk_head_stride;
  Element* gdV = reinterpret_cast<Element*>(bp.dv) + int64_t(b) * bp.dv_batch_stride +
                 int64_t(si.k_start + n0) * bp.dv_row_stride + int64_t(hk) * bp.dv_head_stride;
  if (total == 0) {  // no query sees these keys: zero gradients (head_dim columns)
    const int chunks = p.head_dim / 8;
    for (int t = threadIdx.x; t < rows_k * chunks; t += blockDim.x) {
      const int r = t / chunks, c = (t % chunks) * 8;
      *reinterpret_cast<uint4*>(gdK + int64_t(r) * bp.dk_row_stride + c) = make_uint4(0, 0, 0, 0);
      *reinterpret_cast<uint4*>(gdV + int64_t(r) * bp.dv_row_stride + c) = make_uint4(0, 0, 0, 0);
    }
    return;
  }

  const int warp_idx = cutlass::canonical_warp_idx_sync();
  const int warp_group_idx = warp_idx / 4;
  const int lane_predicate = cute::elect_one_sync();
  if (warp_idx == 0 && lane_predicate) {
    ss.barrier_kv.init(1);
    if constexpr (kReadyHop) {
      ss.kv_ready.init(64);
      for (int i = 0; i < Traits::kStages; ++i) ss.qdo_ready[i].init(64);
    }
    for (int i = 0; i < 2; ++i) {
      ss.dq_full[i].init(Traits::kNumMmaThreads);
      ss.dq_empty[i].init(1);
    }
    bwd_prefetch_tma(kp);
    cute::prefetch_tma_descriptor(kp.tma_dq.get_tma_descriptor());
  }
  MainloopPipeline pipe(ss.pipeline,
                        bwd_pipeline_params<MainloopPipeline, Traits::kNumMmaThreads>(
                            warp_group_idx, Traits::kTmaBytesStage),
                        Shape<_1, _1, _1>{});
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  const int64_t pad_base =
      bwd_pad_base(varlen, b, si.q_start, p.seqlen_q, bwd_layout_block_m(kD));

  if (warp_group_idx == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (threadIdx.x == 0) {
      bwd_load_kv<Traits>(kp, ss, si, hk, n_block);
      Tensor mQ = kp.tma_q.get_tma_tensor(kp.shape_q);
      Tensor mdO = kp.tma_do.get_tma_tensor(kp.shape_q);
      Tensor sQ = make_tensor(make_smem_ptr(ss.smem_q.data()), typename Traits::SmemLayoutQ{});
      Tensor sdO = make_tensor(make_smem_ptr(ss.smem_do.data()), typename Traits::SmemLayoutQ{});
      typename Traits::PipelineState st = cutlass::make_producer_start_state<MainloopPipeline>();
      auto tile_q = Shape<Int<kM>, Int<kD>>{};
      for (int it = 0; it < total; ++it) {
        const int h = hk * group + it % group, m = range.end - 1 - it / group;
        Tensor gQ = bwd_rows_tile(mQ, si.q_start, h, si.tma_batch(), tile_q, m);
        Tensor gdO = bwd_rows_tile(mdO, si.q_start, h, si.tma_batch(), tile_q, m);
        auto [tQgQ, tQsQ] = tma_partition(kp.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ),
                                          group_modes<0, 2>(gQ));
        auto [tdOgdO, tdOsdO] = tma_partition(kp.tma_do, _0{}, Layout<_1>{},
                                              group_modes<0, 2>(sdO), group_modes<0, 2>(gdO));
        pipe.producer_acquire(st);
        uint64_t* bar = pipe.producer_get_barrier(st);
        const int s = st.index();
        copy(kp.tma_q.with(*bar, 0), tQgQ, tQsQ(_, s));
        copy(kp.tma_do.with(*bar, 0), tdOgdO, tdOsdO(_, s));
        const int64_t off = int64_t(h) * kp.pad_head_stride + pad_base + int64_t(m) * kM;
        bulk_g2s(ss.smem_lse.data() + s * kM, kp.lse2 + off, kM * 4, bar);
        bulk_g2s(ss.smem_d.data() + s * kM, kp.dpad + off, kM * 4, bar);
        ++st;
      }
    } else if (warp_idx == 1 && lane_predicate) {
      // dQ writer: per iteration, wait for both consumer warpgroups' halves of dQ in sdQ[buf],
      // add the tile to the fp32 accumulator with one TMA reduce-add, free the buffer once read.
      Tensor mdQ = kp.tma_dq.get_tma_tensor(kp.shape_dq);
      const int dq_row0 =
          int(64 * bwd_dq_tile_base(varlen, b, si.q_start, p.seqlen_q, bwd_layout_block_m(kD)));
      auto tile_q = Shape<Int<kM>, Int<kD>>{};
      for (int it = 0; it < total; ++it) {
        const int buf = it & 1, use = it >> 1;
        const int h = hk * group + it % group, m = range.end - 1 - it / group;
        ss.dq_full[buf].wait(use & 1);
        Tensor gdQ = bwd_rows_tile(mdQ, dq_row0, h, 0, tile_q, m);
        Tensor sdQ = make_tensor(make_smem_ptr(ss.smem_dq.data() + buf * (kM * kD)),
                                 typename Traits::SmemLayoutdQ{});
        auto [tdQgdQ, tdQsdQ] = tma_partition(kp.tma_dq, _0{}, Layout<_1>{}, group_modes<0, 2>(sdQ),
                                              group_modes<0, 2>(gdQ));
        int* sem = nullptr;
        if (bp.deterministic) {
          sem = kp.sems + (int64_t(b) * p.heads + h) * kp.num_m_max + m;
          const int expected = kv_tile_rank(n_block, m, kM, kN, si.sq, si.sk, wl, wr);
          while (ld_acquire_gpu(sem) != expected) __nanosleep(32);
        }
        copy(kp.tma_dq, tdQsdQ, tdQgdQ);
        bulk_commit();
        if (bp.deterministic) {
          bulk_wait_all();
          release_increment(sem);
        } else {
          bulk_wait_read_all();
        }
        ss.dq_empty[buf].arrive();
      }
      bulk_wait_all();
    } else if (kReadyHop && warp_idx >= 2) {
      // Ready barriers (flash_bwd_cta.cuh): K/V once, then each Q/dO stage in the walk's order,
      // with the next packed sequence's rows zeroed where a tile crosses its end.
      const int tid64 = int(threadIdx.x) - 64;
      clear_kv_tail<Traits>(ss, varlen ? rows_k : kN, tid64);
      using LayoutQ = typename Traits::SmemLayoutQ;
      Tensor sQ_all = make_tensor(make_smem_ptr(ss.smem_q.data()), LayoutQ{});
      Tensor sdO_all = make_tensor(make_smem_ptr(ss.smem_do.data()), LayoutQ{});
      typename Traits::PipelineState st;
      for (int it = 0; it < total; ++it) {
        const int m0 = (range.end - 1 - it / group) * kM;
        wait_stage_loaded(ss.pipeline, st);  // the stage's TMA (and lse2/D copies) landed
        if (varlen && m0 + kM > si.sq) {
          zero_tail_rows<64>(sQ_all(_, _, st.index()), si.sq - m0, tid64);
          zero_tail_rows<64>(sdO_all(_, _, st.index()), si.sq - m0, tid64);
        }
        ss.qdo_ready[st.index()].arrive();
        ++st;
      }
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
    const int tidx = int(threadIdx.x) - 128;
    typename Traits::TiledMmadKV mma_dkv;
    typename Traits::TiledMmadQ mma_dq;
    auto thr_dkv = mma_dkv.get_thread_slice(tidx);
    auto thr_dq = mma_dq.get_thread_slice(tidx);

    Tensor sQ = make_tensor(make_smem_ptr(ss.smem_q.data()), typename Traits::SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(ss.smem_do.data()), typename Traits::SmemLayoutQ{});
    Tensor sQt = make_tensor(make_smem_ptr(ss.smem_q.data()), typename Traits::SmemLayoutQt{});
    Tensor sdOt = make_tensor(make_smem_ptr(ss.smem_do.data()), typename Traits::SmemLayoutQt{});
    Tensor sK = make_tensor(make_smem_ptr(ss.smem_k.data()), typename Traits::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(ss.smem_v.data()), typename Traits::SmemLayoutK{});
    Tensor sKt = make_tensor(make_smem_ptr(ss.smem_k.data()), typename Traits::SmemLayoutKt{});
    Tensor sdS = make_tensor(make_smem_ptr(ss.smem_ds.data()), typename Traits::SmemLayoutdS{});
    Tensor sdSt = make_tensor(make_smem_ptr(ss.smem_ds.data()), typename Traits::SmemLayoutdSt{});

    Tensor tdQrdS = thr_dq.partition_fragment_A(sdSt);  // (MMA, MMA_M, MMA_K, BUF)
    Tensor tdQrKt = thr_dq.partition_fragment_B(sKt);

    const uint32_t dq_base = dq_store_base<Traits>(tidx);  // this thread's dQ registers in sdQ
    Tensor acc_dk = partition_fragment_C(mma_dkv, Shape<Int<kN>, Int<kD>>{});
    Tensor acc_dv = partition_fragment_C(mma_dkv, Shape<Int<kN>, Int<kD>>{});
    clear(acc_dk);
    clear(acc_dv);

    const float scale_log2 = p.softmax_scale_log2;
    const int sq = si.sq, sk = si.sk;
    if constexpr (kReadyHop) ss.kv_ready.wait(0);  // K/V landed, tail zeroed: clear_kv_tail
    else ss.barrier_kv.wait(0);
    typename Traits::PipelineState st;

    // An iteration's end, once its dQ and then its last dK product are issued: dQ to sdQ[buf]
    // (once the dQ writer has read the buffer's previous tile) while dK still runs on the tensor
    // cores (wgmma groups complete in issue order); the stage is released after dK, the last
    // reader of Q (dV of dO finished before dQ).
    auto finish_step = [&](auto& acc_dq, int it, int buf) {
      if (it >= 2) ss.dq_empty[buf].wait(((it >> 1) - 1) & 1);
      warpgroup_wait<1>();  // everything but the last dK: dQ done
      warpgroup_fence_operand(acc_dq);
      const uint32_t sdq = smem_addr(ss.smem_dq.data() + buf * (kM * kD));
      static_assert(decltype(size(acc_dq))::value == Traits::kDqRegs, "dQ fragment");
      const bool odd_row = (tidx >> 2) & 1;  // dq_store_reg: odd rows store group j ^ 2
#pragma unroll
      for (int i = 0; i < Traits::kDqRegs; i += 2)
        st_shared_f32x2(sdq + dq_store_offset<Traits>(dq_base, i),
                        odd_row ? acc_dq(i ^ 8) : acc_dq(i),
                        odd_row ? acc_dq((i ^ 8) + 1) : acc_dq(i + 1));
      cutlass::arch::fence_view_async_shared();
      ss.dq_full[buf].arrive();
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_dk);
      pipe.consumer_release(st);
      ++st;
    };
    if constexpr (kM == 128) {
      // 128-row tiles: S^T and dP^T in two 64-query halves, pipelined inside the warpgroup. The
      // exponentials of half 0 run under dP^T_0 and S^T_1, those of half 1 under dP^T_1 and half
      // 0's dV and dK; at most three of the four 64 x 64 accumulators are allocated at once
      // (160 registers with dK/dV at the peak, where the whole tile's S^T and dP^T took 192).
      typename Traits::TiledMmaSdPHalf mma_h;
      auto thr_h = mma_h.get_thread_slice(tidx);
      using H = Int<64>;
      auto qh = Shape<H, Int<kD>, Int<Traits::kStages>>{};
      auto qth = Shape<Int<kD>, H, Int<Traits::kStages>>{};
      auto dsh = Shape<Int<kN>, H, Int<Traits::kDsBufs>>{};
      Tensor tSrKh = thr_h.partition_fragment_A(sK);
      Tensor tSrVh = thr_h.partition_fragment_A(sV);
      Tensor tSrQ0 = thr_h.partition_fragment_B(local_tile(sQ, qh, make_coord(_0{}, _0{}, _0{})));
      Tensor tSrQ1 = thr_h.partition_fragment_B(local_tile(sQ, qh, make_coord(_1{}, _0{}, _0{})));
      Tensor tSrdO0 =
          thr_h.partition_fragment_B(local_tile(sdO, qh, make_coord(_0{}, _0{}, _0{})));
      Tensor tSrdO1 =
          thr_h.partition_fragment_B(local_tile(sdO, qh, make_coord(_1{}, _0{}, _0{})));
      Tensor tdVrdOt0 =
          thr_dkv.partition_fragment_B(local_tile(sdOt, qth, make_coord(_0{}, _0{}, _0{})));
      Tensor tdVrdOt1 =
          thr_dkv.partition_fragment_B(local_tile(sdOt, qth, make_coord(_0{}, _1{}, _0{})));
      Tensor tdKrQt0 =
          thr_dkv.partition_fragment_B(local_tile(sQt, qth, make_coord(_0{}, _0{}, _0{})));
      Tensor tdKrQt1 =
          thr_dkv.partition_fragment_B(local_tile(sQt, qth, make_coord(_0{}, _1{}, _0{})));
      auto s2s_h = make_tiled_copy_C(typename Traits::SmemCopydS{}, mma_h);
      auto thr_s2s_h = s2s_h.get_thread_slice(tidx);
      Tensor tdSsdS0 = thr_s2s_h.partition_D(local_tile(sdS, dsh, make_coord(_0{}, _0{}, _0{})));
      Tensor tdSsdS1 = thr_s2s_h.partition_D(local_tile(sdS, dsh, make_coord(_0{}, _1{}, _0{})));
      Tensor tScSh = thr_h.partition_C(make_identity_tensor(Shape<Int<kN>, H>{}));
      using AccH = decltype(partition_fragment_C(mma_h, Shape<Int<kN>, H>{}));
      using RegsH = decltype(make_tensor<Element>(acc_layout_to_A_regs(AccH{}.layout())));

      for (int it = 0; it < total; ++it) {
        const int m = range.end - 1 - it / group;
        if constexpr (kReadyHop) ss.qdo_ready[st.index()].wait(st.phase());
        else pipe.consumer_wait(st);
        const int s = st.index(), buf = it & 1;
        // P^T = exp2(S^T scale - lse2) on half hh's visible entries, in place. Softcap:
        // t = tanh(S^T * softmax_scale / c) (masked entries 2, a value tanh never takes),
        // P^T = exp2(t * c*log2e - lse2) in place and dt = 1 - t^2 for ds_half (only then
        // allocated).
        auto exp_half = [&](AccH& acc, AccH& dt, int hh) {
          const int mh = 2 * m + hh, m0h = mh * 64;
          const bool need_mask = n0 + kN > sk || m0h + 64 > sq ||
                                 !tile_fully_visible(mh, n_block, 64, kN, sq, sk, wl, wr);
          const TileMask tm = tile_mask(need_mask, m0h, n0, sq, sk, wl, wr);
          const float* s_lse = ss.smem_lse.data() + s * kM + 64 * hh;
#pragma unroll
          for (int i = 0; i < size(acc); ++i) {
            const int key = int(get<0>(tScSh(i))), col = int(get<1>(tScSh(i)));
            const int dlt = key - col;
            const bool vis = key < tm.key_lim && col < tm.q_lim && dlt <= tm.d_hi && dlt >= tm.d_lo;
            if constexpr (!kSoftcap) {
              const float pv = fast_exp2(acc(i) * scale_log2 - s_lse[col]);
              acc(i) = vis ? pv : 0.f;
            } else {
              const float t = vis ? tanh_approx(acc(i) * kp.cap_in) : 2.f;
              acc(i) = t > 1.f ? 0.f : fast_exp2(t * kp.cap_log2 - s_lse[col]);
              dt(i) = 1.f - t * t;
            }
          }
        };
        // dS^T = P^T (dP^T - D) (softcap: times dt) -> 16 bits, and to smem buffer buf (half hh)
        // by stmatrix.
        auto ds_half = [&](const AccH& acc_p, AccH& acc_d, const AccH& dt, RegsH& rdS,
                           auto& tdSsdS, int hh) {
          const float* s_d = ss.smem_d.data() + s * kM + 64 * hh;
#pragma unroll
          for (int i = 0; i < size(acc_d); ++i) {
            const int col = int(get<1>(tScSh(i)));
            if constexpr (!kSoftcap) acc_d(i) = acc_p(i) * (acc_d(i) - s_d[col]);
            else acc_d(i) = acc_p(i) * (acc_d(i) - s_d[col]) * dt(i);
          }
          convert_fragment(rdS, acc_d);
          Tensor dst0 = tdSsdS(_, _, _, 0);
          Tensor dst = make_tensor(dst0.data() + buf * (kN * kM), dst0.layout());
          copy(s2s_h, thr_s2s_h.retile_S(make_tensor(rdS.data(), acc_d.layout())), dst);
        };
        RegsH rP0, rdS0, rP1, rdS1;
        {
          AccH acc_s0, acc_dp0, acc_s1, dt0, dt1;  // dt: softcap only
          wg_gemm<true>(mma_h, tSrKh, tSrQ0(_, _, _, s), acc_s0);
          wg_gemm<true>(mma_h, tSrVh, tSrdO0(_, _, _, s), acc_dp0);
          wg_gemm<true>(mma_h, tSrKh, tSrQ1(_, _, _, s), acc_s1);
          // Each half's dV is issued right after its exponentials, before its dP^T wait: ptxas
          // hoists a wait above independent math, so with the wait first the exponentials ran
          // after dP^T's products instead of under them.
          warpgroup_wait<2>();  // S^T_0
          exp_half(acc_s0, dt0, 0);
          convert_fragment(rP0, acc_s0);
          wg_gemm<false>(mma_dkv, rP0, tdVrdOt0(_, _, _, s), acc_dv);
          warpgroup_wait<2>();  // dP^T_0
          ds_half(acc_s0, acc_dp0, dt0, rdS0, tdSsdS0, 0);
          AccH acc_dp1;
          wg_gemm<true>(mma_h, tSrVh, tSrdO1(_, _, _, s), acc_dp1);
          wg_gemm<false>(mma_dkv, rdS0, tdKrQt0(_, _, _, s), acc_dk);
          warpgroup_wait<3>();  // S^T_1
          exp_half(acc_s1, dt1, 1);
          convert_fragment(rP1, acc_s1);
          wg_gemm<false>(mma_dkv, rP1, tdVrdOt1(_, _, _, s), acc_dv);
          warpgroup_wait<2>();  // dP^T_1
          ds_half(acc_s1, acc_dp1, dt1, rdS1, tdSsdS1, 1);
        }
        cutlass::arch::fence_view_async_shared();
        cutlass::arch::NamedBarrier::sync(Traits::kNumMmaThreads, 1);  // all of dS^T in smem
        Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kM>, Int<kD>>{});
        wg_gemm<true>(mma_dq, tdQrdS(_, _, _, buf), tdQrKt, acc_dq);
        wg_gemm<false>(mma_dkv, rdS1, tdKrQt1(_, _, _, s), acc_dk);
        finish_step(acc_dq, it, buf);
      }
    } else {
      // 64-row tiles: the whole tile's S^T and dP^T at once.
      static_assert(cute::cosize_v<typename Traits::SmemLayoutdS> == 2 * kN * kM);  // dense
      typename Traits::TiledMmaSdP mma_sdp;
      auto thr_sdp = mma_sdp.get_thread_slice(tidx);
      Tensor tSrK = thr_sdp.partition_fragment_A(sK);      // (MMA, MMA_M, MMA_K)
      Tensor tSrV = thr_sdp.partition_fragment_A(sV);
      Tensor tSrQ = thr_sdp.partition_fragment_B(sQ);      // (MMA, MMA_N, MMA_K, PIPE)
      Tensor tSrdO = thr_sdp.partition_fragment_B(sdO);
      Tensor tdVrdOt = thr_dkv.partition_fragment_B(sdOt);  // (MMA, MMA_N, MMA_K, PIPE)
      Tensor tdKrQt = thr_dkv.partition_fragment_B(sQt);
      auto s2s = make_tiled_copy_C(typename Traits::SmemCopydS{}, mma_sdp);
      auto thr_s2s = s2s.get_thread_slice(tidx);
      Tensor tdSsdS = thr_s2s.partition_D(sdS);           // (CPY, CPY_M, CPY_N, BUF)
      Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kN>, Int<kM>>{}));
      const int key0 = int(get<0>(tScS(0))), col0 = int(get<1>(tScS(0)));  // this thread's first
      for (int it = 0; it < total; ++it) {
        const int m = range.end - 1 - it / group;  // (the producer and dQ writer track h)
        const int m0 = m * kM;
        if constexpr (kReadyHop) ss.qdo_ready[st.index()].wait(st.phase());  // zeroed: warps 2-3
        else pipe.consumer_wait(st);
        const int s = st.index();
        Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<kN>, Int<kM>>{});
        Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<kN>, Int<kM>>{});
        wg_gemm<true>(mma_sdp, tSrK, tSrQ(_, _, _, s), acc_s);
        wg_gemm<true>(mma_sdp, tSrV, tSrdO(_, _, _, s), acc_dp);
        const float* s_lse = ss.smem_lse.data() + s * kM;
        const float* s_d = ss.smem_d.data() + s * kM;
        const bool need_mask = n0 + kN > sk || m0 + kM > sq ||
                               !tile_fully_visible(m, n_block, kM, kN, sq, sk, wl, wr);
        // mask_visible in tile-local int32 terms (tile_mask; one branch-free path, two paths
        // spilled more registers): key r of this KV tile and query c of this query tile.
        // Each bound is moved to this thread's first element (key0, col0) once per tile, so
        // every element compares one of four registers with an immediate, its offset from that
        // element; the empty asm after the S^T wait keeps the compiler from folding the bounds
        // back into per-offset registers hoisted out of the loop (hdim 128 batched: 20 -> 12
        // spill bytes, none left in the loop; H100 hdim 128 1.03-1.08x without determinism).
        const TileMask tm = tile_mask(need_mask, m0, n0, sq, sk, wl, wr);
        int kx = key0 - tm.key_lim, cx = col0 - tm.q_lim;
        int hx = key0 - col0 - tm.d_hi, lx = key0 - col0 - tm.d_lo;
        auto visible = [&](int i) {
          const int dk = int(get<0>(tScS(i))) - key0, dc = int(get<1>(tScS(i))) - col0;
          return kx < -dk && cx < -dc && hx <= dc - dk && lx >= dc - dk;
        };
        // Softcap: S^T -> t = tanh(S^T * softmax_scale / c) in place (masked entries get 2, a
        // value tanh never takes), then P^T = exp2(t * c*log2e - lse2[q]) and
        // dS^T = P^T * (dP^T - D[q]) * (1 - t^2): the cap's derivative is the only extra
        // factor, softmax_scale enters dK (epilogue) and dQ (postprocess) as without the cap.
        // The tanh (without the cap, the exponentials) are written before the dP^T wait, but
        // ptxas places the wait above them (SASS), so they run after dP^T's products.
        warpgroup_wait<1>();
        asm volatile("" : "+r"(kx), "+r"(cx), "+r"(hx), "+r"(lx));
        if constexpr (!kSoftcap) {
#pragma unroll
          for (int i = 0; i < size(acc_s); ++i) {
            const int col = int(get<1>(tScS(i)));
            const float pv = fast_exp2(acc_s(i) * scale_log2 - s_lse[col]);
            acc_s(i) = visible(i) ? pv : 0.f;
          }
        } else {
#pragma unroll
          for (int i = 0; i < size(acc_s); ++i)
            acc_s(i) = visible(i) ? tanh_approx(acc_s(i) * kp.cap_in) : 2.f;
        }
        warpgroup_wait<0>();
        if constexpr (!kSoftcap) {
#pragma unroll
          for (int i = 0; i < size(acc_dp); ++i) {
            const int col = int(get<1>(tScS(i)));
            acc_dp(i) = acc_s(i) * (acc_dp(i) - s_d[col]);
          }
        } else {
#pragma unroll
          for (int i = 0; i < size(acc_dp); ++i) {
            const int col = int(get<1>(tScS(i)));
            const float t = acc_s(i);
            const float pv = t > 1.f ? 0.f : fast_exp2(t * kp.cap_log2 - s_lse[col]);
            acc_s(i) = pv;
            acc_dp(i) = pv * (acc_dp(i) - s_d[col]) * (1.f - t * t);
          }
        }
        Tensor rP = make_tensor<Element>(acc_layout_to_A_regs(acc_s.layout()));
        Tensor rdS = make_tensor<Element>(acc_layout_to_A_regs(acc_dp.layout()));
        convert_fragment(rP, acc_s);
        convert_fragment(rdS, acc_dp);
        // dS^T -> smem buffer it % 2 by stmatrix. Buffer 0's addresses plus a runtime shift:
        // indexing the buffer mode at run time spilled 184 bytes at hdim 64 (44 without).
        const int buf = it & 1;
        {
          Tensor tdSsdS_0 = tdSsdS(_, _, _, 0);
          Tensor tdSsdS_b = make_tensor(tdSsdS_0.data() + buf * (kN * kM), tdSsdS_0.layout());
          Tensor rdS_c = make_tensor(rdS.data(), acc_dp.layout());  // the accumulator's order
          copy(s2s, thr_s2s.retile_S(rdS_c), tdSsdS_b);
        }
        // FA3's order: dV before the barrier, then dQ and dK, so that dQ goes to smem while dK
        // still runs on the tensor cores (wgmma groups complete in issue order).
        wg_gemm<false>(mma_dkv, rP, tdVrdOt(_, _, _, s), acc_dv);
        cutlass::arch::fence_view_async_shared();
        cutlass::arch::NamedBarrier::sync(Traits::kNumMmaThreads, 1);  // all of dS^T in smem

        Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kM>, Int<kD>>{});
        wg_gemm<true>(mma_dq, tdQrdS(_, _, _, buf), tdQrKt, acc_dq);
        wg_gemm<false>(mma_dkv, rdS, tdKrQt(_, _, _, s), acc_dk);
        finish_step(acc_dq, it, buf);
      }
    }

    // Epilogue: dK = scale * dK, dV, rows < sk and columns < head_dim (the columns past it are
    // the zero-loaded padding of a narrower head_dim), converted in registers, 4-byte stores.
    const float scale = p.softmax_scale;
    constexpr int kAcc = decltype(size(acc_dk))::value;
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc_dk(i) *= scale;
    Tensor tcKV = thr_dkv.partition_C(make_identity_tensor(Shape<Int<kN>, Int<kD>>{}));
    auto store = [&](auto& acc, Element* g, int64_t row_stride) {
      cutlass::NumericArrayConverter<Element, float, kAcc> cvt;
      cutlass::Array<Element, kAcc> r = cvt(*reinterpret_cast<const cutlass::Array<float, kAcc>*>(acc.data()));
      const uint32_t* r32 = reinterpret_cast<const uint32_t*>(r.data());
#pragma unroll
      for (int i = 0; i < kAcc; i += 2) {
        const int row = int(get<0>(tcKV(i))), c = int(get<1>(tcKV(i)));
        if (row < rows_k && c < p.head_dim)
          *reinterpret_cast<uint32_t*>(g + int64_t(row) * row_stride + c) = r32[i / 2];
      }
    };
    store(acc_dk, gdK, bp.dk_row_stride);
    store(acc_dv, gdV, bp.dv_row_stride);
  }
#endif
}

}  // namespace flash
}  // namespace longctx
