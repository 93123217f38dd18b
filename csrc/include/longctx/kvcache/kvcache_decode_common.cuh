// Pieces shared by the split-KV decode kernels (kvcache_decode.cuh: CUDA cores,
// kvcache_decode_mma.cuh: tensor cores with registers in flight, kvcache_decode_staged.cuh:
// tensor cores with a cp.async shared-memory pipeline): element conversions, the per-sequence
// view of the query rows, a row's key interval, and the end of every kernel, combine_and_store:
// combine the online-softmax states of the CTA's NW key groups for its GT packed query rows and
// store the rows.
//
// combine_and_store input (shared memory, written by the groups, __syncthreads() done by the
// caller): per group w and packed row g (slot w * RS + g): the running max m (log2 domain), the
// sum l of exp2(s - m) and the unnormalized output o[D] (o at (w * RS + g) * D + e). Rows
// r0 + g >= R are skipped. Output: num_splits == 1: out (T, normalized, times vscale) and lse
// (natural log, fp32); otherwise the split's fp32 partial (normalized out and its lse) into
// out_accum / lse_accum for kvcache_merge_kernel. A row that saw no key gets out = 0, lse = -inf.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <type_traits>
#include "longctx/kvcache/kvcache_params.h"
#include "longctx/kvcache/paged.h"

namespace longctx {
namespace kvcache {
namespace cuda {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeMaxRows = 32;  // packed rows per kv head handled by the decode path

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(x);
  } else {
    return __half2float(x);
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return __float2half_rn(x);
  }
}

// Per-sequence view of the query rows (batched or packed layout).
struct DecodeSeq {
  int sq = 0, sk = 0;
  int64_t q_off = 0, out_off = 0, lse_off = 0, row0 = 0;
};

__device__ __forceinline__ DecodeSeq decode_seq(const AttnParams& p, int b) {
  DecodeSeq s;
  s.sk = static_cast<int>(cached_len(p.cache, b));
  if (p.cu_seqlens_q != nullptr) {
    const int64_t start = p.cu_seqlens_q[b];
    s.sq = static_cast<int>(p.cu_seqlens_q[b + 1] - start);
    s.q_off = start * p.q_row_stride;
    s.out_off = start * p.out_row_stride;
    s.lse_off = start;
    s.row0 = start;
  } else {
    s.sq = p.seqlen_q;
    s.q_off = int64_t(b) * p.q_batch_stride;
    s.out_off = int64_t(b) * p.out_batch_stride;
    s.lse_off = int64_t(b) * p.lse_batch_stride;
    s.row0 = int64_t(b) * p.seqlen_q;
  }
  return s;
}

// The CTA's (split, kv head, row tile, sequence) from the launch grid: (kv_heads * m_tiles,
// splits, batch) when decode_heads_fastest, else (splits, kv_heads * m_tiles, batch).
struct DecodeCta {
  int split, hk, mt, b;
};

__device__ __forceinline__ DecodeCta decode_cta(const AttnParams& p, int m_tiles) {
  const int hy = p.decode_heads_fastest ? blockIdx.x : blockIdx.y;
  const int split = p.decode_heads_fastest ? blockIdx.y : blockIdx.x;
  return {split, hy / m_tiles, hy % m_tiles, static_cast<int>(blockIdx.z)};
}

// Keys the tile's rows see are [lo, hi) per row (mask.h's rule as an interval).
__device__ __forceinline__ void row_interval(int64_t i, int sq, int sk, int wl, int wr, int& lo,
                                             int& hi) {
  const int64_t shift = int64_t(sk) - sq;
  int64_t a = 0, e = sk;
  if (wl >= 0) a = i + shift - wl > 0 ? i + shift - wl : 0;
  if (wr >= 0) e = i + shift + wr + 1 < sk ? i + shift + wr + 1 : sk;
  lo = static_cast<int>(a);
  hi = static_cast<int>(e > a ? e : a);
}

template <typename T, int D, int GT, int NW, int RS>
__device__ __forceinline__ void combine_and_store(const AttnParams& p, const DecodeSeq& s,
                                                  int split, int hk, int r0, int R, int group,
                                                  float vscale, const float* sm_m,
                                                  const float* sm_l, const float* sm_o) {
  for (int idx = threadIdx.x; idx < GT * D; idx += blockDim.x) {
    const int g = idx / D, e = idx % D;
    const int rr = r0 + g;
    if (rr >= R) continue;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < NW; ++w) M = fmaxf(M, sm_m[w * RS + g]);
    float L = 0.f, acc = 0.f;
    if (M != -INFINITY) {
#pragma unroll
      for (int w = 0; w < NW; ++w) {
        const float wt = exp2f(sm_m[w * RS + g] - M);
        L = fmaf(sm_l[w * RS + g], wt, L);
        acc = fmaf(sm_o[(w * RS + g) * D + e], wt, acc);
      }
    }
    const bool empty = !(L > 0.f);
    const float val = empty ? 0.f : acc / L * vscale;
    const float lse = empty ? -INFINITY : M * 0.6931471805599453f + logf(L);
    const int i = rr / group;
    const int h = hk * group + rr % group;
    if (p.num_splits == 1) {
      T* op = static_cast<T*>(p.out) + s.out_off + int64_t(i) * p.out_row_stride +
              int64_t(h) * p.out_head_stride;
      op[e] = from_float<T>(val);
      if (e == 0) p.lse[s.lse_off + int64_t(h) * p.lse_head_stride + i] = lse;
    } else {
      const int64_t grow = s.row0 + i;
      p.out_accum[((int64_t(split) * p.total_q + grow) * p.heads + h) * D + e] = val;
      if (e == 0) p.lse_accum[(int64_t(split) * p.heads + h) * p.total_q + grow] = lse;
    }
  }
}

