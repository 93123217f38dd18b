// Pieces shared by the split-KV decode kernels (decode_cuda_cores.cuh: CUDA cores, decode_mma.cuh:
// tensor cores with registers in flight, decode_staged.cuh: tensor cores with a cp.async
// shared-memory pipeline): element conversions, the grid coordinates of a CTA, a row's key
// interval, and the end of every kernel, combine_and_store:
// combine the online-softmax states of the CTA's NW key groups for its GT packed query rows and
// store the rows.
//
// combine_and_store input (shared memory, written by the groups, __syncthreads() done by the
// caller): per group w and packed row g (slot w * RS + g): the running max m (log2 domain), the
// sum l of exp2(s - m) and the unnormalized output o[D] (o at (w * RS + g) * OS + o_pos(e)). Rows
// r0 + g >= R are skipped; of a row's D columns the first head_dim are stored (a kernel of width
// D > head_dim computes the rest as zeros). Output: num_splits == 1: out (T, normalized, times
// vscale) and lse (natural log, fp32); otherwise the split's fp32 partial (normalized out and its
// lse) into out_accum / lse_accum (rows of head_dim floats) for kvcache_merge_kernel. A row that
// saw no key gets out = 0, lse = -inf;
// a row whose scores or values hold a NaN gets NaN.
// Logit mods (logit_mods.h): every kernel caps its scores with cap_score before the mask; the
// head's sink joins only where a final row is written (combine_and_store with num_splits == 1,
// the merge otherwise), never a split's partial, so it is counted once. With a sink a row that
// saw no key gets out = 0, lse = sink; a -inf sink is bitwise no sink; a NaN sink makes its
// head's rows NaN.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <type_traits>
#include "longctx/kvcache/grid_dependency.cuh"
#include "longctx/kvcache/kvcache_params.h"
#include "longctx/kvcache/paged.h"
#include "longctx/tanh_approx.cuh"

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

// The CTA's (split, kv head, row tile, sequence) from the launch grid (kv_heads * m_tiles,
// splits, batch): the CTAs of one split for all kv heads are adjacent in launch order, so they
// stream the same pages at the same time.
struct DecodeCta {
  int split, hk, mt, b;
};

__device__ __forceinline__ DecodeCta decode_cta(int m_tiles) {
  const int hy = blockIdx.x;
  return {static_cast<int>(blockIdx.y), hy / m_tiles, hy % m_tiles, static_cast<int>(blockIdx.z)};
}

// The scale of q.k (times any fp8 / int8 K scale) that gives a kernel's score x: softmax_scale *
// log2(e) (x = s log2(e), s = softmax_scale q.k, the log2 domain of the softmax), or with softcap
// c softmax_scale / c (x = s / c, the argument of the cap's tanh).
__device__ __forceinline__ float score_prescale(const AttnParams& p) {
  return p.mods.softcap != 0.f ? p.softmax_scale / p.mods.softcap
                               : p.softmax_scale * 1.4426950408889634f;
}

// Logit softcapping of a score x = s / c (score_prescale) into the log2 domain:
// c log2(e) tanh(x); softcap 0 leaves x. Uniform branch; a kernel short of registers passes
// p.mods.softcap itself (a constant-bank operand, no register).
__device__ __forceinline__ float cap_score(float x, float softcap) {
  return softcap != 0.f ? softcap * 1.4426950408889634f * tanh_approx(x) : x;
}

