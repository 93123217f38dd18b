// The tensor-core tile math of the decode kernels (decode_mma.cuh: loads held in registers,
// decode_staged.cuh: loads staged in shared memory by cp.async): per warp and 16-key tile,
// S = Q K^T and O += P V with mma.sync m16n8k16 (fp32 accumulation) and an online softmax in
// fp32; the CTA-level frame around the key loop (grid coordinates, rows and their key intervals,
// query fragments, the final combine of the 4 warps). Only where the K/V fragments come from
// differs between the two kernels.
//
// Per 16-key tile and warp (lane = 4 r + c, r = lane / 4, c = lane % 4):
//   S (16 rows x 16 keys) = Q K^T: A = Q (rows r, r + 8; rows >= 8 are always zero since
//   GT <= 8), B = K. Key 8 h + r of the tile (n-block h) is held by lanes 4 r + c, each with
//   D / 4 contiguous-in-pieces elements (16-byte pieces); the head dimension is permuted
//   consistently in Q and K (a dot product does not depend on the order of its terms), so the
//   loaded registers are the B fragments as they are (8-bit caches: one cvt per pair).
//   Thread (r, c) then holds S[r][keys 8 h + 2 c + {0, 1}], h = 0, 1.
//   O (16 rows x D) += P V: A = P (the S accumulators repacked, FlashAttention's register reuse),
//   B = V: thread (r, c) holds keys 2 c, 2 c + 1, 2 c + 8, 2 c + 9 at dims [D/8 r, D/8 (r + 1))
//   and pairs the two keys' values per dim with one byte permute; column n of n-block j is dim
//   (D / 8) n + j, so thread (r, c) accumulates dims [D/4 c, D/4 (c + 1)) of row r.
// Dequantization: fp8 codes -> fp16 by cvt (exact), int8 -> fp16 by the 0x6400 magic number
// (exact; for K the magic's offset 1152 stays in and 1152 sum(q) leaves the scores in their
// scaling FMA, MmaRowState::kbias); Q is then fp16 (bf16 q converts exactly within fp16's
// range), the mma is f16 with fp32 accumulation; scales are applied in fp32: S *= score_prescale
// (decode_common.cuh) * (fp8: K head scale; int8: the key's scale), then the softcap; P *= the
// int8 V scale of its key before packing, the fp8 V scale multiplies the output. bf16 / fp16
// caches use their own mma type. P is rounded to the mma type (bf16 for a bf16 cache, as
// FlashAttention does; fp16 otherwise).
// Invariants: keys past a row's mask interval or on invalid pages get P = 0 and their V is zero
// (not loaded), so stale or NaN slots never reach the output.
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
#include "longctx/seqlen.h"