// Split-KV merge inside the decode kernel (AttnParams::merge_counters non-null): each row tile
// (sequence, kv head, packed-row tile) has a counter, zero before the launch; every CTA of the
// tile counts itself after storing its partial, and the one that counts last merges the tile's
// num_splits partials (merge_splits_in_cta) and puts the counter back to zero. Writers: partial
// stores, __threadfence, barrier, atomicAdd (the threadFenceReduction pattern); the last CTA:
// atomicAdd, barrier, __threadfence, then L2 loads (__ldcg) of the partials.
__device__ __forceinline__ bool last_split_of_tile(const AttnParams& p, int64_t tile) {
  __shared__ int is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const int old = atomicAdd(p.merge_counters + tile, 1);
    is_last = old == p.num_splits - 1;
    if (is_last) atomicExch(p.merge_counters + tile, 0);
  }
  __syncthreads();
  const bool last = is_last != 0;
  if (last) __threadfence();
  return last;
}

// The split merge of `rows` output rows by the NW = blockDim.x / 32 warps of a CTA (the merge
// kernel: one row, 8 warps; the decode kernels' last CTA: its GT packed rows, 4 warps). Row g
// gets wpr = max(1, NW / rows) warps; warp w < rows * wpr takes row w % rows and the splits
// j, j + wpr, ... (j = w / rows), lane l dims [l E, l E + E) (E = D / 32). A warp folds its
// splits into an online state (m: max lse, l: sum exp(lse_s - m), acc: sum exp(lse_s - m) out_s)
// chunk by chunk, every load of a chunk (C partial rows and their lse) issued before any is
// used: latency, not bandwidth, is what a merge costs (a few tens of KB from L2). With wpr > 1
// the warps' states meet in shared memory (sm: NW * (D + 2) floats). Writes
// out = acc / l (T) and lse = m + log l; a row without keys gets out = 0, lse = -inf.
// row_of(g) -> MergeRow: the row of q (grow), the head, and where its output and lse go.
struct MergeRow {
  int64_t grow;
  int h;
  int64_t out_off;  // elements from p.out to the row's first output element
  int64_t lse_off;  // elements from p.lse
};

