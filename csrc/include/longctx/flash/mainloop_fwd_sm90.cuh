// Main loop of the Hopper forward kernel: the TMA producer and the wgmma/softmax consumers.
//
// Producer (one thread of warpgroup 0): loads the Q tile once (its own transaction barrier),
// then for n = n_max-1 down to n_min loads K(n) and V(n) into stage s of two PipelineTmaAsync
// rings (kStages deep; the TMA zero-fills rows past the tensor's end).
// Consumers (warpgroups 1 .. kBlockM / 64; 64 query rows each), intra-warpgroup overlapped as
// in FA3:
//   S(n_max-1) = Q K^T ; softmax -> P
//   for n = n_max-2 .. n_min:  issue S(n) = Q K(n)^T ; issue O += P V(n+1) ;
//                              wait S ; release K ; [softcap +] mask + softmax(S(n)) -> P', scale ;
//                              wait PV ; release V(n+1) ; O *= scale ; P = P'
//   O += P V(n_min)
// so the softmax of tile n runs while the tensor cores do P V(n+1). At hdim 64/128 the loop
// steps of the consumers also take turns (ConsumerPingPong): one's softmax runs under the
// others' wgmmas. Tiles are walked from the
// last (the diagonal, masked ones first) to the first. The per-element mask is applied only to
// tiles mask.h's tile_needs_mask flags; with softcap (the kSoftcap copy of the loop) S is capped
// just before it (apply_softcap). Invariants: consumer and producer walk the same tile range;
// each pipeline state advances exactly once per KV tile on both sides and persists across the
// query tiles of a persistent CTA; the Q barriers flip once per query tile that loads Q
// (q_iter counts those), barrier_q_empty tells the producer sQ may be overwritten.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>
#include "longctx/flash/flash_fwd_traits.cuh"
#include <math_constants.h>
#include "longctx/flash/mask.h"
#include "longctx/flash/smem_tail_rows.cuh"
#include "longctx/flash/softmax.cuh"
#include "longctx/tanh_approx.cuh"

