// Fused RoPE on q and k together, in place or out of place, forward or inverse.
//
// What it computes: for every token, head and rotary pair of q and k, the rotation of rope_math.h
// at the token's position, in fp32, rounded once to the element type.
//
// Tiling: one block handles kTokens consecutive tokens. Phase 1 computes cos/sin for the block's
// tokens x n_freq frequencies into shared memory (each angle once, shared by all heads).
// Phase 2 walks the units of (token, head, chunk): a unit is V elements of the first half and
// the matching V of the second half (NeoX), or V consecutive elements holding V/2 pairs
// (interleaved). With VEC, a V-element chunk is one 16-byte access; the launcher chooses VEC only
// when every pointer and stride is 16-byte aligned, so the kernel itself never checks alignment.
//
// Invariants: offsets are 64-bit (tensors past 2^31 elements); out-of-place launches copy the
// channels past rotary_dim through; in-place launches never touch them.
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "longctx/rope/rope_math.h"
#include "longctx/rope/rope_params.h"
#include "longctx/rope/rope_kernel_limits.h"

namespace longctx {
namespace rope {

constexpr int kThreads = 256;
constexpr int kTokens = 4;
constexpr int kMaxFreq = kMaxFrequencies;

template <typename T> LONGCTX_DEVICE float to_float(T x) { return static_cast<float>(x); }
template <> LONGCTX_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> LONGCTX_DEVICE float to_float(__half x) { return __half2float(x); }
template <typename T> LONGCTX_DEVICE T from_float(float x) { return static_cast<T>(x); }
template <> LONGCTX_DEVICE __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
template <> LONGCTX_DEVICE __half from_float(float x) { return __float2half_rn(x); }

template <typename T, int V, bool VEC>
struct Chunk {
  static_assert(!VEC || V * sizeof(T) == 16, "vector chunks are 16 bytes");
  float v[V];
  LONGCTX_DEVICE void load(const T* p) {
    if constexpr (VEC) {
      uint4 raw = *reinterpret_cast<const uint4*>(p);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] = to_float(e[i]);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] = to_float(p[i]);
    }
  }
  LONGCTX_DEVICE void store(T* p) const {
    if constexpr (VEC) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < V; ++i) e[i] = from_float<T>(v[i]);
      *reinterpret_cast<uint4*>(p) = raw;
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) p[i] = from_float<T>(v[i]);
    }
  }
};

template <typename P>
LONGCTX_DEVICE float load_position(const Params& p, int64_t b, int64_t s) {
  const P* pos = static_cast<const P*>(p.positions);
  return static_cast<float>(pos[b * p.pos_stride_b + s * p.pos_stride_s]);
}

// Rotates (or copies through) one unit of one head of one token.
template <typename T, int V, bool VEC, bool INTERLEAVED>
LONGCTX_DEVICE void rotate_unit(const HeadsView& h, int64_t b, int64_t s, int head, int chunk,
                                int n_freq, const CosSin* cs) {
  const T* in = static_cast<const T*>(h.in) + b * h.in_stride_b + s * h.in_stride_s +
                head * h.in_stride_h;
  T* out = static_cast<T*>(h.out) + b * h.out_stride_b + s * h.out_stride_s +
           head * h.out_stride_h;
  if constexpr (INTERLEAVED) {
    const int e0 = chunk * V;  // V consecutive channels = V/2 pairs
    Chunk<T, V, VEC> x;
    x.load(in + e0);
#pragma unroll
    for (int i = 0; i < V; i += 2) rotate(x.v[i], x.v[i + 1], cs[(e0 + i) / 2]);
    x.store(out + e0);
  } else {
    const int e0 = chunk * V;  // channels e0.. of the first half, e0 + n_freq.. of the second
    Chunk<T, V, VEC> x1, x2;
    x1.load(in + e0);
    x2.load(in + e0 + n_freq);
#pragma unroll
    for (int i = 0; i < V; ++i) rotate(x1.v[i], x2.v[i], cs[e0 + i]);
    x1.store(out + e0);
    x2.store(out + e0 + n_freq);
  }
}

