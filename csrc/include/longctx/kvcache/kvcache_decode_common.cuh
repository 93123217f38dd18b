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

// The split merge of one output row (row of q `grow`, head h) by the NW = blockDim.x / 32 warps
// of a CTA (kvcache_merge_kernel). Warp w takes the splits w, w + NW, ..., lane l the dims
// [l E, l E + E) (E = D / 32), and folds its splits into an online state (m: max lse,
// l: sum exp(lse_s - m), acc: sum exp(lse_s - m) out_s) C splits at a time, every load of the C
// partial rows and their lse issued before any is used: a merge moves a few tens of KB from L2,
// so its cost is rounds of latency, not bandwidth. The warps' states meet in shared memory
// (sm: NW * (D + 2) floats); warp 0 writes out = acc / l (T) at p.out + out_off and
// lse = m + log l at p.lse + lse_off. A row without keys gets out = 0, lse = -inf.
template <int D, int C>
struct MergeState {
  static constexpr int E = D / 32;
  float m = -INFINITY, l = 0.f, acc[E];
  __device__ __forceinline__ MergeState() {
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = 0.f;
  }
  // Folds splits sp0, sp0 + step, ... (< num_splits) of row (grow, h), this lane's dims.
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
        const float w = expf(lv[j] - cm);  // lse -inf (a split without keys, or past S): 0
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
  const bool empty = !(st.l > 0.f);
  T* op = static_cast<T*>(p.out) + out_off + lane * E;
#pragma unroll
  for (int e = 0; e < E; ++e) op[e] = from_float<T>(empty ? 0.f : st.acc[e] / st.l);
  if (lane == 0) p.lse[lse_off] = empty ? -INFINITY : st.m + logf(st.l);
}

}  // namespace cuda
}  // namespace kvcache
}  // namespace longctx
