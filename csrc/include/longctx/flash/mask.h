// The flash-attention mask as integer arithmetic: the one definition of which keys a query row
// sees and which tiles a kernel visits, shared by the CPU twins and every CUDA kernel (host and
// device code, no framework headers).
//
// For one sequence with sq query rows and sk keys, let shift = sk - sq (bottom-right alignment).
// Query row i (0 <= i < sq) sees key j (0 <= j < sk) iff
//     window_left  < 0  or  j >= i + shift - window_left
// and window_right < 0  or  j <= i + shift + window_right.
// causal is window_right == 0 (the argument checks normalize it before these functions run).
//
// Tile ranges: query tiles are block_m rows, key tiles block_n keys. fwd_key_tiles gives the
// KV tiles [begin, end) a query tile must visit (tiles outside are skipped entirely, never
// loaded); bwd_query_tiles gives, for one KV tile, the query tiles that see any of its keys.
// Both bounds move monotonically with the row (or key) index, so the visible set of a tile of
// rows is covered by one interval built from its first and last rows; tiles in the range may
// still contain masked elements (the per-element test handles them), tiles outside contain
// none. tile_fully_visible says whether a (query tile, key tile) pair needs no per-element mask;
// tile_needs_mask is the GPU kernels' test (they load whole key tiles, so a tile that runs past
// sk needs the mask too).
// All arithmetic is 64-bit: i + shift - window_left cannot overflow for any int inputs.
#pragma once
#include <cstdint>
#include "longctx/config.h"

namespace longctx {
namespace flash {

struct TileRange {
  int begin = 0;
  int end = 0;  // exclusive; begin >= end means empty
};

LONGCTX_HOST_DEVICE int64_t mask_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Does query row i see key j?
LONGCTX_HOST_DEVICE bool mask_visible(int64_t i, int64_t j, int sq, int sk, int window_left,
                                      int window_right) {
  const int64_t shift = int64_t(sk) - sq;
  return j >= 0 && j < sk && (window_left < 0 || j >= i + shift - window_left) &&
         (window_right < 0 || j <= i + shift + window_right);
}

// KV tiles visited by the query tile m_block (rows [m_block * block_m, min(.. + block_m, sq))).
LONGCTX_HOST_DEVICE TileRange fwd_key_tiles(int m_block, int block_m, int block_n, int sq, int sk,
                                           int window_left, int window_right) {
  TileRange r;
  const int64_t shift = int64_t(sk) - sq;
  const int64_t row_begin = int64_t(m_block) * block_m;
  int64_t row_end = row_begin + block_m;
  if (row_end > sq) row_end = sq;
  if (row_begin >= row_end || sk <= 0) return r;
  int64_t lo = 0, hi = sk;  // visible keys [lo, hi) of the union of rows
  if (window_left >= 0) {
    const int64_t v = row_begin + shift - window_left;
    lo = v > 0 ? v : 0;
  }
  if (window_right >= 0) {
    const int64_t v = (row_end - 1) + shift + window_right + 1;
    hi = v < sk ? v : sk;
  }
  if (hi <= lo) return r;
  r.begin = static_cast<int>(lo / block_n);
  r.end = static_cast<int>(mask_ceil_div(hi, block_n));
  return r;
}

// Query tiles that see any key of the KV tile n_block (keys [n_block * block_n, .. + block_n)).
LONGCTX_HOST_DEVICE TileRange bwd_query_tiles(int n_block, int block_m, int block_n, int sq,
                                             int sk, int window_left, int window_right) {
  TileRange r;
  const int64_t shift = int64_t(sk) - sq;
  const int64_t key_begin = int64_t(n_block) * block_n;
  int64_t key_end = key_begin + block_n;
  if (key_end > sk) key_end = sk;
  if (key_begin >= key_end || sq <= 0) return r;
  // Row i sees key j iff j - shift - window_right <= i <= j - shift + window_left.
  int64_t lo = 0, hi = sq;
  if (window_right >= 0) {
    const int64_t v = key_begin - shift - window_right;
    lo = v > 0 ? v : 0;
  }
  if (window_left >= 0) {
    const int64_t v = (key_end - 1) - shift + window_left + 1;
    hi = v < sq ? v : sq;
  }
  if (hi <= lo) return r;
  r.begin = static_cast<int>(lo / block_m);
  r.end = static_cast<int>(mask_ceil_div(hi, block_m));
  return r;
}

// True when every (row, key) of the tile pair that exists (row < sq, key < sk) is visible, so the
// per-element mask can be skipped. Rows and keys past the sequence end are not counted: callers
// only touch the valid ones.
LONGCTX_HOST_DEVICE bool tile_fully_visible(int m_block, int n_block, int block_m, int block_n,
                                            int sq, int sk, int window_left, int window_right) {
  const int64_t shift = int64_t(sk) - sq;
  const int64_t row_begin = int64_t(m_block) * block_m;
  int64_t row_end = row_begin + block_m;
  if (row_end > sq) row_end = sq;
  const int64_t key_begin = int64_t(n_block) * block_n;
  int64_t key_end = key_begin + block_n;
  if (key_end > sk) key_end = sk;
  if (row_begin >= row_end || key_begin >= key_end) return true;  // nothing to mask
  // The last row has the largest lower bound, the first row the smallest upper bound.
  const bool left_ok = window_left < 0 || key_begin >= (row_end - 1) + shift - window_left;
  const bool right_ok = window_right < 0 || key_end - 1 <= row_begin + shift + window_right;
  return left_ok && right_ok;
}

// Whether a kernel that loads whole key tiles must mask tile (m_block, n_block) per element: its
// keys run past sk, or a mask edge crosses it.
LONGCTX_HOST_DEVICE bool tile_needs_mask(int m_block, int n_block, int block_m, int block_n,
                                         int sq, int sk, int window_left, int window_right) {
  return int64_t(n_block + 1) * block_n > sk ||
         !tile_fully_visible(m_block, n_block, block_m, block_n, sq, sk, window_left,
                             window_right);
}

// The per-element mask of a (query tile at row m0, KV tile at key n0) pair in tile-local int32
// terms: key c (of the KV tile) and query r (of the query tile) are visible iff c < key_lim,
// r < q_lim and d_lo <= c - r <= d_hi. The diagonal bounds are clamped to [-1024, 1024], which
// keeps the answer for tiles of at most 1024 rows and keys (|c - r| < 1024). Pairs that need no
// mask get bounds that keep everything (one branch-free path in the backward kernels).
struct TileMask {
  int key_lim = 1 << 30, q_lim = 1 << 30, d_hi = 1024, d_lo = -1024;
};
LONGCTX_HOST_DEVICE TileMask tile_mask(bool need_mask, int m0, int n0, int sq, int sk, int wl,
                                       int wr) {
  TileMask t;
  if (need_mask) {
    const int64_t base = int64_t(sk) - sq - n0 + m0;
    auto clampd = [](int64_t v) { return int(v < -1024 ? -1024 : v > 1024 ? 1024 : v); };
    if (wr >= 0) t.d_hi = clampd(base + wr);
    if (wl >= 0) t.d_lo = clampd(base - wl);
    t.key_lim = sk - n0;
    t.q_lim = sq - m0;
  }
  return t;
}

}  // namespace flash
}  // namespace longctx
