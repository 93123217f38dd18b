// kvcache_append on CUDA: one fused kernel writes a batch of new K/V tokens into their pages,
// rotating K (RoPE) at its positions and quantizing on write; plus the gather kernel of the
// chunked-prefill path (pages -> a contiguous, dequantized bf16/fp16 K/V).
//
// Append tiling: one CTA (4 warps) per new token. The CTA computes the token's RoPE cos/sin once
// (rope_math.h's cos_sin with its exact range reduction, in shared memory), then each warp takes
// (kv head, K or V) items in turn: lanes load the head's head_dim values to fp32 shared memory,
// rotate the pairs (NeoX or interleaved) and round them to T, exactly as apply_rope stores them,
// then store them as T, as int8 (amax by warp reduction, quant.h's quantize_int8, the scale beside
// the page) or as fp8 e4m3 (quant.h's quantize_fp8: RNE, saturating). The arithmetic is the CPU
// twin's (kvcache_cpu.h append_token) with the device's sincosf, so GPU append equals GPU
// apply_rope followed by an append bitwise.
// Invariants: a token whose page id lies outside [0, num_blocks) (or whose position is past the
// block table) is not written (only reachable with validate=False); offsets are int64; each
// token's (page, slot) has exactly one writer (the host checks distinct pages with validate).
//
// Gather tiling: one CTA per (chunk of 16 tokens, sequence); threads cover (token, kv head,
// 8 channels) with 16-byte stores; dst rows are cu_k[b] + t. Dequantization x = stored * scale in
// fp32, rounded to T.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include "longctx/kvcache/append_token.h"
#include "longctx/kvcache/decode_cuda_cores.cuh"
#include "longctx/kvcache/kvcache_params.h"
#include "longctx/kvcache/paged.h"
#include "longctx/kvcache/quant.h"
#include "longctx/rope/rope_kernel_limits.h"
#include "longctx/rope/rope_math.h"

