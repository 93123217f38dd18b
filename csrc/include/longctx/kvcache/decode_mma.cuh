// Split-KV decode attention over the paged KV cache on tensor cores with the loads in flight held
// in registers, width D = 128 (head_dim d <= 128 of whole 16-byte pieces: the pieces past d are
// not loaded, zeros in the math; decode_common.cuh stores d columns): the fallback for caches of
// any format whose layout the staged kernel (decode_staged.cuh) cannot take but whose key rows
// start 16-byte aligned (a page size that is not a multiple of 16; decode_choice.h says which
// kernel serves a call). The tile math is decode_mma_tile.cuh's.
//
// Work decomposition: one CTA of 4 warps per (kv head x tile of GT <= 8 packed GQA rows, split,
// sequence); the CTA's keys are a contiguous range per split; each warp takes tiles of 16 keys
// in turn (NT tiles per warp and iteration: all their loads are issued before the first is
// used, so NT x 16 keys x 2 x D elements per warp are in flight) and keeps its own online
// softmax; the warps are merged through shared memory at the end, then splits by the merge
// kernel. Per tile, lane (r, c) loads key 8 h + r's pieces i * 4 + c of K (16-byte loads) and
// its bytes of V of keys 2 c, 2 c + 1, 2 c + 8, 2 c + 9: the B fragments as the mma takes them.
// Launch: programmatic dependent (grid_dependency.cuh). Invariants: invalid keys (page id
// outside the pool, key >= khi) are not loaded (zeros) and masked; pool offsets are int64.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include "longctx/kvcache/decode_common.cuh"
#include "longctx/kvcache/decode_mma_tile.cuh"
#include "longctx/kvcache/kvcache_params.h"
#include "longctx/kvcache/paged.h"

