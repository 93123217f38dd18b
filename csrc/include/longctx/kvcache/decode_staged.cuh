// Split-KV decode over a paged KV cache of any format (bf16 / fp16, int8, fp8 e4m3), width D = 64,
// 128 or 256 (head_dim d <= D, whole 16-byte pieces per key row): tensor cores fed from a cp.async
// shared-memory pipeline. The kernel for every cache whose layout allows 16-byte copies
// (staged_decode_ok in decode_choice.h).
//
// Why: decode is bound by the bytes in flight per SM, not by math. Holding in-flight K/V in
// registers (decode_mma.cuh: loads and compute alternating, 2 CTAs per SM) keeps too few bytes
// in flight to reach the copy bandwidth. Here each warp owns a ring of S stages of 16-key tiles
// in shared memory filled by cp.async (no registers while in flight); a warp reads tile i's
// fragments, refills its stage with tile i + S, then computes, so S tiles per warp are in flight
// during the math: with 2 CTAs (8 warps) per SM, 192 KiB per SM for 6 stages of 4 KiB (8-bit
// codes at D = 128, 16-bit at D = 64) or 3 stages of 8 KiB (16-bit at D = 128, 8-bit at
// D = 256); 16-bit at D = 256 runs 1 CTA per SM with 3 stages of 16 KiB (staged_stages).
//
// Work decomposition: the grid of decode_mma.cuh (CTA of 4 warps per (kv head x tile of GT <= 8
// packed GQA rows, split, sequence)), but a split is not a contiguous key range: the row tile's
// 16-key tiles go round-robin to its num_splits x 4 warps (warp gw = split * 4 + warp takes tiles
// gw, gw + G, ...), so warps differ by at most one tile and, without a left window, a tile's keys
// do not depend on the key count: the first page ids are loaded while cache_seqlens is in flight.
// Where warps have many tiles the launcher deals runs of 2 adjacent tiles instead (warp gw takes
// 2 gw, 2 gw + 1, then 2 (gw + G), ...; p.decode_tile_run_log2). Per tile and warp the math is
// MmaRowState::consume (decode_mma_tile.cuh: S = Q K^T and O += P V with mma.sync m16n8k16,
// online softmax in fp32; 16-bit K/V enter the bf16 / fp16 mma as stored, 8-bit codes are
// converted exactly to fp16 and their scales applied in fp32); only where the fragments come
// from differs.
//
// Head dims below D (Phi-3's 96 at D = 128): the stage keeps D-wide rows; the copies of pieces
// past the cache's d-element row have size 0 (nothing read, zeros written), so a key row costs
// d elements of memory traffic and the math sees zero columns; q's dims >= d load as zeros and
// the combine stores d columns (decode_common.cuh).
// Stage layout (one warp, one 16-key tile; a key row is D x 1 or 2 bytes = P 16-byte pieces):
// K [16 keys][row], V [16][row], then (int8) K scales [16] and V scales [16] fp32, or with
// kLineScales the scales of the tile's slots for all kv heads ([16][kv_heads] for K, then for V),
// copied as whole 16-byte pieces. The pieces of a key row are XOR-swizzled (staged_swizzle.h) so
// that the copies and the fragment reads hit distinct banks per 8-lane phase at every P. K/V
// copies carry an L2 evict-first hint (they are read once), so the int8 scales, re-read by every
// kv head's CTA, stay in L2.
// Page ids: bs must be a multiple of 16 (a tile lies in one page); lane j holds the page of the
// warp's tile 32 n + j of the current batch of 32 tiles, and the next batch's ids are loaded one
// batch ahead, so no copy waits for the block table after the first batch (whose loads, without a
// left window, are issued before the key count is known).
// Launch: programmatic dependent (grid_dependency.cuh): nothing is read or written before the
// grid dependency wait; the merge kernel is released after the key loop (releasing it at the
// start let its waiting CTAs share the SMs with the key loops).
// Invariants: invalid keys (page id outside the pool, past the block table, key >= khi) are
// zero-filled by the copy (nothing is read) and masked (P = 0); pool offsets are int64; every
// cp.async group is waited for before the CTA's shared memory is reused for the combine.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include "longctx/kvcache/decode_choice.h"
#include "longctx/kvcache/decode_common.cuh"
#include "longctx/kvcache/decode_mma_tile.cuh"
#include "longctx/kvcache/kvcache_params.h"
#include "longctx/kvcache/paged.h"
#include "longctx/kvcache/staged_swizzle.h"

