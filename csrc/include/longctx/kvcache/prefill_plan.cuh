// The key chunk plan of the chunked prefill computed on the device (prefill_chunks.h's
// prefill_call_chunk for every sequence), for calls that cannot read the cache lengths on the
// host: a CUDA graph capture, whose replays see new lengths.
//
// One CTA of kPlanThreads threads walks the batch in pieces of kPlanThreads sequences with a
// block-wide exclusive scan of the chunk's key counts: cu_k[b] is the first gathered row of
// sequence b (cu_k[batch] the total), k_first[b] the cache position of its first gathered key.
// Invariants: no sequence's chunk holds more than max_keys keys (prefill_chunk_keys_bound: the
// gather's buffers hold batch x max_keys rows; a longer chunk, possible only with unvalidated
// cu_seqlens_q, keeps its last max_keys keys), and the caller bounds batch x max_keys below
// 2^31, so the int32 sums cannot overflow.
#pragma once
#include <cub/block/block_scan.cuh>
#include <cstdint>
#include "longctx/kvcache/prefill_chunks.h"

namespace longctx {
namespace kvcache {
namespace cuda {

constexpr int kPlanThreads = 256;

// cu_seqlens_q: the packed queries' offsets, or nullptr when every sequence has seqlen_q rows.
__global__ void __launch_bounds__(kPlanThreads)
    prefill_chunk_plan_kernel(const int32_t* cache_seqlens, const int32_t* cu_seqlens_q,
                              int64_t seqlen_q, int batch, int64_t cap, int64_t window_left,
                              int chunk_index, int64_t max_keys, int32_t* cu_k,
                              int32_t* k_first) {
  using Scan = cub::BlockScan<int32_t, kPlanThreads>;
  __shared__ typename Scan::TempStorage scan;
  int32_t base = 0;
  for (int b0 = 0; b0 < batch; b0 += kPlanThreads) {
    const int b = b0 + int(threadIdx.x);
    KeyChunk kc;
    if (b < batch) {
      const int64_t sq =
          cu_seqlens_q != nullptr ? int64_t(cu_seqlens_q[b + 1]) - cu_seqlens_q[b] : seqlen_q;
      kc = prefill_call_chunk(cache_seqlens[b], cap, sq, window_left, chunk_index);
      if (kc.count > max_keys) {
        kc.first += kc.count - max_keys;
        kc.count = max_keys;
      }
    }
    int32_t offset, piece;
    Scan(scan).ExclusiveSum(static_cast<int32_t>(kc.count), offset, piece);
    if (b < batch) {
      cu_k[b] = base + offset;
      k_first[b] = static_cast<int32_t>(kc.first);
    }
    base += piece;
    __syncthreads();  // the scan's storage is reused by the next piece
  }
  if (threadIdx.x == 0) cu_k[batch] = base;
}

}  // namespace cuda
}  // namespace kvcache
}  // namespace longctx