namespace longctx {
namespace flash {

// wgmma over the K mode of the operands; zero_init overwrites the accumulator.
template <bool kZeroInit, typename TiledMma, typename TA, typename TB, typename TC>
__device__ __forceinline__ void wg_gemm(TiledMma& tiled_mma, const TA& tA, const TB& tB, TC& tC) {
  using namespace cute;
  constexpr bool kIsRS = !cute::is_base_of<cute::GMMA::DescriptorIterator, typename TiledMma::FrgTypeA>::value;
  if constexpr (kIsRS) warpgroup_fence_operand(const_cast<TA&>(tA));
  warpgroup_fence_operand(tC);
  warpgroup_arrive();
  if constexpr (kZeroInit) tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
  #pragma unroll
  for (int k = 0; k < size<2>(tA); ++k) {
    cute::gemm(tiled_mma, tA(_, _, k), tB(_, _, k), tC);
    tiled_mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(tC);
  if constexpr (kIsRS) warpgroup_fence_operand(const_cast<TA&>(tA));
}

template <typename Traits, typename TmaQ, typename TmaKV, typename GQ, typename GK, typename GV>
__device__ __forceinline__ void producer_load(typename Traits::SharedStorage& ss,
                                              const TmaQ& tma_q, const TmaKV& tma_k,
                                              const TmaKV& tma_v, const GQ& gQ, const GK& gK,
                                              const GV& gV,
                                              typename Traits::MainloopPipeline& pipe_k,
                                              typename Traits::MainloopPipeline& pipe_v,
                                              typename Traits::PipelineState& st, int q_iter,
                                              int n_min, int n_max) {
  using namespace cute;
  Tensor sQ = make_tensor(make_smem_ptr(ss.smem_q.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.smem_k.data()), typename Traits::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(ss.smem_v.data()), typename Traits::SmemLayoutV{});
  auto [tQgQ, tQsQ] = tma_partition(tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
  auto [tKgK, tKsK] = tma_partition(tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
  auto [tVgV, tVsV] = tma_partition(tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));

  // Persistent CTA: the previous tile's consumers must be done reading sQ (their last
  // S = Q K^T has completed) before it is overwritten. q_iter = Q tiles loaded before this one.
  // The first K tile is issued before that wait, so it overlaps the previous tile's tail.
  int n = n_max - 1;
  pipe_k.producer_acquire(st);
  copy(tma_k.with(*pipe_k.producer_get_barrier(st), 0), tKgK(_, n), tKsK(_, st.index()));
  if (q_iter > 0) ss.barrier_q_empty.wait((q_iter - 1) & 1);
  ss.barrier_q.arrive_and_expect_tx(Traits::kTmaBytesQ);
  copy(tma_q.with(reinterpret_cast<uint64_t&>(ss.barrier_q), 0), tQgQ, tQsQ);
  pipe_v.producer_acquire(st);
  copy(tma_v.with(*pipe_v.producer_get_barrier(st), 0), tVgV(_, n), tVsV(_, st.index()));
  ++st;

  for (n = n_max - 2; n >= n_min; --n) {
    pipe_k.producer_acquire(st);
    copy(tma_k.with(*pipe_k.producer_get_barrier(st), 0), tKgK(_, n), tKsK(_, st.index()));
    pipe_v.producer_acquire(st);
    copy(tma_v.with(*pipe_v.producer_get_barrier(st), 0), tVgV(_, n), tVsV(_, st.index()));
    ++st;
  }
}

struct MaskArgs {
  int m_block, sq, sk, window_left, window_right;
  // Varlen: the first V row of the tile's last KV tile (n_max - 1, processed first) that belongs
  // to the next packed sequence, or kBlockN when there is none (batched launches: the TMA
  // zero-fills rows past the tensor).
  int v_tail_row;
};

// Sets S(i, j) = -inf in an S tile held in wgmma accumulators where key j is invisible to query
// i (mask.h's rule in 32-bit arithmetic: positions are < 2^31): i = m0 + row, j = n0 + col, with
// (row, col) from an identity tensor partitioned like the accumulator (tScS).
template <typename TensorS, typename TensorC>
__device__ __forceinline__ void apply_mask(TensorS& tSrS, const TensorC& tScS, int m0, int n0,
                                           int sq, int sk, int window_left, int window_right) {
  const int diag = sk - sq;
  #pragma unroll
  for (int i = 0; i < cute::size(tSrS); ++i) {
    const int row = m0 + int(cute::get<0>(tScS(i)));
    const int col = n0 + int(cute::get<1>(tScS(i)));
    bool vis = col < sk;
    if (window_right >= 0) vis = vis && (col <= row + diag + window_right);
    if (window_left >= 0) vis = vis && (col >= row + diag - window_left);
    if (!vis) tSrS(i) = -CUDART_INF_F;
  }
}

// Logit softcapping of an S tile: S = tanh(S * softcap_in), softcap_in = softmax_scale / c (the
// softmax then scales by c). Runs before the mask, so masked entries stay -inf; NaN stays NaN.
template <typename TensorS>
__device__ __forceinline__ void apply_softcap(TensorS& tSrS, float softcap_in) {
  #pragma unroll
  for (int i = 0; i < cute::size(tSrS); ++i) tSrS(i) = tanh_approx(tSrS(i) * softcap_in);
}

// Ping-pong of the consumer warpgroups (Traits::kPingPong; FA3's warp-scheduler barriers). In
// each main-loop step a warpgroup issues its S and P V wgmmas only in its turn and passes the
// turn to the next consumer (round robin over kConsumers) once they are issued, so the steps of
// the warpgroups alternate on the tensor cores and one warpgroup's softmax runs under the
// others' products. Consumer c waits on named barrier kFirstId + c (its 128 threads plus the
// 128 of the consumer before it arriving) and arrives on the next one's; consumer 0 holds the
// first turn (init). All consumers of a CTA run the same tiles with the same number of steps,
// so the turns stay balanced; the one arrival left over at exit is harmless. Ids are CUTLASS
// user ids (offset past its reserved ones); the V tail and the epilogue take the ids after them.
template <int kConsumers>
struct ConsumerPingPong {
  static constexpr uint32_t kFirstId = 0;
  static constexpr uint32_t kNextFreeId = kFirstId + kConsumers;
  static constexpr uint32_t kThreads = 256;
  __device__ __forceinline__ static void init(int consumer) {
    if (consumer == 0) cutlass::arch::NamedBarrier::arrive(kThreads, kFirstId);
  }
  __device__ __forceinline__ static void wait_turn(int consumer) {
    cutlass::arch::NamedBarrier::sync(kThreads, kFirstId + consumer);
  }
  __device__ __forceinline__ static void pass_turn(int consumer) {
    const int next = kConsumers == 2            ? 1 - consumer
                     : consumer + 1 == kConsumers ? 0
                                                  : consumer + 1;
    cutlass::arch::NamedBarrier::arrive(kThreads, kFirstId + next);
  }
};
// Named barrier of clear_v_tail (all consumers), after the ping-pong's ids.
template <typename Traits>
constexpr uint32_t kVTailBarrier = ConsumerPingPong<Traits::kNumMmaWarpGroups>::kNextFreeId;

// Zeroes rows [row0, kBlockN) of V stage `stage` before any P V reads it: those rows belong to
// the next packed sequence, and a masked key's P = 0 times a NaN (or inf) there would give NaN
// (0 x NaN) in rows of this sequence. All consumer warpgroups take part (named barrier
// kVTailBarrier); it runs once per query tile whose KV range ends inside a tile, in varlen
// launches only.
template <typename Traits>
__device__ __forceinline__ void clear_v_tail(typename Traits::SharedStorage& ss, int stage,
                                             int row0, int mma_tidx) {
  using namespace cute;
  Tensor sV = make_tensor(make_smem_ptr(ss.smem_v.data()), typename Traits::SmemLayoutV{});
  zero_tail_rows<Traits::kNumMmaThreads>(sV(_, _, stage), row0, mma_tidx);
  cutlass::arch::NamedBarrier::sync(Traits::kNumMmaThreads, kVTailBarrier<Traits>);
}

// Runs the consumer main loop; returns O (unnormalized) in tOrO and the softmax state.
// kSoftcap: S is capped with softcap_in = softmax_scale / c (apply_softcap). The kernel picks the
// instantiation once per tile: a test of softcap_in inside the loop costs hdim 64 about 5%.
template <typename Traits, bool kSoftcap, typename TensorO, typename Softmax>
__device__ __forceinline__ void consumer_mma(typename Traits::SharedStorage& ss, int mma_tidx,
                                             typename Traits::MainloopPipeline& pipe_k,
                                             typename Traits::MainloopPipeline& pipe_v,
                                             typename Traits::PipelineState& st_k,
                                             typename Traits::PipelineState& st_v, int q_iter,
                                             int n_min, int n_max, const MaskArgs& ma,
                                             float softcap_in, TensorO& tOrO, Softmax& softmax) {
  using namespace cute;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  using Element = typename Traits::Element;
  using PingPong = ConsumerPingPong<Traits::kNumMmaWarpGroups>;
  typename Traits::TiledMma0 tiled_mma0;
  typename Traits::TiledMma1 tiled_mma1;
  const int consumer = __shfl_sync(0xffffffffu, mma_tidx / 128, 0);  // warp-uniform
  auto thr_mma0 = tiled_mma0.get_thread_slice(mma_tidx);
  auto thr_mma1 = tiled_mma1.get_thread_slice(mma_tidx);

  Tensor sQ = make_tensor(make_smem_ptr(ss.smem_q.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.smem_k.data()), typename Traits::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.smem_v.data()), typename Traits::SmemLayoutVt{});
  Tensor tSrQ = thr_mma0.partition_fragment_A(sQ);   // (MMA, MMA_M, MMA_K)
  Tensor tSrK = thr_mma0.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, PIPE)
  Tensor tOrV = thr_mma1.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, PIPE)