namespace longctx {
namespace kvcache {
namespace cuda {

constexpr int kMmaWarps = 4;
constexpr int kMmaTile = 16;  // keys per warp tile
// Row stride (floats) of the warps' partial outputs in shared memory (MmaRowState::to_smem):
// 1 mod 32 words and room for the skewed layout o_pos<D, true> (at most D + 23).
template <int D>
constexpr int kMmaOStride = D + 33;

template <bool kBf16>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t pack2(float lo, float hi, bool bf16) {
  if (bf16) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// int8 codes biased by 128 (code ^ 0x80, i.e. code + 128 as a byte) in the two bytes of x that
// sel picks (a __byte_perm selector: 0x4140 bytes 0, 1; 0x4342 bytes 2, 3) -> fp16x2 of
// 1152 + code: (0x64 << 8 | (code + 128)) is 1024 + code + 128 in fp16 (the 0x6400 magic number).
__device__ __forceinline__ uint32_t int8_plus_1152_h2(uint32_t x, uint32_t sel) {
  return __byte_perm(x, 0x64646464u, sel);
}

// fp16x2 t - 1152 (each half): with int8_plus_1152_h2, the int8 codes exactly.
__device__ __forceinline__ uint32_t minus_1152_h2(uint32_t t) {
  __half2 h = *reinterpret_cast<const __half2*>(&t);
  h = __hsub2(h, __half2half2(__ushort_as_half(0x6480)));  // 1152.0
  return *reinterpret_cast<uint32_t*>(&h);
}

// Four 8-bit codes (bytes 0..3 of x) -> fp16x2 of bytes 0, 1 (lo) and of bytes 2, 3 (hi), exact.
// fp8: the cvt reads the high half of x in place (ptxas folds the b16 split into the operand:
// no shift per pair); int8 (x already biased, see int8_plus_1152_h2): the magic number minus 1152.
template <Format F>
__device__ __forceinline__ void codes4_to_h2x2(uint32_t x, uint32_t& lo, uint32_t& hi) {
  if constexpr (F == Format::kFp8E4M3) {
    asm("{\n .reg .b16 l, h;\n mov.b32 {l, h}, %2;\n cvt.rn.f16x2.e4m3x2 %0, l;\n"
        " cvt.rn.f16x2.e4m3x2 %1, h;\n}\n"
        : "=r"(lo), "=r"(hi)
        : "r"(x));
  } else {
    lo = minus_1152_h2(int8_plus_1152_h2(x, 0x4140u));
    hi = minus_1152_h2(int8_plus_1152_h2(x, 0x4342u));
  }
}

// The rows of one CTA (GT packed rows from r0) and the keys they see: this thread's row r's
// interval [lo, hi) (empty for rows >= GT or past R) and the union [klo, khi) (klo rounded down
// to a 16-key tile).
struct MmaRows {
  int lo = 0, hi = 0, klo = 0, khi = 0;
  bool row_active = false;
};

template <int GT>
__device__ __forceinline__ MmaRows mma_rows(const AttnParams& p, const SeqLen& s, int r0,
                                            int R, int group, int r) {
  MmaRows m;
  int klo = 0x7fffffff, khi = 0;
  int i = r0 / group, in_group = r0 - i * group;  // row of q and head in the group of r0 + g
  for (int g = 0; g < GT; ++g) {
    const int rr = r0 + g;
    if (rr >= R) break;
    int a, e;
    row_interval(i, s.sq, s.sk, p.window_left, p.window_right, a, e);
    if (++in_group == group) {
      in_group = 0;
      ++i;
    }
    if (g == r) {
      m.lo = a;
      m.hi = e;
    }
    if (e > a) {
      klo = min(klo, a);
      khi = max(khi, e);
    }
  }
  m.row_active = r < GT && r0 + r < R;
  if (!m.row_active) m.lo = m.hi = 0;
  if (khi <= klo) klo = khi = 0;
  m.klo = klo & ~(kMmaTile - 1);
  m.khi = khi;
  return m;
}

// One 16-key tile in the registers of one warp, as the mma consumes it (see the header for the
// fragment maps): k[h] = this thread's 16-byte pieces i * 4 + c of key 8 h + r; v[e] = bytes
// [r * D/8 * EB, +D/8 * EB) of key 2 c + (e & 1) + 8 (e >> 1); kscale / vscale its int8 scales
// (1 otherwise); svalid whether key e may be used (page valid, key < khi).
template <Format F, int D>
struct MmaTileFrags {
  static constexpr int kEB = F == Format::kNative ? 2 : 1;  // bytes per stored element
  static constexpr int kKLoads = D / 4 * kEB / 16;           // 16-byte K pieces per key
  static constexpr int kKWords = kKLoads * 4;
  static constexpr int kVBytes = D / 8 * kEB;                // V bytes per key and thread
  static constexpr int kVWords = kVBytes / 4;
  uint32_t k[2][kKWords];
  uint32_t v[4][kVWords];
  float kscale[4], vscale[4];
  bool svalid[4];

  // Piece u (16 bytes) of key half h's K fragment.
  __device__ __forceinline__ void set_k_piece(int h, int u, const uint4& x) {
    k[h][4 * u] = x.x;
    k[h][4 * u + 1] = x.y;
    k[h][4 * u + 2] = x.z;
    k[h][4 * u + 3] = x.w;
  }
};

// Q fragments of row r (rows r + 8 are zero): list index L of this thread's K elements is the
// physical dim (L / P) * 4P + c P + L % P, P = elements per 16-byte piece (the permutation the
// K pieces i * 4 + c imply); Q is rounded to the mma type. Two steps, so that a kernel can issue
// the loads first and convert after other work (the staged kernel: after its first copies):
// QueryRaw holds this thread's D / 4 query elements as loaded (bits; zeros for a null row and
// for the dims >= d, the head_dim, which a kernel of width D > d computes as zeros: q.k and the
// int8 key bias see only the d dims, the kernels' K past them being finite, zero-filled).
template <typename T, int D>
struct QueryRaw {
  uint16_t x[D / 4];
};

template <typename T, Format F, int D>
__device__ __forceinline__ void load_q_raw(const T* qp, int c, int d, QueryRaw<T, D>& raw) {
  constexpr int kPiece = 16 / MmaTileFrags<F, D>::kEB;
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(qp);
#pragma unroll
  for (int L = 0; L < D / 4; ++L) {
    const int dim = (L / kPiece) * (4 * kPiece) + c * kPiece + L % kPiece;
    raw.x[L] = qp != nullptr && dim < d ? bits[dim] : 0;
  }
}

template <typename T, Format F, int D>
__device__ __forceinline__ void q_frags_from_raw(const QueryRaw<T, D>& raw,
                                                 uint32_t (&qa)[D / 16][2]) {
  constexpr bool kBf16 = F == Format::kNative && std::is_same_v<T, __nv_bfloat16>;
  auto value = [&](int L) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      return __uint_as_float(uint32_t(raw.x[L]) << 16);
    } else {
      return __half2float(__ushort_as_half(raw.x[L]));
    }
  };
#pragma unroll
  for (int st = 0; st < D / 16; ++st) {
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2)
      qa[st][h2] = pack2(value(4 * st + 2 * h2), value(4 * st + 2 * h2 + 1), kBf16);
  }
}

// One warp's online-softmax state for its row r (thread (r, c) holds dims [D/4 c, D/4 (c + 1))
// as o[jb][0..1] = dims (D/8) (2c) + jb and (D/8) (2c + 1) + jb) and the tile update.
template <typename T, Format F, int D>
struct MmaRowState {
  static constexpr bool kNative = F == Format::kNative;
  static constexpr bool kBf16 = kNative && std::is_same_v<T, __nv_bfloat16>;  // mma type
  static constexpr int kSteps = D / 16;  // k-steps of QK
  static constexpr int kNB = D / 8;      // n-blocks of PV
  float o[kNB][2];
  float m = -INFINITY, l = 0.f;
  // int8: K enters the mma as 1152 + code (the 0x6400 magic number without its subtraction,
  // one byte permute per pair), so S = Q K^T + 1152 sum(q); kbias = 1152 sum(q) qscale of this
  // thread's row is subtracted in the score's scaling FMA (set_key_bias). Exact up to fp32
  // rounding of a sum ~1152 |q| (relative 2^-23 of it, far below the int8 error).
  float kbias = 0.f;
  float softcap;  // cap_score's (decode_common.cuh)

