// Setup pieces that both TMA + wgmma backward kernels share (flash_bwd_sm90.cuh for head dims 64
// and 128, flash_bwd_sm90_hdim256.cuh for 256): the TMA descriptor prefetch, the pipelines'
// parameters, the producer's one-time K/V load and row tiles of the TMA views, the producer
// warps' stage waits and varlen tail zeroing, and the deterministic mode's semaphore helpers.
// The CTA's bookkeeping (which KV tile, heads and query tiles, the walk) stays in each kernel as
// scalars: a shared struct for it raised the hdim-128 kernel's spills from 32/40 to 72/80 bytes.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include "longctx/flash/flash_params.h"
#include "longctx/flash/mask.h"
#include "longctx/flash/smem_tail_rows.cuh"

namespace longctx {
namespace flash {
namespace bwd_sm90 {

// Rows tile of tensor mT ((rows, D, heads, batch) TMA view): rows [row0 + idx * tile rows, ..)
// of head h, the sequence starting at row0.
template <typename TensorT, typename TileShape>
__device__ __forceinline__ auto bwd_rows_tile(const TensorT& mT, int row0, int h, int batch,
                                              TileShape tile, int idx) {
  using namespace cute;
  return local_tile(domain_offset(make_coord(row0, _0{}), mT(_, _, h, batch)), tile,
                    make_coord(idx, _0{}));
}

template <typename KernelParams>
__device__ __forceinline__ void bwd_prefetch_tma(const KernelParams& kp) {
  cute::prefetch_tma_descriptor(kp.tma_q.get_tma_descriptor());
  cute::prefetch_tma_descriptor(kp.tma_do.get_tma_descriptor());
  cute::prefetch_tma_descriptor(kp.tma_k.get_tma_descriptor());
  cute::prefetch_tma_descriptor(kp.tma_v.get_tma_descriptor());
}

// Params of a PipelineTmaAsync whose producer is warpgroup 0 (its thread 0 the leader) and
// whose consumers are the kConsumers threads of the other warpgroups.
template <typename Pipeline, int kConsumers>
__device__ __forceinline__ typename Pipeline::Params bwd_pipeline_params(int warp_group_idx,
                                                                         uint32_t tx_bytes) {
  typename Pipeline::Params pp;
  pp.role = warp_group_idx == 0 ? Pipeline::ThreadCategory::Producer
                                : Pipeline::ThreadCategory::Consumer;
  pp.is_leader = threadIdx.x == 0;
  pp.num_consumers = kConsumers;
  pp.transaction_bytes = tx_bytes;
  return pp;
}

// The producer thread's one-time load of the CTA's K and V tiles (TMA, completing on
// ss.barrier_kv with Traits::kTmaBytesKV bytes).
template <typename Traits, typename KernelParams, typename Storage>
__device__ __forceinline__ void bwd_load_kv(const KernelParams& kp, Storage& ss, const SeqLen& si,
                                            int hk, int n_block) {
  using namespace cute;
  Tensor mK = kp.tma_k.get_tma_tensor(kp.shape_k);
  Tensor mV = kp.tma_v.get_tma_tensor(kp.shape_k);
  Tensor sK = make_tensor(make_smem_ptr(ss.smem_k.data()), typename Traits::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(ss.smem_v.data()), typename Traits::SmemLayoutK{});
  auto tile_k = Shape<Int<Traits::kBlockN>, Int<Traits::kHeadDim>>{};
  Tensor gK = bwd_rows_tile(mK, si.k_start, hk, si.tma_batch(), tile_k, n_block);
  Tensor gV = bwd_rows_tile(mV, si.k_start, hk, si.tma_batch(), tile_k, n_block);
  auto [tKgK, tKsK] = tma_partition(kp.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK),
                                    group_modes<0, 2>(gK));
  auto [tVgV, tVsV] = tma_partition(kp.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV),
                                    group_modes<0, 2>(gV));
  ss.barrier_kv.arrive_and_expect_tx(Traits::kTmaBytesKV);
  copy(kp.tma_k.with(reinterpret_cast<uint64_t&>(ss.barrier_kv), 0), tKgK, tKsK);
  copy(kp.tma_v.with(reinterpret_cast<uint64_t&>(ss.barrier_kv), 0), tVgV, tVsV);
}

// Varlen: rows past a packed sequence's end in the CTA's K/V tile, or in the Q/dO stage of a
// query tile that crosses seqlen_q, hold the next sequence's rows, and a masked entry's P = 0 or
// dS = 0 times a NaN there would give NaN (0 x NaN) in this sequence's dQ, dK or dV. Warps 2 and
// 3 of the producer warpgroup (otherwise idle) wait for each load, zero those rows (none unless
// varlen: a batched TMA zero-fills rows past the tensor) and arrive on a ready barrier (64
// arrivals) that the consumers wait on instead of the load's own: their code keeps its shape
// (zeroing in the consumers, even once before the main loop, raised the hdim-128 kernel's spills
// from 72 / 76 to 164 / 184 bytes; a branch between two barriers, to 100 / 112). The hdim 64/128
// kernel takes this hop where its kReadyHop says (varlen launches; batched ones at hdim 64 too);
// the hdim-256 kernel in every launch. The rows are zeroed by zero_tail_rows (smem_tail_rows.cuh).
template <typename Traits, typename Storage>
__device__ __forceinline__ void clear_kv_tail(Storage& ss, int row0, int tid64) {
  using namespace cute;
  Tensor sK = make_tensor(make_smem_ptr(ss.smem_k.data()), typename Traits::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(ss.smem_v.data()), typename Traits::SmemLayoutK{});
  ss.barrier_kv.wait(0);
  if (row0 < Traits::kBlockN) {
    zero_tail_rows<64>(sK, row0, tid64);
    zero_tail_rows<64>(sV, row0, tid64);
  }
  ss.kv_ready.arrive();
}

// Waits, as a thread outside the pipeline's consumers (producer warps 2 and 3), for the TMA of
// stage st of a PipelineTmaAsync whose shared storage is `storage`. Not consumer_wait: that
// traps (brkpt) for a thread of the producer role in builds without NDEBUG, as the torch
// extension's are.
template <typename PipelineStorage, typename PipelineState>
__device__ __forceinline__ void wait_stage_loaded(PipelineStorage& storage,
                                                  const PipelineState& st) {
  storage.full_barrier_[st.index()].wait(st.phase());
}

__device__ __forceinline__ int ld_acquire_gpu(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Deterministic mode: the rank of KV tile n_block among the KV tiles that visit query tile m,
// i.e. how many of them add to m's dQ before it. Those tiles are contiguous (bwd_query_tiles'
// bounds are monotone in n), so the rank is n_block minus the first of them (binary search).
__host__ __device__ __forceinline__ int kv_tile_rank(int n_block, int m, int block_m, int block_n,
                                                     int sq, int sk, int wl, int wr) {
  int lo = 0, hi = n_block;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    const TileRange rr = bwd_query_tiles(mid, block_m, block_n, sq, sk, wl, wr);
    if (rr.end > m && rr.begin < rr.end) hi = mid; else lo = mid + 1;
  }
  return n_block - lo;
}

}  // namespace bwd_sm90
}  // namespace flash
}  // namespace longctx