  Tensor tSrS = partition_fragment_C(tiled_mma0, select<0, 1>(typename Traits::TileShape_MNK{}));
  Tensor cS = make_identity_tensor(select<0, 1>(typename Traits::TileShape_MNK{}));
  Tensor tScS = thr_mma0.partition_C(cS);
  Tensor tOrP = make_tensor<Element>(acc_layout_to_A_regs(tSrS.layout()));
  Tensor S_rc = make_tensor(tSrS.data(), acc_layout_rowcol(tSrS.layout()));
  Tensor O_rc = make_tensor(tOrO.data(), acc_layout_rowcol(tOrO.layout()));

  auto convert_p = [&]() { convert_fragment(tOrP, tSrS); };
  auto cap_and_mask = [&](int n) {
    if constexpr (kSoftcap) apply_softcap(tSrS, softcap_in);
    if (tile_needs_mask(ma.m_block, n, kBlockM, kBlockN, ma.sq, ma.sk, ma.window_left,
                        ma.window_right)) {
      apply_mask(tSrS, tScS, ma.m_block * kBlockM, n * kBlockN, ma.sq, ma.sk, ma.window_left,
                 ma.window_right);
    }
  };

  ss.barrier_q.wait(q_iter & 1);

  int n = n_max - 1;
  pipe_k.consumer_wait(st_k);
  wg_gemm<true>(tiled_mma0, tSrQ, tSrK(_, _, _, st_k.index()), tSrS);
  warpgroup_wait<0>();
  pipe_k.consumer_release(st_k);
  ++st_k;
  cap_and_mask(n);
  softmax.first_step(S_rc);
  convert_p();
  if (ma.v_tail_row < kBlockN) {
    pipe_v.consumer_wait(st_v);  // V(n_max - 1) landed (the later wait returns at once)
    clear_v_tail<Traits>(ss, st_v.index(), ma.v_tail_row, mma_tidx);
  }

