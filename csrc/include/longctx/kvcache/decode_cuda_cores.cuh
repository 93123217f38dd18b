// Split-KV decode attention over the paged KV cache on CUDA cores: the kernel of widths D = 64,
// 128 and 256 where the tensor-core kernels do not apply (decode_launch.cuh says which kernel
// serves a call); head_dim d (a multiple of 8) <= D, the threads of dims >= d load nothing. The
// few query rows of a decode step (seqlen_q * heads / kv_heads <= 32 packed rows per kv
// head) against up to millions of cached keys, dequantized in registers.
//
// Work decomposition. One CTA (128 threads) per (kv head hk x tile of GT packed query rows,
// split, sequence b). Packed rows are r = i * group + g (query i, head hk * group + g), as in the
// CPU twin, so every key of kv head hk is loaded once for all the group's query heads (GT = 1, 4
// or 8 rows per CTA; rows past the sequence's are inactive). The keys a tile sees (the union of
// its rows' mask intervals) are cut into num_splits contiguous ranges, one per CTA.
//
// Inside a CTA: a key row of D elements is read by TPK = D / 8 threads, 8 elements each
// (16-byte loads for bf16/fp16, 8-byte loads for int8/fp8; zeros past d, not loaded), so the CTA
// holds NG = 128 / TPK keys per step and U steps per batch. Batches are software-pipelined: the
// page ids of batch n + 2 and the K/V data (and int8 scales) of batch n + 1 are in flight while
// batch n is computed. Each
// thread keeps the query rows' 8 elements in fp32 registers (pre-multiplied by score_prescale:
// softmax_scale * log2(e), or softmax_scale / softcap; and by the fp8 K scale of the head),
// computes its partial dot products, reduces them over its TPK lanes with xor shuffles, caps them
// (softcap: cap_score) and runs an fp32 online softmax (exp2) per key group; int8 per-token scales
// multiply the score (K) and the probability (V), the fp8 V scale multiplies the output. At the
// end the NG key groups are merged through shared memory (combine_and_store), and with
// num_splits > 1 the merge kernel (decode_merge.cuh) combines the splits' partials.
//
// Launch: programmatic dependent (grid_dependency.cuh): the kernel waits for the previous grid
// before its first memory access.
// Invariants: every pool access goes through the block table with the page id checked against
// [0, num_blocks) (invalid pages are masked keys, never read), keys past cached_len are masked,
// offsets are int64. A row that sees no key gets out = 0, lse = -inf. Requires the pool base
// pointers 16-byte aligned and the page / slot / head strides multiples of 8 elements (the
// launcher checks).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <type_traits>
#include "longctx/kvcache/decode_common.cuh"
#include "longctx/kvcache/kvcache_params.h"
#include "longctx/kvcache/paged.h"

namespace longctx {
namespace kvcache {
namespace cuda {

template <Format F>
using RawVec = std::conditional_t<F == Format::kNative, uint4, uint2>;  // 8 elements

// 8 stored elements -> fp32 (the stored value; scales are applied by the caller).
template <typename T, Format F>
__device__ __forceinline__ void cvt8(const RawVec<F>& r, float* f) {
  if constexpr (F == Format::kNative) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
      } else {
        __half2 h = *reinterpret_cast<const __half2*>(&w[i]);
        const float2 v = __half22float2(h);
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
      }
    }
  } else if constexpr (F == Format::kInt8) {
    // Bias to unsigned, place the byte in the mantissa of 2^23: (2^23 + u) - (2^23 + 128) is the
    // signed value, exactly (two full-rate instructions instead of a quarter-rate I2F).
    const uint32_t w[2] = {r.x ^ 0x80808080u, r.y ^ 0x80808080u};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j)
        f[4 * i + j] = __uint_as_float(__byte_perm(w[i], 0x4B000000u, 0x7540u + j)) - 8388736.f;
    }
  } else {
    const uint32_t w[2] = {r.x, r.y};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const __half2_raw hr = __nv_cvt_fp8x2_to_halfraw2(
            static_cast<__nv_fp8x2_storage_t>((w[i] >> (16 * j)) & 0xffffu), __NV_E4M3);
        __half2 h;
        *reinterpret_cast<__half2_raw*>(&h) = hr;
        const float2 v = __half22float2(h);
        f[4 * i + 2 * j] = v.x;
        f[4 * i + 2 * j + 1] = v.y;
      }
    }
  }
}

