// The split merge of the decode (decode_launch.cuh): with num_splits > 1 every decode CTA writes
// an fp32 partial (its rows' output normalized by its own sum, and its lse) into out_accum /
// lse_accum, and this kernel combines them per output row:
//   lse = log(sum_s exp(lse_s)),  out = sum_s exp(lse_s - lse) * out_s.
// One CTA of 8 warps per (row of q, head); batched rows are b * seqlen_q + i, packed rows index q
// directly. At batch 1 the merge is on the critical path of every decode step, so its cost is
// rounds of L2 latency, not bandwidth: every load of a chunk of C partial rows is in flight
// before any is used. Launch: programmatic dependent (grid_dependency.cuh), waiting for the
// decode kernel's partials before its first read. A row without keys gets out = 0, lse = -inf; a
// NaN partial (lse or out) makes the row NaN (the running max keeps NaN, NaN weights are summed).
// Sinks (logit_mods.h): the partials hold none; the head's sink joins here once, as one more
// split with lse = sink and out = 0 (a row without keys: out = 0, lse = sink; a -inf sink changes
// nothing; a NaN sink makes the row NaN).
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include "longctx/kvcache/decode_common.cuh"
#include "longctx/kvcache/kvcache_params.h"
#include "longctx/max_keep_nan.h"