namespace longctx {
namespace kvcache {
namespace cuda {

constexpr int kAppendWarps = 4;

template <typename T, Format F>
__global__ void __launch_bounds__(kAppendWarps * 32) kvcache_append_kernel(const AppendParams p) {
  __shared__ rope::CosSin cs[rope::kMaxFrequencies];
  __shared__ float buf[kAppendWarps][256];
  const PagedKV& c = p.cache;
  const int64_t row = blockIdx.x;
  const AppendToken tok = append_token_at(p, row);  // append_token.h, as the CPU twin
  const Slot s = locate(c, tok.b, tok.t);
  if (!s.valid) return;  // uniform over the CTA
  const int d = c.head_dim;
  const T* k = static_cast<const T*>(p.k) + tok.k_off;
  const T* v = static_cast<const T*>(p.v) + tok.v_off;
  const bool rope_on = p.inv_freq != nullptr;
  if (rope_on) {
    const float pos = append_rope_position(p, tok, row);
    for (int f = threadIdx.x; f < p.n_freq; f += blockDim.x)
      cs[f] = rope::cos_sin(pos, p.inv_freq[f], p.rope_scale, /*inverse=*/false);
    __syncthreads();
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* x = buf[warp];
  for (int item = warp; item < 2 * c.kv_heads; item += kAppendWarps) {
    const bool is_k = item < c.kv_heads;
    const int h = is_k ? item : item - c.kv_heads;
    const T* src = is_k ? k + int64_t(h) * p.k_head_stride : v + int64_t(h) * p.v_head_stride;
    __syncwarp();
    for (int ch = lane; ch < d; ch += 32) x[ch] = to_float(src[ch]);
    __syncwarp();
    if (is_k && rope_on) {
      for (int f = lane; f < p.n_freq; f += 32) {
        const int i1 = p.rope_interleaved ? 2 * f : f;
        const int i2 = p.rope_interleaved ? 2 * f + 1 : f + p.n_freq;
        float a = x[i1], bb = x[i2];
        rope::rotate(a, bb, cs[f]);
        x[i1] = to_float(from_float<T>(a));  // as apply_rope stores it
        x[i2] = to_float(from_float<T>(bb));
      }
      __syncwarp();
    }
    const CacheView& cv = is_k ? c.k : c.v;
    const int64_t off = elem_offset(cv, s.page, s.slot, h);
    if constexpr (F == Format::kNative) {
      T* dst = static_cast<T*>(cv.data) + off;
      for (int ch = lane; ch < d; ch += 32) dst[ch] = from_float<T>(x[ch]);
    } else if constexpr (F == Format::kInt8) {
      float amax = 0.f;
      for (int ch = lane; ch < d; ch += 32) amax = amax_step(amax, x[ch]);
#pragma unroll
      for (int o = 16; o >= 1; o >>= 1)
        amax = max_keep_nan(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      const float scale = int8_scale(amax);
      int8_t* dst = static_cast<int8_t*>(cv.data) + off;
      for (int ch = lane; ch < d; ch += 32) dst[ch] = quantize_int8(x[ch], scale);
      if (lane == 0) cv.token_scale[scale_offset(cv, s.page, s.slot, h)] = scale;
    } else {
      const float scale = cv.head_scale[h];
      uint8_t* dst = static_cast<uint8_t*>(cv.data) + off;
      for (int ch = lane; ch < d; ch += 32) dst[ch] = quantize_fp8(x[ch], scale);
    }
  }
}

// Gather: cached keys [k_first[b], k_first[b] + n_b) of every sequence (n_b = cu_k[b + 1] -
// cu_k[b]; k_first nullptr: from 0) into dst rows [cu_k[b], cu_k[b + 1]), both pools,
// dequantized to T. dst: (total_k, kv_heads, head_dim) contiguous. A key on a page outside the
// pool (reachable only unvalidated, in a CUDA graph capture) reads nothing and gathers K = NaN,
// V = 0: the rows that see it get NaN (the forward cannot mask it), no other row does.
constexpr int kGatherTokens = 16;

template <typename T, Format F>
__global__ void __launch_bounds__(256)
    kvcache_gather_kernel(const PagedKV c, const int32_t* cu_k, const int32_t* k_first, T* k_dst,
                          T* v_dst) {
  const int b = blockIdx.y;
  const int64_t first = k_first != nullptr ? k_first[b] : 0;  // cache position of token 0
  const int64_t sk = cu_k[b + 1] - cu_k[b];
  const int64_t t0 = int64_t(blockIdx.x) * kGatherTokens;
  if (t0 >= sk) return;
  const int vecs = c.head_dim / 8;
  const int per_tok = c.kv_heads * vecs;
  const int n = static_cast<int>(sk - t0 < kGatherTokens ? sk - t0 : kGatherTokens) * per_tok;
  for (int idx = threadIdx.x; idx < 2 * n; idx += blockDim.x) {
    const bool is_k = idx < n;
    const int w = is_k ? idx : idx - n;
    const int tt = w / per_tok, rem = w % per_tok, h = rem / vecs, ch = (rem % vecs) * 8;
    const int64_t t = t0 + tt;
    const CacheView& cv = is_k ? c.k : c.v;
    const Slot s = locate(c, b, first + t);
    float f[8];
    if (s.valid) {
      const RawVec<F> raw = load_raw<F>(cv.data, elem_offset(cv, s.page, s.slot, h) + ch);
      cvt8<T, F>(raw, f);
      float scale = 1.f;
      if constexpr (F == Format::kInt8) scale = cv.token_scale[scale_offset(cv, s.page, s.slot, h)];
      if constexpr (F == Format::kFp8E4M3) scale = cv.head_scale[h];
      if constexpr (F != Format::kNative) {
#pragma unroll
        for (int e = 0; e < 8; ++e) f[e] *= scale;
      }
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) f[e] = is_k ? __int_as_float(0x7fc00000) : 0.f;
    }
    uint4 out;
    uint32_t* o = reinterpret_cast<uint32_t*>(&out);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const T lo = from_float<T>(f[2 * e]), hi = from_float<T>(f[2 * e + 1]);
      o[e] = uint32_t(*reinterpret_cast<const uint16_t*>(&lo)) |
             (uint32_t(*reinterpret_cast<const uint16_t*>(&hi)) << 16);
    }
    T* dst = (is_k ? k_dst : v_dst) + ((cu_k[b] + t) * c.kv_heads + h) * int64_t(c.head_dim) + ch;
    *reinterpret_cast<uint4*>(dst) = out;
  }
}

}  // namespace cuda
}  // namespace kvcache
}  // namespace longctx