  __device__ __forceinline__ explicit MmaRowState(float softcap_) : softcap(softcap_) {
#pragma unroll
    for (int j = 0; j < kNB; ++j) o[j][0] = o[j][1] = 0.f;
  }

  // int8 caches: kbias from this thread's row of Q (fragments qa, fp16); every lane of the warp
  // calls it (the row sum goes across the row's 4 lanes).
  __device__ __forceinline__ void set_key_bias(const uint32_t (&qa)[kSteps][2], float qscale) {
    if constexpr (F == Format::kInt8) {
      float sum = 0.f;
#pragma unroll
      for (int st = 0; st < kSteps; ++st) {
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) {
          const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&qa[st][h2]));
          sum += f.x + f.y;
        }
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      kbias = 1152.f * sum * qscale;
    }
  }

  // Consume the tile at t0 (keys t0 .. t0 + 15): S = Q K^T, softcap, mask to [lo, hi) and svalid,
  // online softmax, O += P V. qscale = score_scale().
  __device__ __forceinline__ void consume(const MmaTileFrags<F, D>& L, int t0, int lo, int hi,
                                          const uint32_t (&qa)[kSteps][2], float qscale, int c) {
    uint32_t pa[2];
    scores(L, t0, lo, hi, qa, qscale, c, pa);
    accumulate(L, pa);
  }

  // consume's two halves, for a caller that reads L.v only after the scores (the staged kernel
  // at D = 256, where K and V fragments together would not fit the registers). scores uses
  // L.k, L.kscale, L.vscale and L.svalid and leaves P (A fragments) in pa; accumulate uses L.v.
  __device__ __forceinline__ void scores(const MmaTileFrags<F, D>& L, int t0, int lo, int hi,
                                         const uint32_t (&qa)[kSteps][2], float qscale, int c,
                                         uint32_t (&pa)[2]) {
    float sacc[2][4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      sacc[h][0] = sacc[h][1] = sacc[h][2] = sacc[h][3] = 0.f;
      const uint32_t* w = L.k[h];
#pragma unroll
      for (int st = 0; st < kSteps; ++st) {
        uint32_t b0, b1;
        if constexpr (kNative) {
          b0 = w[2 * st];
          b1 = w[2 * st + 1];
        } else if constexpr (F == Format::kInt8) {
          const uint32_t x = w[st] ^ 0x80808080u;  // 1152 + code in fp16 (see kbias)
          b0 = int8_plus_1152_h2(x, 0x4140u);
          b1 = int8_plus_1152_h2(x, 0x4342u);
        } else {
          codes4_to_h2x2<F>(w[st], b0, b1);
        }
        mma16816<kBf16>(sacc[h], qa[st][0], 0u, qa[st][1], 0u, b0, b1);
      }
    }
    // scale, softcap, mask, online softmax (row r; the 4 lanes of a row agree on m)
    float sv[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = t0 + 2 * c + (e & 1) + 8 * (e >> 1);
      float x;
      if constexpr (F == Format::kInt8) {
        x = fmaf(sacc[e >> 1][e & 1], qscale, -kbias) * L.kscale[e];
      } else {
        x = sacc[e >> 1][e & 1] * qscale;
      }
      x = cap_score(x, softcap);
      sv[e] = (L.svalid[e] && j >= lo && j < hi) ? x : -INFINITY;
    }
    float mx = fmaxf(fmaxf(sv[0], sv[1]), fmaxf(sv[2], sv[3]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m, mx);
    if (__any_sync(0xffffffffu, m_new != m)) {
      const float alpha = m_new == m ? 1.f : exp2f(m - m_new);  // m = -inf: 0
      l *= alpha;
#pragma unroll
      for (int j = 0; j < kNB; ++j) {
        o[j][0] *= alpha;
        o[j][1] *= alpha;
      }
      m = m_new;
    }
    const float mref = m == -INFINITY ? 0.f : m;
    float pr[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      pr[e] = exp2f(sv[e] - mref);
      l += pr[e];
      if constexpr (F == Format::kInt8) pr[e] *= L.vscale[e];
    }
    pa[0] = pack2(pr[0], pr[1], kBf16);  // keys 2c, 2c+1
    pa[1] = pack2(pr[2], pr[3], kBf16);  // keys 2c+8, 2c+9
  }

  // O += P V: n-block jb takes byte jb % 4 of word jb / 4 of the four keys; 8-bit codes are
  // paired per two n-blocks (one byte permute gives (k0.b, k1.b, k0.b+1, k1.b+1)).
  __device__ __forceinline__ void accumulate(const MmaTileFrags<F, D>& L,
                                             const uint32_t (&pa)[2]) {
#pragma unroll
    for (int jb = 0; jb < kNB; jb += 2) {
      uint32_t b0[2], b1[2];
      if constexpr (kNative) {
#pragma unroll
        for (int x = 0; x < 2; ++x) {
          const uint32_t sel = x ? 0x7632u : 0x5410u;
          b0[x] = __byte_perm(L.v[0][jb / 2], L.v[1][jb / 2], sel);
          b1[x] = __byte_perm(L.v[2][jb / 2], L.v[3][jb / 2], sel);
        }
      } else {
        const int wi = jb / 4;
        const uint32_t sel = (jb % 4) ? 0x7362u : 0x5140u;
        const uint32_t bias = F == Format::kInt8 ? 0x80808080u : 0u;
        codes4_to_h2x2<F>(__byte_perm(L.v[0][wi], L.v[1][wi], sel) ^ bias, b0[0], b0[1]);
        codes4_to_h2x2<F>(__byte_perm(L.v[2][wi], L.v[3][wi], sel) ^ bias, b1[0], b1[1]);
      }
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        float acc[4] = {o[jb + x][0], o[jb + x][1], 0.f, 0.f};
        mma16816<kBf16>(acc, pa[0], 0u, pa[1], 0u, b0[x], b1[x]);
        o[jb + x][0] = acc[0];
        o[jb + x][1] = acc[1];
      }
    }
  }

  // Writes this warp's state into the CTA's combine arrays (slot warp * 8 + r) and, after the
  // caller's __syncthreads(), combine_and_store reads them.
  __device__ __forceinline__ void to_smem(float* sm_m, float* sm_l, float* sm_o, int warp, int r,
                                          int c) const {
    float lsum = l;
    lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
    lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
    if (c == 0) {
      sm_m[warp * 8 + r] = m;
      sm_l[warp * 8 + r] = lsum;
    }
    // Row stride kMmaOStride, skewed positions (o_pos): dims (D/8) (2c) + jb and
    // (D/8) (2c + 1) + jb lie in quarter c, so each store of the warp hits 32 distinct banks
    // (unskewed, all 32 lanes hit one bank).
    float* orow = sm_o + (warp * 8 + r) * kMmaOStride<D> + 8 * c;
#pragma unroll
    for (int jb = 0; jb < kNB; ++jb) {
      orow[(D / 8) * (2 * c) + jb] = o[jb][0];
      orow[(D / 8) * (2 * c + 1) + jb] = o[jb][1];
    }
  }
};