template <Format F>
__device__ __forceinline__ RawVec<F> load_raw(const void* base, int64_t elem_off) {
  if constexpr (F == Format::kNative) {
    return __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + elem_off));
  } else {
    return __ldg(reinterpret_cast<const uint2*>(static_cast<const uint8_t*>(base) + elem_off));
  }
}


template <int D, int GT>
struct DecodeShape {
  static constexpr int kVec = 8;
  static constexpr int kTPK = D / kVec;                  // threads per key row
  static constexpr int kNG = kDecodeThreads / kTPK;      // keys per step
  static_assert(D % 64 == 0 && kTPK <= 32, "head_dim 64, 128 or 256");
};

template <typename T, Format F, int D, int GT, int U, int MinBlocks = 1>
__global__ void __launch_bounds__(kDecodeThreads, MinBlocks)
    kvcache_decode_kernel(const AttnParams p, int m_tiles) {
  using Shape = DecodeShape<D, GT>;
  constexpr int TPK = Shape::kTPK, NG = Shape::kNG, KB = NG * U;
  using Raw = RawVec<F>;
  __shared__ float sm_m[NG][GT], sm_l[NG][GT];
  __shared__ float sm_acc[NG][GT][D];

  grid_dependency_wait();  // before the first read (grid_dependency.cuh)
  grid_dependents_may_launch();
  const DecodeCta cta = decode_cta(m_tiles);
  const int split = cta.split, hk = cta.hk, mt = cta.mt, b = cta.b;
  const int tid = threadIdx.x, kg = tid / TPK, ld = tid % TPK;
  const PagedKV& c = p.cache;
  // Dims [8 ld, 8 ld + 8) lie in the head_dim d (a multiple of 8): threads past it hold q = 0 and
  // mask every key (load_pages), so they load no K/V and add zeros to the reduced dot products;
  // a key row costs d elements of memory traffic.
  const bool col_ok = ld * 8 < c.head_dim;
  const int group = p.heads / c.kv_heads;
  const SeqLen s = sequence(p, b);
  const int R = s.sq * group;
  const int r0 = mt * GT;
  if (r0 >= R) return;  // whole CTA: uniform

  float qscale = score_prescale(p);
  if constexpr (F == Format::kFp8E4M3) qscale *= c.k.head_scale[hk];
  float q[GT][8];
  int lo[GT], hi[GT];
  int klo = 0x7fffffff, khi = 0;
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    const int r = r0 + g;
    lo[g] = 0;
    hi[g] = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) q[g][e] = 0.f;
    if (r < R) {
      const int i = r / group;
      const int h = hk * group + r % group;
      const T* qp = static_cast<const T*>(p.q) + s.q_offset(p.q_batch_stride, p.q_row_stride) +
                    int64_t(i) * p.q_row_stride +
                    int64_t(h) * p.q_head_stride + ld * 8;
      if (col_ok) {
#pragma unroll
        for (int e = 0; e < 8; ++e) q[g][e] = to_float(qp[e]) * qscale;
      }
      row_interval(i, s.sq, s.sk, p.window_left, p.window_right, lo[g], hi[g]);
      if (hi[g] > lo[g]) {
        klo = min(klo, lo[g]);
        khi = max(khi, hi[g]);
      }
    }
  }
  if (khi <= klo) {
    klo = 0;
    khi = 0;
  }
  // This split's keys: contiguous ranges, each a multiple of KB keys.
  const int64_t nkeys = khi - klo;
  const int64_t per = ((nkeys + p.num_splits - 1) / p.num_splits + KB - 1) / KB * KB;
  const int64_t kb64 = klo + per * split;
  const int kb = static_cast<int>(kb64 < khi ? kb64 : khi);
  const int ke = static_cast<int>(kb64 + per < khi ? kb64 + per : khi);

  const int bs = c.block_size;
  const bool pow2 = (bs & (bs - 1)) == 0;
  const int bs_shift = __ffs(bs) - 1;
  const int32_t* bt = c.block_table + int64_t(b) * c.block_table_stride;
  const int64_t k_head = int64_t(hk) * c.k.head_stride + ld * 8;
  const int64_t v_head = int64_t(hk) * c.v.head_stride + ld * 8;

  // page id (or -1: masked) of each key of a batch; -1 for the threads past the head_dim, which
  // then load nothing, and whose masked state (zeros past d) is never stored
  auto load_pages = [&](int j0, int (&pg)[U]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u * NG + kg;
      pg[u] = -1;
      if (col_ok && j < ke) {
        const int pi = pow2 ? (j >> bs_shift) : j / bs;
        const int page = __ldg(bt + pi);
        pg[u] = (page >= 0 && int64_t(page) < c.num_blocks) ? page : -1;
      }
    }
  };
  struct Batch {
    Raw k[U], v[U];
    float ks[U], vs[U];
    int pg[U];
  };
  auto load_data = [&](int j0, const int (&pg)[U], Batch& bt_) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u * NG + kg;
      bt_.pg[u] = pg[u];
      bt_.ks[u] = 1.f;
      bt_.vs[u] = 1.f;
      if (pg[u] >= 0) {
        const int slot = pow2 ? (j & (bs - 1)) : j - (j / bs) * bs;
        bt_.k[u] = load_raw<F>(c.k.data, int64_t(pg[u]) * c.k.page_stride +
                                             int64_t(slot) * c.k.slot_stride + k_head);
        bt_.v[u] = load_raw<F>(c.v.data, int64_t(pg[u]) * c.v.page_stride +
                                             int64_t(slot) * c.v.slot_stride + v_head);
        if constexpr (F == Format::kInt8) {
          bt_.ks[u] = __ldg(c.k.token_scale + scale_offset(c.k, pg[u], slot, hk));
          bt_.vs[u] = __ldg(c.v.token_scale + scale_offset(c.v, pg[u], slot, hk));
        }
      } else {
        bt_.k[u] = Raw{};
        bt_.v[u] = Raw{};
      }
    }
  };

  float m[GT], l[GT], acc[GT][8];
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  }

  Batch cur, nxt;
  int pg_next[U];
  if (kb < ke) {
    int pg0[U];
    load_pages(kb, pg0);
    load_data(kb, pg0, cur);
    load_pages(kb + KB, pg_next);
  }
  for (int j0 = kb; j0 < ke; j0 += KB) {
    if (j0 + KB < ke) {
      load_data(j0 + KB, pg_next, nxt);
      load_pages(j0 + 2 * KB, pg_next);
    }
    float sc[U][GT];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[8];
      cvt8<T, F>(cur.k[u], kf);
#pragma unroll
      for (int g = 0; g < GT; ++g) {
        float a = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) a = fmaf(q[g][e], kf[e], a);
        sc[u][g] = a;
      }
    }