template <typename T, int V, bool VEC, bool INTERLEAVED>
__global__ void __launch_bounds__(kThreads) rope_kernel(const Params p) {
  __shared__ CosSin cs[kTokens][kMaxFreq];
  const int64_t tokens = p.batch * p.seqlen;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTokens;
  const int ntok = tokens - t0 < kTokens ? static_cast<int>(tokens - t0) : kTokens;

  for (int i = threadIdx.x; i < ntok * p.n_freq; i += kThreads) {
    const int tok = i / p.n_freq, f = i % p.n_freq;
    const int64_t t = t0 + tok;
    const int64_t b = t / p.seqlen, s = t % p.seqlen;
    const float pos = p.positions_int64 ? load_position<int64_t>(p, b, s)
                                        : load_position<int32_t>(p, b, s);
    cs[tok][f] = cos_sin(pos, __ldg(p.inv_freq + f), p.scale, p.inverse);
  }
  __syncthreads();

  const int rotary_dim = 2 * p.n_freq;
  const int units_per_head = rotary_dim / V / (INTERLEAVED ? 1 : 2);
  const int heads = p.q.heads + p.k.heads;
  const int units = ntok * heads * units_per_head;
  for (int u = threadIdx.x; u < units; u += kThreads) {
    const int chunk = u % units_per_head;
    const int head = (u / units_per_head) % heads;
    const int tok = u / (units_per_head * heads);
    const int64_t t = t0 + tok;
    const int64_t b = t / p.seqlen, s = t % p.seqlen;
    if (head < p.q.heads) {
      rotate_unit<T, V, VEC, INTERLEAVED>(p.q, b, s, head, chunk, p.n_freq, cs[tok]);
    } else {
      rotate_unit<T, V, VEC, INTERLEAVED>(p.k, b, s, head - p.q.heads, chunk, p.n_freq, cs[tok]);
    }
  }

  // Channels past rotary_dim: copied through by out-of-place launches only.
  const int pass = p.head_dim - rotary_dim;
  if (pass > 0 && !p.inplace) {
    for (int u = threadIdx.x; u < ntok * heads * pass; u += kThreads) {
      const int c = rotary_dim + u % pass;
      const int head = (u / pass) % heads;
      const int64_t t = t0 + u / (pass * heads);
      const int64_t b = t / p.seqlen, s = t % p.seqlen;
      const HeadsView& h = head < p.q.heads ? p.q : p.k;
      const int hh = head < p.q.heads ? head : head - p.q.heads;
      static_cast<T*>(h.out)[b * h.out_stride_b + s * h.out_stride_s + hh * h.out_stride_h + c] =
          static_cast<const T*>(h.in)[b * h.in_stride_b + s * h.in_stride_s + hh * h.in_stride_h + c];
    }
  }
}

// True when every access of a V-element chunk is 16-byte aligned for this launch.
template <typename T>
inline bool can_vectorize(const Params& p) {
  constexpr int V = 16 / sizeof(T);
  auto ok_ptr = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  auto ok_view = [&](const HeadsView& h) {
    if (h.heads == 0) return true;
    return ok_ptr(h.in) && ok_ptr(h.out) && h.in_stride_b % V == 0 && h.in_stride_s % V == 0 &&
           h.in_stride_h % V == 0 && h.out_stride_b % V == 0 && h.out_stride_s % V == 0 &&
           h.out_stride_h % V == 0;
  };
  const int per_chunk = p.interleaved ? V : 2 * V;  // rotary channels one unit covers
  return ok_view(p.q) && ok_view(p.k) && (2 * p.n_freq) % per_chunk == 0;
}

template <typename T, int V, bool VEC>
inline cudaError_t launch_layout(const Params& p, cudaStream_t stream) {
  const int64_t tokens = p.batch * p.seqlen;
  const int64_t blocks = (tokens + kTokens - 1) / kTokens;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  if (p.interleaved) {
    rope_kernel<T, V, VEC, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  } else {
    rope_kernel<T, V, VEC, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

// Entry point: chooses 16-byte chunks when alignment allows, element-wise chunks otherwise.
// Requires 0 < n_freq <= kMaxFreq and 2 * n_freq <= head_dim (the launcher checks).
template <typename T>
inline cudaError_t launch_rope(const Params& p, cudaStream_t stream) {
  if (p.batch * p.seqlen == 0 || p.q.heads + p.k.heads == 0) return cudaSuccess;
  if (p.n_freq <= 0 || p.n_freq > kMaxFreq) return cudaErrorInvalidValue;
  if (can_vectorize<T>(p)) return launch_layout<T, 16 / sizeof(T), true>(p, stream);
  if (p.interleaved) return launch_layout<T, 2, false>(p, stream);
  return launch_layout<T, 1, false>(p, stream);
}

}  // namespace rope
}  // namespace longctx
