// Flash-attention backward, step 2 of 3 (main kernel) for head dim 256: TMA + wgmma, warp
// specialized, FlashAttention-3's hdim-256 shape (64 x 80 tiles, dK/dV and dQ computed
// transposed), own code; and its dQ postprocess (step 3). Preprocess, mask, the producer's K/V
// load and the semaphore protocol are shared with the hdim 64/128 kernel (flash_bwd_sm90.cuh,
// flash_bwd_cta.cuh).
//
// What it computes. One CTA per (KV tile n of kBlockN = 80 keys, kv head hk, batch b), in
// BwdTileOrder's order (tile_scheduler.cuh). K and V of the tile are TMA-loaded once. The CTA
// walks the query tiles m (kBlockM = 64 rows) in bwd_query_tiles(n), last to first, and for each
// the query heads h of hk's GQA group (the deterministic mode's order, flash_bwd_sm90.cuh); per
// (m, h), with queries as the M dimension of S (not swapped):
//   S    = Q K^T, dP = dO V^T    SS wgmma, 64 x 80, K = 256 (WG w: keys [40w, 40w + 40))
//   P    = exp2(S * scale*log2e - lse2[q]) (lse2 = lse*log2e from the preprocess, +inf for rows
//          that see no key and pad rows -> P = 0), masked entries 0
//   dS   = P * (dP - D[q])                 (D = rowsum(dO * O), preprocess)
// or, with logit softcap c (logit_mods.h; the kernel's kSoftcap, chosen by the launcher):
//   t    = tanh(S * scale / c) ;  P = exp2(t * c*log2e - lse2[q]) ;  dS = P * (1 - t^2) * (dP - D)
//   P, dS -> smem as (keys, queries) tiles, queries contiguous (stmatrix .trans), 2 buffers
//   dV^T += dO^T P, dK^T += Q^T dS          SS wgmma, 256 x 80, K = 64 (WG w: D rows
//                                           [64w, 64w + 64) and [128 + 64w, 192 + 64w))
//   dQ^T  = K^T dS^T                        SS wgmma, 256 x 64, K = 80, as two halves of D
//                                           (128 rows each, WG w: 64 of them) one after the
//                                           other, so only 32 accumulator registers are live
//   dQ accumulation: float4 atomics (red.global.add.v4.f32) straight from the registers into
//   the fp32 accumulator, laid out per (head, query tile) in fragment order (dq_frag_offset), so
//   each warp instruction covers 512 contiguous bytes; flash_bwd_postprocess_frag_kernel
//   inverts the order.
// Finally dK = scale * dK and dV are written in the input dtype (keys < sk). GQA: the group's
// heads are summed in registers.
//
// Warp roles: 3 warpgroups (384 threads). WG 0: producer, 24 registers (setmaxnreg); one thread
// TMA-loads K, V once (transaction barrier) and, per (m, h), Q and the 64 lse2 values into
// stage s of a 2-stage PipelineTmaAsync and dO and the 64 D values into a 1-stage one (a second
// dO stage does not fit in shared memory). WGs 1-2: consumers, 240 registers.
// Per-iteration synchronization of the consumers: named barrier B1 (256 threads) after P and dS
// are in smem (every dK/dV/dQ product reads both halves). P/dS buffer it % 2 is rewritten in
// iteration it + 2, after both WGs passed B1 of it + 1, i.e. after they finished every wgmma of
// iteration it: no second barrier. The dO stage is released once dV^T's wgmma completed, the Q
// stage once dK^T's did.
// Mask: tile-local, branch free, as in flash_bwd_sm90.cuh (rows are queries here).
//
// Deterministic mode: per-(batch, head, query tile of 64) semaphore. Warp 1 of the producer
// warpgroup spins (ld.acquire) until the semaphore equals this KV tile's rank among the tiles
// visiting the query tile (kv_tile_rank) and arrives on named barrier kBarSemReady, which the
// consumers sync on before their first dQ atomic of the tile; after their last one they arrive
// (without waiting) on kBarDqAdded, on which warp 1 syncs, then fences (fence.acq_rel.gpu,
// cumulative over the consumers' atomics ordered before it by the barrier, CUTLASS's
// arrive_inc pattern) and increments. Each address then receives its additions in KV-tile
// order: bitwise reproducible. The consumers wait only for the semaphore, never for a fence.
//
// smem: K, V 2 x 40 KB, Q 2 stages x 32 KB, dO 1 stage x 32 KB, P and dS 2 buffers x 2 x 10 KB,
// lse2/D 768 B, barriers: 222,208 bytes (static_assert <= 227 KB), one CTA per SM.
#pragma once

#ifndef CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED  // wgmma N = 40 and 80
#endif