// The query row pointer of thread row r (nullptr if the row is inactive).
template <typename T>
__device__ __forceinline__ const T* mma_q_row(const AttnParams& p, const SeqLen& s, int r0,
                                              int r, int group, int hk, bool active) {
  if (!active) return nullptr;
  const int rr = r0 + r;
  return static_cast<const T*>(p.q) + s.q_offset(p.q_batch_stride, p.q_row_stride) +
         int64_t(rr / group) * p.q_row_stride +
         int64_t(hk * group + rr % group) * p.q_head_stride;
}

// What the tensor-core decode kernels (decode_mma.cuh's and decode_staged.cuh's) share
// around their key loops: the CTA's grid coordinates, this thread's (warp, r, c), the sequence
// and its packed rows; then (past_rows() false) the rows' key intervals and the query fragments,
// and at the end the combine of the warps' states and the store.
template <typename T, Format F, int D, int GT>
struct MmaCta {
  int split, hk, b, warp, r, c, group, R, r0;
  SeqLen s;
  // fp8: the head's K and V scales (1 otherwise), loaded at the start: a load in the epilogue
  // waits behind the other CTAs' streams (measured up to several us at 32K tokens).
  float k_head_scale = 1.f, v_head_scale = 1.f;

  __device__ __forceinline__ MmaCta(const AttnParams& p, int m_tiles) {
    const DecodeCta cta = decode_cta(m_tiles);
    split = cta.split;
    hk = cta.hk;
    b = cta.b;
    warp = threadIdx.x / 32;
    r = threadIdx.x % 32 / 4;
    c = threadIdx.x % 4;
    group = p.heads / p.cache.kv_heads;
    if constexpr (F == Format::kFp8E4M3) {
      k_head_scale = p.cache.k.head_scale[hk];
      v_head_scale = p.cache.v.head_scale[hk];
    }
    s = sequence(p, b);
    R = s.sq * group;
    r0 = cta.mt * GT;
  }
  // The row tile lies past the sequence's rows: the CTA has nothing to do.
  __device__ __forceinline__ bool past_rows() const { return r0 >= R; }
  // Whether this thread's row r is a query row (as MmaRows::row_active, without the key
  // intervals: load_q can go before the rows' intervals, which wait for cache_seqlens).
  __device__ __forceinline__ bool row_active() const { return r < GT && r0 + r < R; }
  __device__ __forceinline__ MmaRows rows(const AttnParams& p) const {
    return mma_rows<GT>(p, s, r0, R, group, r);
  }
  // The score scale: score_prescale (softmax_scale * log2(e), or with softcap
  // softmax_scale / softcap), times the fp8 K scale of the head.
  __device__ __forceinline__ float score_scale(const AttnParams& p) const {
    return score_prescale(p) * k_head_scale;
  }
  // This thread's query elements (load_q_raw; convert with q_frags_from_raw).
  __device__ __forceinline__ void load_q_raw(const AttnParams& p, bool row_active,
                                             QueryRaw<T, D>& raw) const {
    cuda::load_q_raw<T, F, D>(mma_q_row<T>(p, s, r0, r, group, hk, row_active), c,
                              p.cache.head_dim, raw);
  }
  // Loads and converts this thread's query fragments; returns score_scale(p).
  __device__ __forceinline__ float load_q(const AttnParams& p, bool row_active,
                                          uint32_t (&qa)[D / 16][2]) const {
    QueryRaw<T, D> raw;
    load_q_raw(p, row_active, raw);
    q_frags_from_raw<T, F, D>(raw, qa);
    return score_scale(p);
  }
  // Combines the warps' states through sm_m / sm_l (kMmaWarps * 8) and sm_o (kMmaWarps * 8 rows
  // of kMmaOStride<D> floats) and stores the rows; the caller has finished every read of what
  // those arrays alias.
  __device__ __forceinline__ void finish(const AttnParams& p, const MmaRowState<T, F, D>& st,
                                         float* sm_m, float* sm_l, float* sm_o) const {
    st.to_smem(sm_m, sm_l, sm_o, warp, r, c);
    __syncthreads();
    combine_and_store<T, D, GT, kMmaWarps, 8, kMmaOStride<D>, true>(
        p, s, split, hk, r0, R, group, v_head_scale, sm_m, sm_l, sm_o);
  }
};

}  // namespace cuda
}  // namespace kvcache
}  // namespace longctx