namespace longctx {
namespace kvcache {
namespace cuda {

// The split's key range [kb, ke): contiguous ranges of whole multiples of `unit` keys (a
// constant at every call site). 32-bit division: it sits on the path from the kernel's start to
// its first copy (the 64-bit one was a called routine).
__device__ __forceinline__ void split_range(const MmaRows& m, int num_splits, int split, int unit,
                                            int& kb, int& ke) {
  const unsigned nkeys = static_cast<unsigned>(m.khi - m.klo);  // < 2^31
  const unsigned s = static_cast<unsigned>(num_splits);
  const int64_t per = int64_t((nkeys + s - 1) / s + unit - 1) / unit * unit;
  const int64_t kb64 = m.klo + per * split;
  kb = static_cast<int>(kb64 < m.khi ? kb64 : m.khi);
  ke = static_cast<int>(kb64 + per < m.khi ? kb64 + per : m.khi);
}

template <typename T, Format F, int D, int GT, int NT, int MinBlocks = 1>
__global__ void __launch_bounds__(kMmaWarps * 32, MinBlocks)
    kvcache_decode_mma_kernel(const AttnParams p, int m_tiles) {
  static_assert(D == 64 || D == 128, "mma decode: head_dim 64 or 128");
  static_assert(GT <= 8, "mma decode: at most 8 packed rows per CTA");
  using Frags = MmaTileFrags<F, D>;
  using State = MmaRowState<T, F, D>;
  constexpr int kEB = Frags::kEB;
  constexpr int kKLoads = Frags::kKLoads;
  constexpr int kVLoads = Frags::kVBytes / 16;  // 16-byte V loads per key (1 or 2)
  static_assert(kKLoads >= 1 && kVLoads >= 1, "tile shape");

  __shared__ float sm_m[kMmaWarps * 8], sm_l[kMmaWarps * 8];
  __shared__ float sm_o[kMmaWarps * 8 * kMmaOStride<D>];

  grid_dependency_wait();  // before the first read (grid_dependency.cuh)
  grid_dependents_may_launch();
  const MmaCta<T, F, D, GT> cta(p, m_tiles);
  if (cta.past_rows()) return;
  const int hk = cta.hk, b = cta.b, warp = cta.warp, r = cta.r, c = cta.c;
  const PagedKV& cache = p.cache;
  const MmaRows rows = cta.rows(p);
  const int lo = rows.lo, hi = rows.hi, khi = rows.khi;
  constexpr int kChunk = kMmaTile * NT;  // keys per warp per iteration (NT tiles in flight)
  constexpr int kCtaKeys = kChunk * kMmaWarps;
  int kb, ke;
  split_range(rows, p.num_splits, cta.split, kCtaKeys, kb, ke);
  uint32_t qa[D / 16][2];
  const float qscale = cta.load_q(p, rows.row_active, qa);
  State st(p.mods.softcap);
  st.set_key_bias(qa, qscale);

  const int bs = cache.block_size;
  const bool pow2 = (bs & (bs - 1)) == 0;
  const int bs_shift = __ffs(bs) - 1;
  const bool fast_pages = bs % kMmaTile == 0;
  const int64_t cap = seq_capacity(cache);
  const int32_t* bt = cache.block_table + int64_t(b) * cache.block_table_stride;
  const uint8_t* kbase = static_cast<const uint8_t*>(cache.k.data);
  const uint8_t* vbase = static_cast<const uint8_t*>(cache.v.data);
  const int64_t k_head = int64_t(hk) * cache.k.head_stride;
  const int64_t v_head = int64_t(hk) * cache.v.head_stride;
  const int row_pieces = cache.head_dim * kEB / 16;  // 16-byte pieces of a key row (<= D's)

  // Page id of the 16-key tile at t0 when block_size is a multiple of 16 (the tile lies in one
  // page), -1 if invalid or past the block table. Loaded one iteration ahead of the data, so the
  // data loads never wait for the block table.
  auto tile_page_of = [&](int t0) -> int {
    if (!fast_pages || t0 >= cap) return -1;
    const int pi = pow2 ? (t0 >> bs_shift) : t0 / bs;
    const int pg = __ldg(bt + pi);
    return (pg >= 0 && int64_t(pg) < cache.num_blocks) ? pg : -1;
  };
  // Issues the loads of the tile at t0 (K, V, int8 scales); invalid keys read nothing (zeros).
  // tile_page: tile_page_of(t0) (fast path; ignored otherwise).
  auto load_tile = [&](int t0, int tile_page, Frags& L) {
    int tile_slot = 0;
    if (fast_pages) tile_slot = pow2 ? (t0 & (bs - 1)) : t0 % bs;
    auto key_loc = [&](int j, int& page, int& slot) {
      if (fast_pages) {
        page = tile_page;
        slot = tile_slot + (j - t0);
      } else if (j < cap) {
        const int pi = pow2 ? (j >> bs_shift) : j / bs;
        const int pg = __ldg(bt + pi);
        page = (pg >= 0 && int64_t(pg) < cache.num_blocks) ? pg : -1;
        slot = j - pi * bs;
      } else {
        page = -1;
        slot = 0;
      }
    };
    // K: keys t0 + 8 h + r
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = t0 + 8 * h + r;
      int page, slot;
      key_loc(j, page, slot);
      const bool kvalid = page >= 0 && j < khi;
      const uint8_t* src = kbase + (int64_t(page) * cache.k.page_stride +
                                    int64_t(slot) * cache.k.slot_stride + k_head) * kEB;
#pragma unroll
      for (int i = 0; i < kKLoads; ++i) {
        L.set_k_piece(h, i, kvalid && i * 4 + c < row_pieces
                                ? __ldg(reinterpret_cast<const uint4*>(src) + i * 4 + c)
                                : make_uint4(0, 0, 0, 0));
      }
    }
    // V: keys t0 + {2c, 2c + 1, 2c + 8, 2c + 9}, this thread's bytes of row r
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = t0 + 2 * c + (e & 1) + 8 * (e >> 1);
      int page, slot;
      key_loc(j, page, slot);
      L.svalid[e] = page >= 0 && j < khi;
      const uint8_t* src = vbase + (int64_t(page) * cache.v.page_stride +
                                    int64_t(slot) * cache.v.slot_stride + v_head) * kEB;
#pragma unroll
      for (int i = 0; i < kVLoads; ++i) {
        const uint4 x = L.svalid[e] && r * kVLoads + i < row_pieces
                            ? __ldg(reinterpret_cast<const uint4*>(src) + r * kVLoads + i)
                            : make_uint4(0, 0, 0, 0);
        L.v[e][4 * i] = x.x;
        L.v[e][4 * i + 1] = x.y;
        L.v[e][4 * i + 2] = x.z;
        L.v[e][4 * i + 3] = x.w;
      }
      L.kscale[e] = L.vscale[e] = 1.f;
      if constexpr (F == Format::kInt8) {
        if (L.svalid[e]) {
          L.kscale[e] = __ldg(cache.k.token_scale + scale_offset(cache.k, page, slot, hk));
          L.vscale[e] = __ldg(cache.v.token_scale + scale_offset(cache.v, page, slot, hk));
        }
      }
    }
  };

  int c0 = kb + kChunk * warp;
  int pg_cur[NT];
#pragma unroll
  for (int u = 0; u < NT; ++u) pg_cur[u] = c0 < ke ? tile_page_of(c0 + kMmaTile * u) : -1;
  for (; c0 < ke; c0 += kCtaKeys) {
    int pg_nxt[NT];
#pragma unroll
    for (int u = 0; u < NT; ++u)
      pg_nxt[u] = c0 + kCtaKeys < ke ? tile_page_of(c0 + kCtaKeys + kMmaTile * u) : -1;
    Frags ld[NT];
#pragma unroll
    for (int u = 0; u < NT; ++u) load_tile(c0 + kMmaTile * u, pg_cur[u], ld[u]);
#pragma unroll
    for (int u = 0; u < NT; ++u) st.consume(ld[u], c0 + kMmaTile * u, lo, hi, qa, qscale, c);
#pragma unroll
    for (int u = 0; u < NT; ++u) pg_cur[u] = pg_nxt[u];
  }

  cta.finish(p, st, sm_m, sm_l, sm_o);
}

}  // namespace cuda
}  // namespace kvcache
}  // namespace longctx