#include <cuda_runtime.h>
#include <cstdint>
#include <cute/tensor.hpp>
#include <cute/atom/copy_traits_sm90.hpp>
#include "longctx/flash/flash_bwd_dispatch.cuh"
#include "longctx/flash/flash_bwd_sm90.cuh"  // BwdKernelParams, bwd_sm90 helpers, wg_gemm
#include "longctx/tanh_approx.cuh"

namespace longctx {
namespace flash {

template <typename Element_>
struct FlashBwdSm90Hdim256Traits {
  using Element = Element_;
  static constexpr int kHeadDim = 256;
  static constexpr int kBlockM = 64;   // query rows per iteration
  static constexpr int kBlockN = 80;   // keys per CTA
  static constexpr int kStages = 2;    // Q (and lse2)
  static constexpr int kStagesdO = 1;  // dO (and D)
  static constexpr int kBufsPdS = 2;
  static constexpr int kNumMmaThreads = 256;
  static constexpr int kNumThreads = 384;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  static_assert(128 * kProducerRegs + 256 * kConsumerRegs <= 168 * 384, "setmaxnreg pool");
  static_assert(kBlockM == kBwdBlockM, "semaphores and dQ tiles are per 64 query rows");

  // S, dP: (queries, keys), the two WGs split the keys.
  using TileSdP = cute::Shape<cute::Int<kBlockM>, cute::Int<kBlockN / 2>, cute::Int<kHeadDim>>;
  // dV^T, dK^T: (D, keys), K = queries; atoms stacked along D.
  using TileDKV = cute::Shape<cute::_64, cute::Int<kBlockN>, cute::Int<kBlockM>>;
  // dQ^T half: (D, queries), K = keys.
  using TileDQ = cute::Shape<cute::_64, cute::Int<kBlockM>, cute::Int<kBlockN>>;
  using TiledMmaSdP = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float, TileSdP>(),
      cute::Layout<cute::Shape<cute::_1, cute::_2, cute::_1>>{}));
  using TiledMmadKV = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float, TileDKV, cute::GMMA::Major::MN,
                                 cute::GMMA::Major::K>(),
      cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>{}));
  using TiledMmadQ = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float, TileDQ, cute::GMMA::Major::MN,
                                 cute::GMMA::Major::MN>(),
      cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>{}));
  // Without CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED (defined before the first CuTe header) the
  // selector silently falls back to N = 8 / 16 atoms.
  static_assert(cute::size<1>(typename TiledMmaSdP::AtomShape_MNK{}) == kBlockN / 2, "N = 40");
  static_assert(cute::size<1>(typename TiledMmadKV::AtomShape_MNK{}) == kBlockN, "N = 80");
  static_assert(cute::size<1>(typename TiledMmadQ::AtomShape_MNK{}) == kBlockM, "N = 64");

  // Every tile: 128-byte swizzle, K-major atoms of 8 rows x 64 elements. Q, dO, K, V are
  // (rows, D); P and dS (keys, queries). Transposed views below are the MN-major operands.
  using Atom = cute::GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ = decltype(cute::tile_to_shape(
      Atom{}, cute::make_shape(cute::Int<kBlockM>{}, cute::Int<kHeadDim>{}, cute::Int<kStages>{})));
  using SmemLayoutdO = decltype(cute::tile_to_shape(
      Atom{},
      cute::make_shape(cute::Int<kBlockM>{}, cute::Int<kHeadDim>{}, cute::Int<kStagesdO>{})));
  using SmemLayoutK = decltype(cute::tile_to_shape(
      Atom{}, cute::make_shape(cute::Int<kBlockN>{}, cute::Int<kHeadDim>{})));
  using SmemLayoutPdS = decltype(cute::tile_to_shape(
      Atom{}, cute::make_shape(cute::Int<kBlockN>{}, cute::Int<kBlockM>{}, cute::Int<kBufsPdS>{})));
  // (D, rows, stage) views: A operands of dV^T (dO^T) and dK^T (Q^T), MN-major.
  template <int kS>
  using Transposed = decltype(cute::make_ordered_layout(
      cute::make_shape(cute::Int<kHeadDim>{}, cute::Int<kBlockM>{}, cute::Int<kS>{}),
      cute::Step<cute::_2, cute::_1, cute::_3>{}));
  using SmemLayoutQt = decltype(cute::composition(SmemLayoutQ{}, Transposed<kStages>{}));
  using SmemLayoutdOt = decltype(cute::composition(SmemLayoutdO{}, Transposed<kStagesdO>{}));
  // (D, keys) view of K: A operand of dQ^T, MN-major.
  using SmemLayoutKt = decltype(cute::composition(
      SmemLayoutK{}, cute::make_ordered_layout(
                         cute::make_shape(cute::Int<kHeadDim>{}, cute::Int<kBlockN>{}),
                         cute::Step<cute::_2, cute::_1>{})));
  // (queries, keys, buf) view of P / dS: the stmatrix destination in S's coordinates and the B
  // operand of dQ^T (dS^T, MN-major).
  using SmemLayoutPdSt = decltype(cute::composition(
      SmemLayoutPdS{},
      cute::make_ordered_layout(
          cute::make_shape(cute::Int<kBlockM>{}, cute::Int<kBlockN>{}, cute::Int<kBufsPdS>{}),
          cute::Step<cute::_2, cute::_1, cute::_3>{})));
  // Accumulator (queries, keys) -> (keys, queries) tile: transposing stmatrix, 2 8x8 matrices
  // per instruction (each WG's 40 keys are 5 blocks of 8).
  using SmemCopyPdS = cute::Copy_Atom<cute::SM90_U16x4_STSM_T, Element>;

  using PipelineQ = cutlass::PipelineTmaAsync<kStages>;
  using PipelinedO = cutlass::PipelineTmaAsync<kStagesdO>;

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>> smem_k;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>> smem_v;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>> smem_q;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutdO>> smem_do;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutPdS>> smem_p;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutPdS>> smem_ds;
    alignas(16) cute::array_aligned<float, kBlockM * kStages> smem_lse;
    alignas(16) cute::array_aligned<float, kBlockM * kStagesdO> smem_d;
    alignas(16) cutlass::arch::ClusterTransactionBarrier barrier_kv;
    alignas(16) cutlass::arch::ClusterBarrier kv_ready;  // K/V landed, tail zeroed (64)
    alignas(16) cutlass::arch::ClusterBarrier q_ready[kStages];     // Q stage ready (64)
    alignas(16) cutlass::arch::ClusterBarrier do_ready[kStagesdO];  // dO stage ready (64)
    alignas(16) typename PipelineQ::SharedStorage pipeline_q;
    alignas(16) typename PipelinedO::SharedStorage pipeline_do;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "shared memory");

  static constexpr uint32_t kTmaBytesKV = 2 * kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kTmaBytesQ = kBlockM * kHeadDim * sizeof(Element) + kBlockM * 4;

  using ShapeQKV = cute::Shape<int32_t, int32_t, int32_t, int32_t>;  // (rows, D, heads, batch)
  using StrideQKV = cute::Stride<int64_t, cute::_1, int64_t, int64_t>;
  using TMA_Q = decltype(cute::make_tma_copy(
      cute::SM90_TMA_LOAD{},
      cute::make_tensor(cute::make_gmem_ptr(static_cast<Element const*>(nullptr)), ShapeQKV{},
                        StrideQKV{}),
      cute::take<0, 2>(SmemLayoutQ{}), cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{},
      cute::_1{}));
  using TMA_K = decltype(cute::make_tma_copy(
      cute::SM90_TMA_LOAD{},
      cute::make_tensor(cute::make_gmem_ptr(static_cast<Element const*>(nullptr)), ShapeQKV{},
                        StrideQKV{}),
      SmemLayoutK{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}, cute::_1{}));
  struct TMA_dQ {};  // unused: dQ goes out as float4 atomics (below)

  // dQ fragment order. One query tile's dQ^T (256 x 64) is 16384 floats: half c of D (128 rows),
  // then consumer thread tidx (WG w = tidx / 128, t = tidx % 128) owning 64 of those rows, then
  // its accumulator registers in groups of 4 (g = 0..7: registers 4g .. 4g + 3):
  //   offset(c, tidx, g) = c * 8192 + w * 4096 + g * 512 + t * 4   (+ register index mod 4)
  // so a warp's float4 atomics for one g cover 512 contiguous bytes. Register i of thread tidx
  // in half c holds dQ^T(128 c + d, q) with (d, q) = partition_C of an identity (128, 64) tensor
  // by TiledMmadQ's slice tidx (dq_frag_coords), which is what the postprocess inverts.
  static constexpr int kDqTileFloats = kBlockM * kHeadDim;
  static constexpr int kDqFrag = kBlockM * (kHeadDim / 2) / kNumMmaThreads;  // 32 per half
};