namespace longctx {
namespace kvcache {
namespace cuda {

__device__ __forceinline__ void cp_async16_zfill(uint32_t dst, const void* src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(pred ? 16 : 0));
}
// The same with an L2 cache policy (createpolicy), e.g. evict-first for data read once.
__device__ __forceinline__ void cp_async16_zfill_hint(uint32_t dst, const void* src, bool pred,
                                                      uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst),
               "l"(src), "r"(pred ? 16 : 0), "l"(policy));
}
// The L2 evict-first policy of the K/V copies.
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
__device__ __forceinline__ void cp_async4_zfill(uint32_t dst, const void* src, bool pred) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(pred ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// kLineScales (int8, scales slot-major: contiguous per page as (block_size, kv_heads) with
// kv_heads <= 8): the stage holds the scales of the tile's 16 slots for ALL kv heads (16 x
// kv_heads fp32 for K, then for V), copied as whole 16-byte pieces, instead of this head's 16
// scales copied 4 bytes at a time (32 single-sector requests per tile, a 4-byte scale per 32-byte
// sector). Without it each lane copies one 4-byte scale; with head-major scales (slot stride 1,
// the layout PagedKVCache allocates) a tile's 16 K and 16 V scales are then two 64-byte requests.
// At most kLineScaleHeads (decode_choice.h) kv heads.

template <Format F, int D, int S, bool kLineScales = false>
struct StagedLayout {
  static_assert(!kLineScales || F == Format::kInt8, "line scales: int8 caches");
  static constexpr int kEB = F == Format::kNative ? 2 : 1;  // bytes per stored element
  static constexpr int kRowBytes = D * kEB;                 // one key row of one kv head
  static constexpr int kPieces = kRowBytes / 16;            // 16-byte pieces per key row
  static constexpr int kTileBytes = kMmaTile * kRowBytes;   // K (or V) of one tile
  static constexpr int kScaleOff = 2 * kTileBytes;       // int8 scales after K and V
  static constexpr int kScaleBytes = kMmaTile * 4 * (kLineScales ? kLineScaleHeads : 1);  // K or V
  static constexpr int kStageBytes = kScaleOff + (F == Format::kInt8 ? 2 * kScaleBytes : 0);
  static constexpr int kWarpBytes = S * kStageBytes;
  static constexpr int kRingBytes = kMmaWarps * kWarpBytes;
  static constexpr int kCombineBytes = kMmaWarps * 8 * (2 + kMmaOStride<D>) * 4;  // m, l, o
  static constexpr int kSmemBytes = kRingBytes > kCombineBytes ? kRingBytes : kCombineBytes;
};

template <typename T, Format F, int D, int GT, int S, int MinBlocks, bool kLineScales = false>
__global__ void __launch_bounds__(kMmaWarps * 32, MinBlocks)
    kvcache_decode_staged_kernel(const AttnParams p, int m_tiles) {
  static_assert(D == 64 || D == 128 || D == 256, "staged decode: width 64, 128 or 256");
  static_assert(GT <= 8, "staged decode: at most 8 packed rows per CTA");
  static_assert(S >= 2, "staged decode: at least two stages");
  using Lay = StagedLayout<F, D, S, kLineScales>;
  constexpr int kEB = Lay::kEB;
  using Frags = MmaTileFrags<F, D>;
  using State = MmaRowState<T, F, D>;
  constexpr int P = Lay::kPieces;
  extern __shared__ __align__(128) uint8_t smem[];
  grid_dependency_wait();  // before the first read (grid_dependency.cuh)

  const MmaCta<T, F, D, GT> cta(p, m_tiles);
  QueryRaw<T, D> qraw;  // loads issued first (they need no key count), converted after the
  cta.load_q_raw(p, cta.row_active(), qraw);  // first copies (off the path to the first byte)
  if (cta.past_rows()) return;
  const int hk = cta.hk, b = cta.b, warp = cta.warp, r = cta.r, c = cta.c;
  const int lane = threadIdx.x % 32;
  const PagedKV& cache = p.cache;
  // The row tile's keys are 16-key tiles taken round-robin by its G = num_splits x 4 warps: warp
  // gw = split * 4 + warp takes tiles gw, gw + G, gw + 2 G, ... (a split is the set of its 4
  // warps' tiles), so the warps' tile counts differ by at most one whatever the key count, and
  // the tiles' positions do not depend on it: without a left window tile 0 starts at key 0, and
  // the page ids of the first tiles are loaded before cache_seqlens has arrived (one memory
  // round trip off the path from the kernel's start to its first copy). With a left window the
  // tiles start at the rows' first tile (known once cache_seqlens is).
  const int G = p.num_splits * kMmaWarps;
  const int gw = cta.split * kMmaWarps + warp;
  // With p.decode_tile_run_log2 = s > 0 a warp takes runs of R = 2^s adjacent tiles per
  // round-robin step: warp gw's tile i is R (gw + G (i / R)) + i % R.
  const int rs = p.decode_tile_run_log2;
  const int PR = 1 << rs;
  int org = 0;  // the first key of tile 0
  auto tile_idx = [&](int i) { return ((gw + G * (i >> rs)) << rs) + (i & (PR - 1)); };
  auto tile_t0 = [&](int i) { return org + kMmaTile * tile_idx(i); };  // for i < n_tiles

  const int bs = cache.block_size;  // a multiple of 16 (launcher)
  const bool pow2 = (bs & (bs - 1)) == 0;
  const int bs_shift = __ffs(bs) - 1;
  const int64_t cap = seq_capacity(cache);
  const int32_t* bt = cache.block_table + int64_t(b) * cache.block_table_stride;
  // Page id (-1: invalid or past the block table) of this warp's tile i, any i >= 0 (entries
  // past the sequence's pages may be read, they are never used); lane j loads tile 32 n + j.
  auto page_of_tile = [&](int i) -> int {
    const int64_t t0 = org + int64_t(kMmaTile) * tile_idx(i);
    if (t0 >= cap) return -1;
    const int pg = __ldg(bt + (pow2 ? (t0 >> bs_shift) : t0 / bs));
    return (pg >= 0 && int64_t(pg) < cache.num_blocks) ? pg : -1;
  };
  const bool org0 = p.window_left < 0;
  int pg_cur = org0 ? page_of_tile(lane) : -1;
  const MmaRows rows = cta.rows(p);  // waits for cache_seqlens
  const int lo = rows.lo, hi = rows.hi, khi = rows.khi;
  const int kend = khi;  // the warps' tiles lie in [org, kend)
  if (!org0) {
    org = rows.klo;  // a multiple of 16 (0 without a left window)
    pg_cur = page_of_tile(lane);
  }
  const int row_tiles = (kend - org + kMmaTile - 1) / kMmaTile;  // kend >= org
  int n_tiles = 0;
  if (PR * gw < row_tiles) {
    const int left = row_tiles - PR * gw;
    n_tiles = left / (PR * G) * PR + min(left % (PR * G), PR);
  }
  int pg_nxt = n_tiles > 32 ? page_of_tile(32 + lane) : -1;  // needed from tile 32 on

  // Per-lane constants of the K/V copies, computed once (the copy issue runs every tile): lane
  // copies pieces lane + 32 u (u < kCopies) of a tile's 16 keys x P pieces, i.e. piece lane % P
  // of key lane / P + kKeyStep u. Byte offsets from the tile's first slot: koff + u kstep
  // (int32: the launcher checks that 16 slot strides fit); destinations staged_copy_dest(dbase,
  // u) (staged_swizzle.h): a few registers per lane, not 3 per copy (16-bit rows take 8).
  static_assert(32 % P == 0, "staged decode: whole key rows per 32 pieces");
  constexpr int kKeyStep = 32 / P;
  constexpr int kCopies = kMmaTile / kKeyStep;
  // A head_dim d < D leaves pieces >= d kEB / 16 of every row outside the cache's row: their
  // copies read nothing (size 0, the source the row's first piece) and zero-fill the stage.
  const int key0 = lane / P, piece0 = lane % P;
  const bool piece_in_row = piece0 < cache.head_dim * kEB / 16;  // whole: staged_decode_ok
  const int32_t src_piece = piece_in_row ? piece0 * 16 : 0;
  const int32_t kslot = static_cast<int32_t>(cache.k.slot_stride * kEB);
  const int32_t vslot = static_cast<int32_t>(cache.v.slot_stride * kEB);
  const int32_t koff = key0 * kslot + src_piece, voff = key0 * vslot + src_piece;
  const int32_t kstep = kKeyStep * kslot, vstep = kKeyStep * vslot;
  const uint32_t dbase = staged_piece_offset<P>(key0, piece0);
  auto doff = [&](int u) { return staged_copy_dest<P>(dbase, u); };
  const uint8_t* kbase =
      static_cast<const uint8_t*>(cache.k.data) + int64_t(hk) * cache.k.head_stride * kEB;
  const uint8_t* vbase =
      static_cast<const uint8_t*>(cache.v.data) + int64_t(hk) * cache.v.head_stride * kEB;
  uint8_t* ring = smem + warp * Lay::kWarpBytes;
  const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
  uint32_t stage_ok = 0;  // bit k: the tile in stage k has a valid page (warp-uniform)
  // K/V are read once: evict them first, so that the int8 scales (one 32-byte sector holds the
  // scales of all kv heads of a slot, read by every head's CTA) stay in L2 between the heads.
  const uint64_t l2_policy = l2_evict_first_policy();

  // Issue the copies of tile i into stage i % S (an empty group past the warp's tiles). Called
  // with i in increasing order; i % 32 == 0 rotates the page-id registers. The source addresses
  // are always inside the pool (an invalid page copies from page 0 with size 0, reading
  // nothing), so a copy costs one add and one predicate: no address selects.
  auto issue = [&](int i) {
    if (i > 0 && i % 32 == 0) {
      pg_cur = pg_nxt;
      pg_nxt = i + 32 < n_tiles ? page_of_tile(i + 32 + lane) : -1;
    }
    if (i < n_tiles) {
      const int t0 = tile_t0(i);
      const int pg = __shfl_sync(0xffffffffu, pg_cur, i % 32);
      const int slot0 = pow2 ? (t0 & (bs - 1)) : t0 % bs;
      const uint32_t stage = ring_s + (i % S) * Lay::kStageBytes;
      stage_ok = (stage_ok & ~(1u << (i % S))) | (uint32_t(pg >= 0) << (i % S));
      const int64_t page = pg >= 0 ? pg : 0;
      const uint8_t* ktile =
          kbase + (page * cache.k.page_stride + int64_t(slot0) * cache.k.slot_stride) * kEB;
      const uint8_t* vtile =
          vbase + (page * cache.v.page_stride + int64_t(slot0) * cache.v.slot_stride) * kEB;
      const int keys_left = pg >= 0 ? khi - t0 : 0;
      const int row_keys_left = piece_in_row ? keys_left : 0;
      const uint8_t* ksrc = ktile + koff;
      const uint8_t* vsrc = vtile + voff;
#pragma unroll
      for (int u = 0; u < kCopies; ++u) {
        const bool ok = key0 + kKeyStep * u < row_keys_left;
        cp_async16_zfill_hint(stage + doff(u), ksrc, ok, l2_policy);
        cp_async16_zfill_hint(stage + doff(u) + Lay::kTileBytes, vsrc, ok, l2_policy);
        ksrc += kstep;
        vsrc += vstep;
      }
      if constexpr (kLineScales) {
        // 16 slots x kv_heads fp32 = 4 kv_heads 16-byte pieces per pool, contiguous from
        // (page, slot0, head 0): pieces q < 4 kvh are K's, the next 4 kvh V's (at most 64,
        // two per lane). Slots past khi are copied too (possibly stale, even NaN): read_frags
        // gives them scale 0.
        const int per_pool = 4 * cache.kv_heads;
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int q = lane + 32 * u;
          if (q < 2 * per_pool) {
            const bool is_v = q >= per_pool;
            const int piece = is_v ? q - per_pool : q;
            const CacheView& cv = is_v ? cache.v : cache.k;
            const float* src = cv.token_scale + scale_offset(cv, page, slot0, 0) + 4 * piece;
            cp_async16_zfill(stage + Lay::kScaleOff + (is_v ? Lay::kScaleBytes : 0) + piece * 16,
                             src, pg >= 0);
          }
        }
      } else if constexpr (F == Format::kInt8) {
        const int key = lane % kMmaTile;
        const CacheView& cv = lane < kMmaTile ? cache.k : cache.v;
        const float* src = cv.token_scale + scale_offset(cv, page, slot0 + key, hk);
        cp_async4_zfill(stage + Lay::kScaleOff + lane * 4, src, key < keys_left);
      }
    }
    cp_async_commit();
  };

  // The fragments of tile i from its stage (see MmaTileFrags for the maps): K's, the keys'
  // validity and int8 scales (read_k_frags), then V's (read_v_frags).
  auto read_k_frags = [&](int i, Frags& L) {
    const uint8_t* stage = ring + (i % S) * Lay::kStageBytes;
    const int t0 = tile_t0(i);
    const bool page_ok = (stage_ok >> (i % S)) & 1u;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int key = 8 * h + r;
#pragma unroll
      for (int u = 0; u < Frags::kKLoads; ++u) {
        const int piece = 4 * u + c;
        L.set_k_piece(h, u, *reinterpret_cast<const uint4*>(
                                stage + staged_piece_offset<P>(key, piece)));
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = 2 * c + (e & 1) + 8 * (e >> 1);
      L.svalid[e] = page_ok && t0 + key < khi;
      if constexpr (kLineScales) {
        const float* sc = reinterpret_cast<const float*>(stage + Lay::kScaleOff);
        L.kscale[e] = L.svalid[e] ? sc[key * cache.kv_heads + hk] : 0.f;
        L.vscale[e] = L.svalid[e] ? sc[Lay::kScaleBytes / 4 + key * cache.kv_heads + hk] : 0.f;
      } else if constexpr (F == Format::kInt8) {
        const float* sc = reinterpret_cast<const float*>(stage + Lay::kScaleOff);
        L.kscale[e] = sc[key];
        L.vscale[e] = sc[kMmaTile + key];
      } else {
        L.kscale[e] = L.vscale[e] = 1.f;
      }
    }
  };
  auto read_v_frags = [&](int i, Frags& L) {
    const uint8_t* stage = ring + (i % S) * Lay::kStageBytes;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = 2 * c + (e & 1) + 8 * (e >> 1);
      // bytes [r kVBytes, (r + 1) kVBytes) of the row: pieces 4 r .. 4 r + 3 (16-bit, D = 256),
      // pieces 2 r, 2 r + 1 (16-bit at D = 128, 8-bit at D = 256), piece r (8-bit at D = 128,
      // 16-bit at D = 64) or half of piece r / 2 (8-bit, D = 64)
      const int byte = r * Frags::kVBytes;
      const uint8_t* vstage = stage + Lay::kTileBytes;
      if constexpr (Frags::kVWords >= 4) {
#pragma unroll
        for (int i = 0; i < Frags::kVWords / 4; ++i) {
          const uint4 x = *reinterpret_cast<const uint4*>(
              vstage + staged_piece_offset<P>(key, (byte >> 4) + i));
          L.v[e][4 * i] = x.x;
          L.v[e][4 * i + 1] = x.y;
          L.v[e][4 * i + 2] = x.z;
          L.v[e][4 * i + 3] = x.w;
        }
      } else {
        const uint2 x = *reinterpret_cast<const uint2*>(
            vstage + staged_piece_offset<P>(key, byte >> 4) + (byte & 15));
        L.v[e][0] = x.x;
        L.v[e][1] = x.y;
      }
    }
  };

  static_assert(S <= 32, "staged decode: at most 32 stages (one page-id batch)");
