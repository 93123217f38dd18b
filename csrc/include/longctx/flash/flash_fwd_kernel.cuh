// The Hopper (sm_90a) flash-attention forward kernel: persistent CTAs over (query tile, head, batch).
//
// Computes out = softmax(softmax_scale * Q K^T + mask) V and lse (natural log, fp32), one tile
// of kBlockM query rows (128; 192 for hdim 64's long query sequences) of one head at a time;
// the CTA is persistent and walks the tiles tile_scheduler.cuh gives it (longest first within
// L2-sized sections of heads). Warpgroup 0 drops its registers (setmaxnreg) and one of its threads
// issues the TMA loads; the kBlockM / 64 consumer warpgroups (64 rows each) raise theirs and run
// the wgmma main loop (mainloop_fwd_sm90.cuh), the online softmax (softmax.cuh) and the
// epilogue (epilogue_fwd.cuh: at head dims up to 128 in batched launches each consumer
// warpgroup's 64 rows go out by one TMA store from smem). The K/V pipeline runs on across query
// tiles, so the next tile's first K/V loads overlap the current tile's last P V and epilogue.
// A tile whose rows see no key writes out = 0, lse = -inf (with sinks: the head's sink) and loads
// nothing.
// Logit mods (logit_mods.h), both runtime switches that are uniform over the launch, neither a
// kernel instantiation: softcap picks, once per tile, the main-loop copy that caps S before the
// mask (consumer_mma<Traits, true>); the head's sink (read once per tile, after the main loop)
// joins the softmax denominator in finalize (softmax.cuh).
// GQA: kv head = head / (heads / heads_kv).
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>
#include "longctx/flash/epilogue_fwd.cuh"
#include "longctx/flash/flash_fwd_traits.cuh"
#include "longctx/flash/flash_params.h"
#include "longctx/flash/mainloop_fwd_sm90.cuh"
#include "longctx/flash/softmax.cuh"
#include "longctx/flash/mask.h"
#include "longctx/flash/tile_scheduler.cuh"

namespace longctx {
namespace flash {

template <typename Traits>
struct FwdKernelParams {
  FwdParams p;
  typename Traits::ShapeQKV shape_q, shape_k;  // (rows, D, heads, batch) as the TMA sees them
  typename Traits::TMA_Q tma_q;
  typename Traits::TMA_KV tma_k, tma_v;
  typename Traits::TMA_O tma_o;  // used when tma_store_o
  bool tma_store_o;  // O through smem and a TMA store (batched, Traits::kTmaStoreO, out strides)
  FwdTileScheduler sched;
  int* tile_counter;  // zeroed before launch; nullptr: static round-robin schedule
};

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNumThreads, 1)
flash_fwd_sm90_kernel(const __grid_constant__ FwdKernelParams<Traits> kp) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using namespace cute;
  using Element = typename Traits::Element;
  using MainloopPipeline = typename Traits::MainloopPipeline;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;

  extern __shared__ __align__(1024) char smem_buf[];
  auto& ss = *reinterpret_cast<typename Traits::SharedStorage*>(smem_buf);
  const FwdParams& p = kp.p;

  const int warp_idx = cutlass::canonical_warp_idx_sync();
  const int warp_group_idx = warp_idx / 4;
  const int lane_predicate = cute::elect_one_sync();