#pragma unroll
    for (int off = TPK / 2; off >= 1; off >>= 1) {
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int g = 0; g < GT; ++g) sc[u][g] += __shfl_xor_sync(0xffffffffu, sc[u][g], off);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u * NG + kg;
#pragma unroll
      for (int g = 0; g < GT; ++g) {
        float x = sc[u][g];
        if constexpr (F == Format::kInt8) x *= cur.ks[u];
        x = cap_score(x, p.mods.softcap);
        sc[u][g] = (cur.pg[u] >= 0 && j >= lo[g] && j < hi[g]) ? x : -INFINITY;
      }
    }
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < U; ++u) mx = fmaxf(mx, sc[u][g]);
      if (mx != m[g]) {  // mx > m: rescale (m = -inf gives alpha = 0)
        const float alpha = exp2f(m[g] - mx);
        l[g] *= alpha;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] *= alpha;
        m[g] = mx;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[8];
      cvt8<T, F>(cur.v[u], vf);
#pragma unroll
      for (int g = 0; g < GT; ++g) {
        const float mref = m[g] == -INFINITY ? 0.f : m[g];
        const float pr = exp2f(sc[u][g] - mref);
        l[g] += pr;
        float pv = pr;
        if constexpr (F == Format::kInt8) pv *= cur.vs[u];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(pv, vf[e], acc[g][e]);
      }
    }
    cur = nxt;
  }

  // Merge the NG key groups.
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    if (ld == 0) {
      sm_m[kg][g] = m[g];
      sm_l[kg][g] = l[g];
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) sm_acc[kg][g][ld * 8 + e] = acc[g][e];
  }
  __syncthreads();
  float vscale = 1.f;
  if constexpr (F == Format::kFp8E4M3) vscale = c.v.head_scale[hk];
  combine_and_store<T, D, GT, NG, GT>(p, s, split, hk, r0, R, group, vscale, &sm_m[0][0],
                                      &sm_l[0][0], &sm_acc[0][0][0]);
}

}  // namespace cuda
}  // namespace kvcache
}  // namespace longctx