namespace bwd_sm90 {

__host__ __device__ __forceinline__ int dq_frag_offset(int c, int tidx, int g) {
  return c * 8192 + (tidx >> 7) * 4096 + g * 512 + (tidx & 127) * 4;
}

// (D row within the half, query) of each dQ^T register of consumer thread tidx.
template <typename Traits>
__host__ __device__ auto dq_frag_coords(int tidx) {
  using namespace cute;
  typename Traits::TiledMmadQ mma;
  return mma.get_thread_slice(tidx).partition_C(
      make_identity_tensor(Shape<Int<Traits::kHeadDim / 2>, Int<Traits::kBlockM>>{}));
}

}  // namespace bwd_sm90

// kSoftcap: the launcher's choice from p.fwd.mods.softcap != 0 (uniform over the launch); a
// template parameter, so the kernel without the cap contains none of its code.
template <typename Traits, bool kSoftcap>
__global__ void __launch_bounds__(Traits::kNumThreads, 1)
    flash_bwd_sm90_hdim256_kernel(const __grid_constant__ BwdKernelParams<Traits> kp) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using namespace cute;
  using namespace bwd_sm90;
  using Element = typename Traits::Element;
  using PipelineQ = typename Traits::PipelineQ;
  using PipelinedO = typename Traits::PipelinedO;
  constexpr int kM = Traits::kBlockM, kN = Traits::kBlockN, kD = Traits::kHeadDim;

  extern __shared__ __align__(1024) char smem_buf[];
  auto& ss = *reinterpret_cast<typename Traits::SharedStorage*>(smem_buf);
  const BwdParams& bp = kp.p;
  const FwdParams& p = bp.fwd;
  const bool varlen = p.cu_seqlens_q != nullptr;

  int n_block, hk, b;
  kp.order.decode(int(blockIdx.x), n_block, hk, b);
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

  // Named barriers (CUTLASS user ids): B1 = 1 (P and dS in smem); deterministic mode's hand-off
  // between the consumers and the semaphore warp (warp 1).
  constexpr int kBarSemReady = 3, kBarDqAdded = 4;
  const int warp_idx = cutlass::canonical_warp_idx_sync();
  const int warp_group_idx = warp_idx / 4;
  if (warp_idx == 0 && cute::elect_one_sync()) {
    ss.barrier_kv.init(1);
    ss.kv_ready.init(64);
    for (int i = 0; i < Traits::kStages; ++i) ss.q_ready[i].init(64);
    for (int i = 0; i < Traits::kStagesdO; ++i) ss.do_ready[i].init(64);
    bwd_prefetch_tma(kp);
  }
  PipelineQ pipe_q(ss.pipeline_q,
                   bwd_pipeline_params<PipelineQ, Traits::kNumMmaThreads>(warp_group_idx,
                                                                         Traits::kTmaBytesQ),
                   Shape<_1, _1, _1>{});
  PipelinedO pipe_do(ss.pipeline_do,
                     bwd_pipeline_params<PipelinedO, Traits::kNumMmaThreads>(warp_group_idx,
                                                                            Traits::kTmaBytesQ),
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
      Tensor sdO = make_tensor(make_smem_ptr(ss.smem_do.data()), typename Traits::SmemLayoutdO{});
      auto st_q = cutlass::make_producer_start_state<PipelineQ>();
      auto st_do = cutlass::make_producer_start_state<PipelinedO>();
      auto tile_q = Shape<Int<kM>, Int<kD>>{};
      for (int it = 0; it < total; ++it) {
        const int h = hk * group + it % group, m = range.end - 1 - it / group;
        Tensor gQ = bwd_rows_tile(mQ, si.q_start, h, si.tma_batch(), tile_q, m);
        Tensor gdO = bwd_rows_tile(mdO, si.q_start, h, si.tma_batch(), tile_q, m);
        auto [tQgQ, tQsQ] = tma_partition(kp.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ),
                                          group_modes<0, 2>(gQ));
        auto [tdOgdO, tdOsdO] = tma_partition(kp.tma_do, _0{}, Layout<_1>{},
                                              group_modes<0, 2>(sdO), group_modes<0, 2>(gdO));
        const int64_t off = int64_t(h) * kp.pad_head_stride + pad_base + int64_t(m) * kM;
        pipe_q.producer_acquire(st_q);
        uint64_t* bar = pipe_q.producer_get_barrier(st_q);
        copy(kp.tma_q.with(*bar, 0), tQgQ, tQsQ(_, st_q.index()));
        bulk_g2s(ss.smem_lse.data() + st_q.index() * kM, kp.lse2 + off, kM * 4, bar);
        ++st_q;
        pipe_do.producer_acquire(st_do);
        bar = pipe_do.producer_get_barrier(st_do);
        copy(kp.tma_do.with(*bar, 0), tdOgdO, tdOsdO(_, st_do.index()));
        bulk_g2s(ss.smem_d.data() + st_do.index() * kM, kp.dpad + off, kM * 4, bar);
        ++st_do;
      }
    } else if (warp_idx == 1) {
      // Deterministic mode's semaphore warp: per iteration, wait until the query tile's
      // semaphore equals this KV tile's rank and open barrier kBarSemReady to the consumers;
      // after their last dQ atomic (kBarDqAdded) publish them with a gpu-scope fence and the
      // increment (the consumers never wait on the fence).
      if (bp.deterministic) {
        constexpr int kSync = Traits::kNumMmaThreads + 32;
        const bool leader = threadIdx.x == 32;
        for (int it = 0; it < total; ++it) {
          const int h = hk * group + it % group, m = range.end - 1 - it / group;
          int* sem = kp.sems + (int64_t(b) * p.heads + h) * kp.num_m_max + m;
          if (leader) {
            const int expected = kv_tile_rank(n_block, m, kM, kN, si.sq, si.sk, wl, wr);
            while (ld_acquire_gpu(sem) != expected) __nanosleep(32);
          }
          __syncwarp();
          cutlass::arch::NamedBarrier::arrive(kSync, kBarSemReady);
          cutlass::arch::NamedBarrier::sync(kSync, kBarDqAdded);
          if (leader)
            asm volatile("fence.acq_rel.gpu;\n"
                         "red.relaxed.gpu.global.add.s32 [%0], 1;\n" ::"l"(sem) : "memory");
        }
      }
    } else if (warp_idx >= 2) {
      // Ready barriers (flash_bwd_cta.cuh): K/V once, then each Q and dO stage in the walk's
      // order, with the next packed sequence's rows zeroed where a tile crosses its end.
      const int tid64 = int(threadIdx.x) - 64;
      clear_kv_tail<Traits>(ss, varlen ? rows_k : kN, tid64);
      Tensor sQ_all = make_tensor(make_smem_ptr(ss.smem_q.data()), typename Traits::SmemLayoutQ{});
      Tensor sdO_all =
          make_tensor(make_smem_ptr(ss.smem_do.data()), typename Traits::SmemLayoutdO{});
      typename PipelineQ::PipelineState st_q;
      typename PipelinedO::PipelineState st_do;
      for (int it = 0; it < total; ++it) {
        const int m0 = (range.end - 1 - it / group) * kM;
        const bool cross = varlen && m0 + kM > si.sq;
        wait_stage_loaded(ss.pipeline_q, st_q);  // the stage's TMA (and lse2 copy) landed
        if (cross) zero_tail_rows<64>(sQ_all(_, _, st_q.index()), si.sq - m0, tid64);
        ss.q_ready[st_q.index()].arrive();
        ++st_q;
        wait_stage_loaded(ss.pipeline_do, st_do);
        if (cross) zero_tail_rows<64>(sdO_all(_, _, st_do.index()), si.sq - m0, tid64);
        ss.do_ready[st_do.index()].arrive();
        ++st_do;
      }
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
    const int tidx = int(threadIdx.x) - 128;
    typename Traits::TiledMmaSdP mma_sdp;
    typename Traits::TiledMmadKV mma_dkv;
    typename Traits::TiledMmadQ mma_dq;
    auto thr_sdp = mma_sdp.get_thread_slice(tidx);
    auto thr_dkv = mma_dkv.get_thread_slice(tidx);
    auto thr_dq = mma_dq.get_thread_slice(tidx);

    Tensor sQ = make_tensor(make_smem_ptr(ss.smem_q.data()), typename Traits::SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(ss.smem_do.data()), typename Traits::SmemLayoutdO{});
    Tensor sQt = make_tensor(make_smem_ptr(ss.smem_q.data()), typename Traits::SmemLayoutQt{});
    Tensor sdOt = make_tensor(make_smem_ptr(ss.smem_do.data()), typename Traits::SmemLayoutdOt{});
    Tensor sK = make_tensor(make_smem_ptr(ss.smem_k.data()), typename Traits::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(ss.smem_v.data()), typename Traits::SmemLayoutK{});
    Tensor sKt = make_tensor(make_smem_ptr(ss.smem_k.data()), typename Traits::SmemLayoutKt{});
    Tensor sP = make_tensor(make_smem_ptr(ss.smem_p.data()), typename Traits::SmemLayoutPdS{});
    Tensor sdS = make_tensor(make_smem_ptr(ss.smem_ds.data()), typename Traits::SmemLayoutPdS{});
    Tensor sPt = make_tensor(make_smem_ptr(ss.smem_p.data()), typename Traits::SmemLayoutPdSt{});
    Tensor sdSt = make_tensor(make_smem_ptr(ss.smem_ds.data()), typename Traits::SmemLayoutPdSt{});

    Tensor tSrQ = thr_sdp.partition_fragment_A(sQ);       // (MMA, MMA_M, MMA_K, STAGE)
    Tensor tSrdO = thr_sdp.partition_fragment_A(sdO);
    Tensor tSrK = thr_sdp.partition_fragment_B(sK);       // (MMA, MMA_N, MMA_K)
    Tensor tSrV = thr_sdp.partition_fragment_B(sV);
    Tensor tdVrdOt = thr_dkv.partition_fragment_A(sdOt);  // (MMA, 2, MMA_K, STAGE)
    Tensor tdKrQt = thr_dkv.partition_fragment_A(sQt);
    Tensor tdVrP = thr_dkv.partition_fragment_B(sP);      // (MMA, 1, MMA_K, BUF)
    Tensor tdKrdS = thr_dkv.partition_fragment_B(sdS);
    Tensor tdQrdSt = thr_dq.partition_fragment_B(sdSt);   // (MMA, 1, MMA_K, BUF)
    // A of dQ^T half c: D rows [128c, 128c + 128) of K^T.
    auto kt_half = Shape<Int<kD / 2>, Int<kN>>{};
    Tensor tdQrKt0 = thr_dq.partition_fragment_A(local_tile(sKt, kt_half, make_coord(0, 0)));
    Tensor tdQrKt1 = thr_dq.partition_fragment_A(local_tile(sKt, kt_half, make_coord(1, 0)));
    Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kN>>{}));
    Tensor cRC = make_tensor(tScS.data(), acc_layout_rowcol(tScS.layout()));  // (row, col)
    const int key0 = int(get<1>(cRC(0, 0)));

    auto s2s = make_tiled_copy_C(typename Traits::SmemCopyPdS{}, mma_sdp);
    auto thr_s2s = s2s.get_thread_slice(tidx);
    Tensor tPsP = thr_s2s.partition_D(sPt);    // (CPY, CPY_M, CPY_N, BUF)
    Tensor tdSsdS = thr_s2s.partition_D(sdSt);

    Tensor acc_dk = partition_fragment_C(mma_dkv, Shape<Int<kD>, Int<kN>>{});
    Tensor acc_dv = partition_fragment_C(mma_dkv, Shape<Int<kD>, Int<kN>>{});
    clear(acc_dk);
    clear(acc_dv);

    const float scale_log2 = p.softmax_scale_log2;
    const int sq = si.sq, sk = si.sk;
    const int64_t dq_tile0 = bwd_dq_tile_base(varlen, b, si.q_start, p.seqlen_q,
                                             bwd_layout_block_m(kD));
    const int dq_lane_off = dq_frag_offset(0, tidx, 0);
    ss.kv_ready.wait(0);  // K/V landed (and, varlen, its tail zeroed: clear_kv_tail)
    typename PipelineQ::PipelineState st_q;
    typename PipelinedO::PipelineState st_do;

    for (int it = 0; it < total; ++it) {
      const int h = hk * group + it % group, m = range.end - 1 - it / group;
      const int m0 = m * kM;
      const int buf = it & 1;
      ss.q_ready[st_q.index()].wait(st_q.phase());  // landed (and tail zeroed: warps 2-3)
      const int s = st_q.index();
      Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<kM>, Int<kN>>{});
      wg_gemm<true>(mma_sdp, tSrQ(_, _, _, s), tSrK, acc_s);
      ss.do_ready[st_do.index()].wait(st_do.phase());
      const int sd = st_do.index();
      Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<kM>, Int<kN>>{});
      wg_gemm<true>(mma_sdp, tSrdO(_, _, _, sd), tSrV, acc_dp);
      const float* s_lse = ss.smem_lse.data() + s * kM;
      const float* s_d = ss.smem_d.data() + sd * kM;
      const bool need_mask = n0 + kN > sk || m0 + kM > sq ||
                             !tile_fully_visible(m, n_block, kM, kN, sq, sk, wl, wr);
      // Query r (of this query tile) sees key c (of this KV tile) iff c < key_lim, r < q_lim and
      // d_lo <= c - r <= d_hi (tile_mask).
      const TileMask tm = tile_mask(need_mask, m0, n0, sq, sk, wl, wr);
      const int key_lim = tm.key_lim, q_lim = tm.q_lim, d_hi = tm.d_hi, d_lo = tm.d_lo;
      Tensor rP = make_tensor_like<Element>(acc_s);
      warpgroup_wait<1>();
      {
        // Per row, the bounds become limits on the key's offset from this thread's first key
        // (a compile-time constant per register): two compares per element, no per-element
        // loop invariants.
        // Softcap: t = tanh(S * softmax_scale / c), P = exp2(t * c*log2e - lse2[q]) (masked: 0)
        // is converted here pair by pair (registers c, c + 1 are adjacent) and S's registers
        // keep P * (1 - t^2), so dS = P * (1 - t^2) * (dP - D) below is the same code as without
        // the cap and t needs no registers of its own.
        Tensor sRC = make_tensor(acc_s.data(), acc_layout_rowcol(acc_s.layout()));
        Tensor pRC = make_tensor(rP.data(), acc_layout_rowcol(rP.layout()));
        cutlass::NumericArrayConverter<Element, float, 2> cvt2;
        cutlass::Array<float, 2> pv2;
#pragma unroll
        for (int r = 0; r < size<0>(sRC); ++r) {
          const int q = int(get<0>(cRC(r, 0)));
          const int hi = min(d_hi + q, key_lim - 1) - key0, lo = d_lo + q - key0;
          const bool row_ok = q < q_lim;
          const float lse = s_lse[q];
#pragma unroll
          for (int c = 0; c < size<1>(sRC); ++c) {
            const int kc = int(get<1>(cRC(r, c))) - key0;
            const bool vis = row_ok && kc <= hi && kc >= lo;
            if constexpr (!kSoftcap) {
              const float pv = fast_exp2(sRC(r, c) * scale_log2 - lse);
              sRC(r, c) = vis ? pv : 0.f;
            } else {
              const float t = tanh_approx(sRC(r, c) * kp.cap_in);
              pv2[c % 2] = vis ? fast_exp2(t * kp.cap_log2 - lse) : 0.f;
              sRC(r, c) = pv2[c % 2] * (1.f - t * t);
              if (c % 2 == 1)
                *reinterpret_cast<cutlass::Array<Element, 2>*>(&pRC(r, c - 1)) = cvt2(pv2);
            }
          }
        }
      }
      if constexpr (!kSoftcap) convert_fragment(rP, acc_s);
      copy(s2s, thr_s2s.retile_S(rP), tPsP(_, _, _, buf));
      warpgroup_wait<0>();
      {
        Tensor sRC = make_tensor(acc_s.data(), acc_layout_rowcol(acc_s.layout()));
        Tensor dRC = make_tensor(acc_dp.data(), acc_layout_rowcol(acc_dp.layout()));
#pragma unroll
        for (int r = 0; r < size<0>(dRC); ++r) {
          const float dsum = s_d[int(get<0>(cRC(r, 0)))];
#pragma unroll
          for (int c = 0; c < size<1>(dRC); ++c) dRC(r, c) = sRC(r, c) * (dRC(r, c) - dsum);
        }
      }
      {
        Tensor rdS = make_tensor_like<Element>(acc_dp);
        convert_fragment(rdS, acc_dp);
        copy(s2s, thr_s2s.retile_S(rdS), tdSsdS(_, _, _, buf));
      }
      cutlass::arch::fence_view_async_shared();
      cutlass::arch::NamedBarrier::sync(Traits::kNumMmaThreads, 1);  // all of P and dS in smem

      wg_gemm<false>(mma_dkv, tdVrdOt(_, _, _, sd), tdVrP(_, _, _, buf), acc_dv);
      wg_gemm<false>(mma_dkv, tdKrQt(_, _, _, s), tdKrdS(_, _, _, buf), acc_dk);
      Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kD / 2>, Int<kM>>{});
      static_assert(decltype(size(acc_dq))::value == Traits::kDqFrag);
      wg_gemm<true>(mma_dq, tdQrKt0, tdQrdSt(_, _, _, buf), acc_dq);
      warpgroup_wait<2>();
      pipe_do.consumer_release(st_do);  // dV^T done: last reader of dO
      ++st_do;
      warpgroup_wait<1>();
      pipe_q.consumer_release(st_q);    // dK^T done: last reader of Q
      ++st_q;

      float* dst = kp.dq_accum +
                   (int64_t(h) * kp.dq_rows + (dq_tile0 + m) * kM) * kD + dq_lane_off;
      // Deterministic mode: the semaphore warp opens kBarSemReady once the lower KV tiles'
      // atomics to this query tile are published.
      if (bp.deterministic)
        cutlass::arch::NamedBarrier::sync(Traits::kNumMmaThreads + 32, kBarSemReady);
      auto add_half = [&](int c) {
#pragma unroll
        for (int g = 0; g < Traits::kDqFrag / 4; ++g)
          atomicAdd(reinterpret_cast<float4*>(dst + c * 8192 + g * 512),
                    make_float4(acc_dq(4 * g), acc_dq(4 * g + 1), acc_dq(4 * g + 2),
                                acc_dq(4 * g + 3)));
      };
      warpgroup_wait<0>();
      add_half(0);
      wg_gemm<true>(mma_dq, tdQrKt1, tdQrdSt(_, _, _, buf), acc_dq);
      warpgroup_wait<0>();
      add_half(1);
      if (bp.deterministic)
        cutlass::arch::NamedBarrier::arrive(Traits::kNumMmaThreads + 32, kBarDqAdded);
    }

    // Epilogue: dK = scale * dK, dV; the accumulators are (D, keys): 2-byte stores, keys < sk,
    // D < head_dim (the rest is the zero-loaded padding of a narrower head_dim).
    const float scale = p.softmax_scale;
    constexpr int kAcc = decltype(size(acc_dk))::value;
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc_dk(i) *= scale;
    Tensor tcKV = thr_dkv.partition_C(make_identity_tensor(Shape<Int<kD>, Int<kN>>{}));
    auto store = [&](auto& acc, Element* g, int64_t row_stride, int d_end) {
      cutlass::NumericArrayConverter<Element, float, kAcc> cvt_kv;
      cutlass::Array<Element, kAcc> r =
          cvt_kv(*reinterpret_cast<const cutlass::Array<float, kAcc>*>(acc.data()));
#pragma unroll
      for (int i = 0; i < kAcc; ++i) {
        const int d = int(get<0>(tcKV(i))), key = int(get<1>(tcKV(i)));
        if (key < rows_k && d < d_end) g[int64_t(key) * row_stride + d] = r[i];
      }
    };
    // Two copies of the stores, the full width's without a column test: one copy testing
    // d < head_dim raised the spills from 112 / 176 to 152 / 214 bytes, two give 108 / 172.
    if (p.head_dim == kD) {
      store(acc_dk, gdK, bp.dk_row_stride, kD);
      store(acc_dv, gdV, bp.dv_row_stride, kD);
    } else {
      store(acc_dk, gdK, bp.dk_row_stride, p.head_dim);
      store(acc_dv, gdV, bp.dv_row_stride, p.head_dim);
    }
  }