  if (warp_idx == 0 && lane_predicate) {
    ss.barrier_q.init(1);
    ss.barrier_q_empty.init(Traits::kNumMmaThreads);
    for (int i = 0; i < 2; ++i) {
      ss.tile_full[i].init(1);
      ss.tile_empty[i].init(Traits::kNumMmaThreads);
    }
    cute::prefetch_tma_descriptor(kp.tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(kp.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(kp.tma_v.get_tma_descriptor());
    if (kp.tma_store_o) cute::prefetch_tma_descriptor(kp.tma_o.get_tma_descriptor());
  }
  typename MainloopPipeline::Params pp;
  pp.role = warp_group_idx == 0 ? MainloopPipeline::ThreadCategory::Producer
                                : MainloopPipeline::ThreadCategory::Consumer;
  pp.is_leader = threadIdx.x == 0;
  pp.num_consumers = Traits::kNumMmaThreads;
  pp.transaction_bytes = Traits::kTmaBytesK;
  MainloopPipeline pipe_k(ss.pipeline_k, pp, Shape<_1, _1, _1>{});
  pp.transaction_bytes = Traits::kTmaBytesV;
  MainloopPipeline pipe_v(ss.pipeline_v, pp, Shape<_1, _1, _1>{});
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  const FwdTileScheduler& sched = kp.sched;
  int q_iter = 0;  // query tiles of this CTA that loaded Q (the Q barriers' phase count)
  if (warp_group_idx == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (threadIdx.x == 0) {
      typename Traits::PipelineState st =
          cutlass::make_producer_start_state<MainloopPipeline>();
      Tensor mQ = kp.tma_q.get_tma_tensor(kp.shape_q);
      Tensor mK = kp.tma_k.get_tma_tensor(kp.shape_k);
      Tensor mV = kp.tma_v.get_tma_tensor(kp.shape_k);
      // Next tile: dynamic (atomic counter, greedy: a CTA takes the next tile in the
      // longest-first order as soon as its producer has issued the current one) or static.
      auto next_tile = [&](int t) {
        return kp.tile_counter != nullptr ? int(gridDim.x) + atomicAdd(kp.tile_counter, 1)
                                          : t + int(gridDim.x);
      };
      int t = blockIdx.x;
      for (int it = 0;; ++it) {
        // Varlen: tiles past their sequence's end are skipped here, while the consumers still
        // work on the previous tile; only tiles the consumers write are handed off.
        int m_block = 0, h = 0, b = 0;
        for (; t < sched.total; t = next_tile(t)) {
          sched.decode(t, m_block, h, b);
          if (m_block * kBlockM < sequence(p, b).sq) break;
        }
        // Hand tile t to the consumers (slot it % 2; wait until they read the id written two
        // hand-offs ago), then load it; t >= total tells them to stop.
        const int slot = it & 1, use = it >> 1;
        if (use > 0) ss.tile_empty[slot].wait((use - 1) & 1);
        ss.tile_ids[slot] = t;
        ss.tile_full[slot].arrive();
        if (t >= sched.total) break;
        t = next_tile(t);
        const SeqLen si = sequence(p, b);
        const TileRange tr = fwd_key_tiles(m_block, kBlockM, kBlockN, si.sq, si.sk,
                                           p.window_left, p.window_right);
        if (tr.end <= tr.begin) continue;  // no key visible: nothing to load
        const int h_kv = h / (p.heads / p.heads_kv);
        Tensor gQ = local_tile(domain_offset(make_coord(si.q_start, _0{}), mQ(_, _, h, si.tma_batch())),
                               select<0, 2>(typename Traits::TileShape_MNK{}), make_coord(m_block, _0{}));
        Tensor gK = local_tile(domain_offset(make_coord(si.k_start, _0{}), mK(_, _, h_kv, si.tma_batch())),
                               select<1, 2>(typename Traits::TileShape_MNK{}), make_coord(_, _0{}));
        Tensor gV = local_tile(domain_offset(make_coord(si.k_start, _0{}), mV(_, _, h_kv, si.tma_batch())),
                               select<1, 2>(typename Traits::TileShape_MNK{}), make_coord(_, _0{}));
        producer_load<Traits>(ss, kp.tma_q, kp.tma_k, kp.tma_v, gQ, gK, gV, pipe_k, pipe_v, st,
                              q_iter, tr.begin, tr.end);
        ++q_iter;
      }
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
    const int mma_tidx = int(threadIdx.x) - 128;
    if constexpr (Traits::kPingPong)
      ConsumerPingPong<Traits::kNumMmaWarpGroups>::init(mma_tidx / 128);
    typename Traits::PipelineState st_k, st_v;  // consumer start state: index 0, phase 0
    typename Traits::TiledMma1 tiled_mma1;
    for (int it = 0;; ++it) {
      const int slot = it & 1, use = it >> 1;
      ss.tile_full[slot].wait(use & 1);
      const int t = ss.tile_ids[slot];
      ss.tile_empty[slot].arrive();
      if (t >= sched.total) break;
      int m_block, h, b;
      sched.decode(t, m_block, h, b);
      const SeqLen si = sequence(p, b);  // the producer hands off only tiles inside it
      const TileRange tr = fwd_key_tiles(m_block, kBlockM, kBlockN, si.sq, si.sk,
                                         p.window_left, p.window_right);
      Tensor tOrO = partition_fragment_C(tiled_mma1, select<0, 2>(typename Traits::TileShape_MNK{}));
      clear(tOrO);
      // Softcap: the main loop turns S into tanh(S * softmax_scale / c) and the softmax scale
      // becomes c (mainloop_fwd_sm90.cuh).
      const float softcap = p.mods.softcap;
      const float score_scale = softcap != 0.f ? softcap : p.softmax_scale;
      OnlineSoftmax<2> softmax(softcap != 0.f ? softcap * 1.4426950408889634f
                                              : p.softmax_scale_log2);
      if (tr.end > tr.begin) {
        const int v_tail = si.sk - (tr.end - 1) * kBlockN;  // rows of the last KV tile in sk
        const MaskArgs ma{m_block, si.sq, si.sk, p.window_left, p.window_right,
                          p.cu_seqlens_k != nullptr && v_tail < kBlockN ? v_tail : kBlockN};
        if (softcap != 0.f) {
          consumer_mma<Traits, true>(ss, mma_tidx, pipe_k, pipe_v, st_k, st_v, q_iter, tr.begin,
                                     tr.end, ma, p.softmax_scale / softcap, tOrO, softmax);
        } else {
          consumer_mma<Traits, false>(ss, mma_tidx, pipe_k, pipe_v, st_k, st_v, q_iter,
                                      tr.begin, tr.end, ma, 0.f, tOrO, softmax);
        }
        ++q_iter;
      }
      float inv_sum[2], lse[2];
      softmax.finalize(score_scale, p.mods.sinks != nullptr ? p.mods.sinks[h] : -CUDART_INF_F,
                       inv_sum, lse);
      Tensor O_rc = make_tensor(tOrO.data(), acc_layout_rowcol(tOrO.layout()));
      rescale_rows(O_rc, inv_sum);
      auto thr_mma1 = tiled_mma1.get_thread_slice(mma_tidx);
      Tensor cO = make_identity_tensor(select<0, 2>(typename Traits::TileShape_MNK{}));
      Tensor tOcO = thr_mma1.partition_C(cO);
      if constexpr (Traits::kTmaStoreO) {
        if (kp.tma_store_o)
          store_o_tma<Traits>(ss, kp.tma_o, kp.shape_q, mma_tidx, m_block, h, b, tOrO);
        else
          store_o<Element>(p, si, h, m_block * kBlockM, tOrO, tOcO);
      } else {
        store_o<Element>(p, si, h, m_block * kBlockM, tOrO, tOcO);
      }
      store_lse(p, si, h, m_block * kBlockM, tOcO, lse);
    }
    if constexpr (Traits::kTmaStoreO) {
      if (kp.tma_store_o) store_o_tma_drain(mma_tidx);
    }
  }
#endif
}

}  // namespace flash
}  // namespace longctx