template <int D, int C>
struct MergeState {
  static constexpr int E = D / 32;
  float m = -INFINITY, l = 0.f, acc[E];
  __device__ __forceinline__ MergeState() {
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = 0.f;
  }
  // Folds splits sp0, sp0 + step, ... (< S) of row (grow, h) into the state, lane's dims.
  __device__ __forceinline__ void fold(const AttnParams& p, int64_t grow, int h, int sp0,
                                       int step, int lane) {
    const int S = p.num_splits;
    const float* la = p.lse_accum + int64_t(h) * p.total_q + grow;
    const int64_t lstride = int64_t(p.heads) * p.total_q;
    const float* oa = p.out_accum + (grow * p.heads + h) * D + lane * E;
    const int64_t ostride = p.total_q * int64_t(p.heads) * D;
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
      for (int j = 0; j < C; ++j) cm = fmaxf(cm, lv[j]);
      if (cm == -INFINITY) continue;
      const float sc = m == -INFINITY ? 0.f : expf(m - cm);
      l *= sc;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] *= sc;
#pragma unroll
      for (int j = 0; j < C; ++j) {
        const float w = expf(lv[j] - cm);  // lse -inf (no keys, or past S): 0
        if (w > 0.f) {
          l += w;
#pragma unroll
          for (int e = 0; e < E; ++e) acc[e] = fmaf(w, xv[j][e], acc[e]);
        }
      }
      m = cm;
    }
  }
  // Folds another state in.
  __device__ __forceinline__ void join(float m2, float l2, const float* acc2) {
    const float M = fmaxf(m, m2);
    if (M == -INFINITY) return;
    const float a = m == -INFINITY ? 0.f : expf(m - M), b = m2 == -INFINITY ? 0.f : expf(m2 - M);
    l = l * a + l2 * b;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = acc[e] * a + acc2[e] * b;
    m = M;
  }
  template <typename T>
  __device__ __forceinline__ void store(const AttnParams& p, const MergeRow& row,
                                        int lane) const {
    const bool empty = !(l > 0.f);
    T* op = static_cast<T*>(p.out) + row.out_off + lane * E;
#pragma unroll
    for (int e = 0; e < E; ++e) op[e] = from_float<T>(empty ? 0.f : acc[e] / l);
    if (lane == 0) p.lse[row.lse_off] = empty ? -INFINITY : m + logf(l);
  }
};

template <typename T, int D, int C = 8, typename RowOf>
__device__ __forceinline__ void merge_splits(const AttnParams& p, int rows, RowOf row_of,
                                             float* sm) {
  using State = MergeState<D, C>;
  constexpr int E = State::E;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
  const int wpr = nw / rows > 1 ? nw / rows : 1;
  if (wpr == 1) {  // each warp its rows, every split
    for (int g = warp; g < rows; g += nw) {
      const MergeRow row = row_of(g);
      State st;
      st.fold(p, row.grow, row.h, 0, 1, lane);
      st.template store<T>(p, row, lane);
    }
    return;
  }
  const int g = warp % rows, j = warp / rows;
  const bool active = warp < rows * wpr;
  const MergeRow row = row_of(g);
  State st;
  if (active) st.fold(p, row.grow, row.h, j, wpr, lane);
  float* sm_m = sm;
  float* sm_l = sm + nw;
  float* sm_acc = sm + 2 * nw;  // [nw][D]
  if (active && j > 0) {
    if (lane == 0) {
      sm_m[warp] = st.m;
      sm_l[warp] = st.l;
    }
#pragma unroll
    for (int e = 0; e < E; ++e) sm_acc[warp * D + lane * E + e] = st.acc[e];
  }
  __syncthreads();
  if (active && j == 0) {
    for (int k = 1; k < wpr; ++k) {
      const int w2 = k * rows + g;
      st.join(sm_m[w2], sm_l[w2], sm_acc + w2 * D + lane * E);
    }
    st.template store<T>(p, row, lane);
  }
}

// The decode kernels' last CTA of a row tile: merge its GT packed rows (from r0, < R).
template <typename T, int D>
__device__ __forceinline__ void merge_tile_splits(const AttnParams& p, const DecodeSeq& s,
                                                  int hk, int r0, int R, int group, int gt,
                                                  float* sm) {
  const int rows = R - r0 < gt ? R - r0 : gt;
  merge_splits<T, D>(p, rows, [&](int g) {
    const int rr = r0 + g, i = rr / group, h = hk * group + rr % group;
    return MergeRow{s.row0 + i, h, s.out_off + int64_t(i) * p.out_row_stride +
                                       int64_t(h) * p.out_head_stride,
                    s.lse_off + int64_t(h) * p.lse_head_stride + i};
  }, sm);
}

}  // namespace cuda
}  // namespace kvcache
}  // namespace longctx