namespace longctx {
namespace kvcache {
namespace cuda {

// The split merge of one output row (row of q `grow`, head h) by the NW = blockDim.x / 32 warps
// of a CTA (kvcache_merge_kernel). Partial rows are head_dim d <= D floats (the kernel's width D:
// 64, 128 or 256). Warp w takes the splits w, w + NW, ..., lane l the dims [l E, l E + E)
// (E = D / 32; lanes past d idle), and folds its splits into an online state (m: max lse,
// l: sum exp(lse_s - m), acc: sum exp(lse_s - m) out_s) C splits at a time, every load of the C
// partial rows and their lse issued before any is used: a merge moves a few tens of KB from L2,
// so its cost is rounds of latency, not bandwidth. The warps' states meet in shared memory
// (sm: NW * (D + 2) floats); warp 0 writes out = acc / l (T) at p.out + out_off and
// lse = m + log l at p.lse + lse_off, after folding in the head's sink. A row without keys gets
// out = 0, lse = -inf (with a sink: lse = sink).
template <int D, int C>
struct MergeState {
  static constexpr int E = D / 32;
  float m = -INFINITY, l = 0.f, acc[E];
  __device__ __forceinline__ MergeState() {
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = 0.f;
  }
  // Folds splits sp0, sp0 + step, ... (< num_splits) of row (grow, h), this lane's dims.
  // A lane whose dims lie past the head_dim d reads lane 0's (same sectors, no extra traffic)
  // and is not stored.
  __device__ __forceinline__ void fold(const AttnParams& p, int64_t grow, int h, int sp0,
                                       int step, int lane) {
    const int S = p.num_splits;
    const int64_t d = p.cache.head_dim;
    const float* la = p.lse_accum + int64_t(h) * p.total_q + grow;
    const int64_t lstride = int64_t(p.heads) * p.total_q;
    const float* oa = p.out_accum + (grow * p.heads + h) * d + (lane * E < d ? lane * E : 0);
    const int64_t ostride = p.total_q * int64_t(p.heads) * d;
    for (int base = sp0; base < S; base += C * step) {
      float lv[C], xv[C][E];
#pragma unroll
      for (int j = 0; j < C; ++j) {
        const int sp = base + j * step;
        const bool ok = sp < S;
        lv[j] = ok ? __ldcg(la + sp * lstride) : -INFINITY;
        const float* src = oa + (ok ? sp * ostride : 0);
        if constexpr (E % 4 == 0) {
#pragma unroll
          for (int e = 0; e < E; e += 4) {
            const float4 x = __ldcg(reinterpret_cast<const float4*>(src + e));
            xv[j][e] = x.x;
            xv[j][e + 1] = x.y;
            xv[j][e + 2] = x.z;
            xv[j][e + 3] = x.w;
          }
        } else {
          const float2 x = __ldcg(reinterpret_cast<const float2*>(src));
          xv[j][0] = x.x;
          xv[j][1] = x.y;
        }
      }
      float cm = m;
#pragma unroll
      for (int j = 0; j < C; ++j) cm = max_keep_nan(cm, lv[j]);
      if (cm == -INFINITY) continue;
      const float sc = m == -INFINITY ? 0.f : expf(m - cm);
      l *= sc;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] *= sc;
#pragma unroll
      for (int j = 0; j < C; ++j) {
        const float w = expf(lv[j] - cm);  // lse -inf (a split without keys, or past S): 0
        if (w != 0.f) {  // (a NaN weight is summed: the row's NaN stays)
          l += w;
#pragma unroll
          for (int e = 0; e < E; ++e) acc[e] = fmaf(w, xv[j][e], acc[e]);
        }
      }
      m = cm;
    }
  }
  // Folds in the sink: a split with lse = sink and out = 0 (skipped for -inf: no sink).
  __device__ __forceinline__ void add_sink(float sink) {
    if (sink == -INFINITY) return;
    const float M = max_keep_nan(m, sink);
    const float a = m == -INFINITY ? 0.f : expf(m - M);
    l = l * a + expf(sink - M);
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] *= a;
    m = M;
  }
  // Folds another state in.
  __device__ __forceinline__ void join(float m2, float l2, const float* acc2) {
    const float M = max_keep_nan(m, m2);
    if (M == -INFINITY) return;
    const float a = m == -INFINITY ? 0.f : expf(m - M), b = m2 == -INFINITY ? 0.f : expf(m2 - M);
    l = l * a + l2 * b;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = acc[e] * a + acc2[e] * b;
    m = M;
  }
};

template <typename T, int D, int C = 8>
__device__ __forceinline__ void merge_split_row(const AttnParams& p, int64_t grow, int h,
                                                int64_t out_off, int64_t lse_off, float* sm) {
  using State = MergeState<D, C>;
  constexpr int E = State::E;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
  State st;
  st.fold(p, grow, h, warp, nw, lane);
  float* sm_m = sm;
  float* sm_l = sm + nw;
  float* sm_acc = sm + 2 * nw;  // [nw][D]
  if (warp > 0) {
    if (lane == 0) {
      sm_m[warp] = st.m;
      sm_l[warp] = st.l;
    }
#pragma unroll
    for (int e = 0; e < E; ++e) sm_acc[warp * D + lane * E + e] = st.acc[e];
  }
  __syncthreads();
  if (warp != 0) return;
  for (int w = 1; w < nw; ++w) st.join(sm_m[w], sm_l[w], sm_acc + w * D + lane * E);
  st.add_sink(head_sink(p, h));
  const bool empty = st.l == 0.f;
  T* op = static_cast<T*>(p.out) + out_off + lane * E;
  if (lane * E < p.cache.head_dim) {  // E divides 8, head_dim is a multiple of 8
#pragma unroll
    for (int e = 0; e < E; ++e) op[e] = from_float<T>(empty ? 0.f : st.acc[e] / st.l);
  }
  if (lane == 0) p.lse[lse_off] = empty ? -INFINITY : st.m + logf(st.l);
}

constexpr int kMergeThreads = 256;  // 8 warps per (row of q, head)

// One CTA per (row of q, head) combines the num_splits partials (merge_split_row above: 8
// warps take every 8th split, a chunk's loads all in flight, and meet in shared memory).
template <typename T, int D>
__global__ void __launch_bounds__(kMergeThreads) kvcache_merge_kernel(const AttnParams p) {
  __shared__ float sm[kMergeThreads / 32 * (D + 2)];
  grid_dependency_wait();  // the decode kernel's partials (grid_dependency.cuh)
  grid_dependents_may_launch();
  const int64_t row = blockIdx.x;
  const int h = blockIdx.y;
  int64_t out_off, lse_off;
  if (p.cu_seqlens_q != nullptr) {
    out_off = row * p.out_row_stride;
    lse_off = row;
  } else {
    const int64_t b = row / p.seqlen_q, i = row % p.seqlen_q;
    out_off = b * p.out_batch_stride + i * p.out_row_stride;
    lse_off = b * p.lse_batch_stride + i;
  }
  merge_split_row<T, D>(p, row, h, out_off + int64_t(h) * p.out_head_stride,
                        lse_off + int64_t(h) * p.lse_head_stride, sm);
}

}  // namespace cuda
}  // namespace kvcache
}  // namespace longctx
