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

}  // namespace cuda
}  // namespace kvcache
}  // namespace longctx