  for (n = n_max - 2; n >= n_min; --n) {
    pipe_k.consumer_wait(st_k);
    if constexpr (Traits::kPingPong) PingPong::wait_turn(consumer);
    wg_gemm<true>(tiled_mma0, tSrQ, tSrK(_, _, _, st_k.index()), tSrS);
    pipe_v.consumer_wait(st_v);
    wg_gemm<false>(tiled_mma1, tOrP, tOrV(_, _, _, st_v.index()), tOrO);
    if constexpr (Traits::kPingPong) PingPong::pass_turn(consumer);
    warpgroup_wait<1>();
    warpgroup_fence_operand(tSrS);
    pipe_k.consumer_release(st_k);
    ++st_k;
    cap_and_mask(n);
    float scale_o[2];
    softmax.step(S_rc, scale_o);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
    pipe_v.consumer_release(st_v);
    ++st_v;
    rescale_rows(O_rc, scale_o);
    convert_p();
  }
  // Every S = Q K^T of this tile has completed: sQ may be refilled for the next tile.
  ss.barrier_q_empty.arrive();
  pipe_v.consumer_wait(st_v);
  wg_gemm<false>(tiled_mma1, tOrP, tOrV(_, _, _, st_v.index()), tOrO);
  warpgroup_wait<0>();
  warpgroup_fence_operand(tOrO);
  pipe_v.consumer_release(st_v);
  ++st_v;
}

}  // namespace flash
}  // namespace longctx