#endif
}

// Step 3 for this kernel: dq = softmax_scale * accumulator, read in fragment order. One CTA of
// 256 threads per (head, query tile), grid-stride: thread j reads the float4s consumer thread j
// added (coalesced), puts each value at its (query, D) place in a 64 x 256 smem tile of the
// output dtype, then the tile's rows < seqlen_q, columns < head_dim, are written with 16-byte
// stores. Tiles past a varlen sequence's end (the gap tile between sequences) are skipped.
template <typename Traits>
__global__ void __launch_bounds__(256)
    flash_bwd_postprocess_frag_kernel(BwdParams p, int64_t dq_tiles,
                                      const float* __restrict__ dq_accum) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kM = Traits::kBlockM, kD = Traits::kHeadDim;
  constexpr int kPitch = kD + 8;  // elements per smem row: 16-byte aligned rows, shifted banks
  static_assert(Traits::kNumMmaThreads == 256);
  __shared__ alignas(16) Element tile[kM * kPitch];
  const FwdParams& f = p.fwd;
  const bool varlen = f.cu_seqlens_q != nullptr;
  const int tid = threadIdx.x;
  const auto coords = bwd_sm90::dq_frag_coords<Traits>(tid);
  const int lane_off = bwd_sm90::dq_frag_offset(0, tid, 0);
  const float scale = f.softmax_scale;
  const int64_t n = int64_t(f.heads) * dq_tiles;
  for (int64_t job = blockIdx.x; job < n; job += gridDim.x) {
    const int h = int(job / dq_tiles);
    const int64_t tile_idx = job % dq_tiles;
    int b = 0;
    int64_t m = 0;
    bwd_dq_tile_owner(f.cu_seqlens_q, f.batch, f.seqlen_q, bwd_layout_block_m(kD), tile_idx,
                      b, m);
    int sq = f.seqlen_q;
    int64_t row0 = m * kM;  // batched: row in sequence b; varlen: packed row
    if (varlen) {
      sq = f.cu_seqlens_q[b + 1] - f.cu_seqlens_q[b];
      row0 += f.cu_seqlens_q[b];
    }
    const int rows = int(min(int64_t(kM), int64_t(sq) - m * kM));
    if (rows <= 0) continue;  // uniform over the CTA
    const float* src = dq_accum + job * Traits::kDqTileFloats + lane_off;
#pragma unroll
    for (int c = 0; c < 2; ++c) {
#pragma unroll
      for (int g = 0; g < Traits::kDqFrag / 4; ++g) {
        const float4 x = *reinterpret_cast<const float4*>(src + c * 8192 + g * 512);
        const float v[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int d = c * (kD / 2) + int(get<0>(coords(4 * g + e)));
          const int q = int(get<1>(coords(4 * g + e)));
          tile[q * kPitch + d] = Element(v[e] * scale);
        }
      }
    }
    __syncthreads();
    Element* dst = reinterpret_cast<Element*>(p.dq) + (varlen ? 0 : b * p.dq_batch_stride) +
                   int64_t(h) * p.dq_head_stride;
    const int chunks = f.head_dim / 8;  // the tile is kD wide, dq head_dim <= kD
    for (int t = tid; t < rows * chunks; t += 256) {
      const int r = t / chunks, cc = (t % chunks) * 8;
      *reinterpret_cast<uint4*>(dst + (row0 + r) * p.dq_row_stride + cc) =
          *reinterpret_cast<const uint4*>(&tile[r * kPitch + cc]);
    }
    __syncthreads();
  }
}

}  // namespace flash
}  // namespace longctx