// The sink logit of head h (natural log), -inf for none.
__device__ __forceinline__ float head_sink(const AttnParams& p, int h) {
  return p.mods.sinks != nullptr ? p.mods.sinks[h] : -INFINITY;
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

// Position of element e of a row of o in shared memory: e, or with kSkew (the tensor-core
// kernels' layout, MmaRowState::to_smem) e + 8 (e / (D / 4)): each quarter of the row shifted
// by 8 words, so that with a row stride of 1 mod 32 words the 32 lanes of a warp storing their
// (row r, quarter c) values hit 32 distinct banks.
template <int D, bool kSkew>
__device__ __forceinline__ int o_pos(int e) {
  return kSkew ? e + 8 * (e / (D / 4)) : e;
}

// OS: the row stride of sm_o in floats (D unless padded). Two steps: one thread per row folds
// the groups' (m, l) (and with num_splits == 1 the head's sink, a group of m = sink * log2(e),
// l = 1 and o = 0) into per-group weights exp2(m_w - M) / L (times vscale), written over sm_m,
// and the row's lse, written over sm_l[g]; then every element is a weighted sum of NW partial
// rows (no exponentials or divisions per element; kDecodeThreads threads, unrolled, so the loads
// of all of a thread's elements are in flight together). Every thread of the CTA calls it.
template <typename T, int D, int GT, int NW, int RS, int OS = D, bool kSkew = false>
__device__ __forceinline__ void combine_and_store(const AttnParams& p, const SeqLen& s,
                                                  int split, int hk, int r0, int R, int group,
                                                  float vscale, float* sm_m, float* sm_l,
                                                  const float* sm_o) {
  if (threadIdx.x < GT) {
    const int g = threadIdx.x;
    const float sink = p.num_splits == 1 ? head_sink(p, hk * group + (r0 + g) % group) : -INFINITY;
    const float sink2 = sink * 1.4426950408889634f;
    float M = sink2;  // fmaxf drops a NaN sink here; its own term below keeps it
#pragma unroll
    for (int w = 0; w < NW; ++w) M = fmaxf(M, sm_m[w * RS + g]);
    float wt[NW], L = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) {
      wt[w] = M == -INFINITY ? 0.f : exp2f(sm_m[w * RS + g] - M);
      L = fmaf(sm_l[w * RS + g], wt[w], L);
    }
    if (sink != -INFINITY) L += exp2f(sink2 - M);
    const bool empty = L == 0.f;  // no key seen; a NaN sum (NaN in q, k, v or sink) stays NaN
    const float scale = empty ? 0.f : vscale / L;
#pragma unroll
    for (int w = 0; w < NW; ++w) sm_m[w * RS + g] = wt[w] * scale;
    // M = sink2 (the sink dominates, e.g. a row without keys): lse = sink + log L exactly.
    sm_l[g] = empty ? -INFINITY : (M == sink2 ? sink : M * 0.6931471805599453f) + logf(L);
  }
  __syncthreads();
  const int d = p.cache.head_dim;  // <= D: the columns stored
#pragma unroll
  for (int k = 0; k < (GT * D + kDecodeThreads - 1) / kDecodeThreads; ++k) {
    const int idx = static_cast<int>(threadIdx.x) + k * kDecodeThreads;
    if (GT * D % kDecodeThreads != 0 && idx >= GT * D) break;
    const int g = idx / D, e = idx % D;
    const int rr = r0 + g;
    if (rr >= R || e >= d) continue;
    float val = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w)
      val = fmaf(sm_o[(w * RS + g) * OS + o_pos<D, kSkew>(e)], sm_m[w * RS + g], val);
    const float lse = sm_l[g];
    const int i = rr / group;
    const int h = hk * group + rr % group;
    if (p.num_splits == 1) {
      T* op = static_cast<T*>(p.out) + s.q_offset(p.out_batch_stride, p.out_row_stride) +
              int64_t(i) * p.out_row_stride +
              int64_t(h) * p.out_head_stride;
      op[e] = from_float<T>(val);
      if (e == 0)
        p.lse[s.lse_offset(p.lse_batch_stride) + int64_t(h) * p.lse_head_stride + i] = lse;
    } else {
      const int64_t grow = s.q_row0(p.seqlen_q) + i;
      p.out_accum[((int64_t(split) * p.total_q + grow) * p.heads + h) * d + e] = val;
      if (e == 0) p.lse_accum[(int64_t(split) * p.heads + h) * p.total_q + grow] = lse;
    }
  }
}

}  // namespace cuda
}  // namespace kvcache
}  // namespace longctx