#pragma unroll
  for (int i = 0; i < S; ++i) issue(i);
  // The query fragments and their row sum after the first copies are issued: the query loads
  // (issued first) are then off the chain (cache_seqlens, page ids) -> key count -> copies.
  uint32_t qa[D / 16][2];
  q_frags_from_raw<T, F, D>(qraw, qa);
  const float qscale = cta.score_scale(p);
  State st(p.mods.softcap);
  st.set_key_bias(qa, qscale);
  for (int i = 0; i < n_tiles; ++i) {
    cp_async_wait<S - 1>();
    __syncwarp();
    Frags L;
    read_k_frags(i, L);
    // D = 256: K and V fragments together (128 registers at 16-bit) would spill, so the scores
    // come first and V is read (and the stage refilled) after them.
    uint32_t pa[2];
    if constexpr (D == 256) st.scores(L, tile_t0(i), lo, hi, qa, qscale, c, pa);
    read_v_frags(i, L);
    __syncwarp();  // every lane has read stage i % S before it is refilled
    issue(i + S);
    if constexpr (D == 256) {
      st.accumulate(L, pa);
    } else {
      st.consume(L, tile_t0(i), lo, hi, qa, qscale, c);
    }
  }
  cp_async_wait<0>();
  // The merge kernel may launch once every CTA is here (grid_dependency.cuh).
  grid_dependents_may_launch();
  __syncthreads();  // all warps done with their rings: the combine arrays alias them
  float* sm_m = reinterpret_cast<float*>(smem);
  float* sm_l = sm_m + kMmaWarps * 8;
  cta.finish(p, st, sm_m, sm_l, sm_l + kMmaWarps * 8);
}

}  // namespace cuda
}  // namespace kvcache
}  // namespace longctx
