// Which KV tiles a query tile must visit, and which of those need the per-element mask.
//
// Computes, for query tile m (rows [m*kBlockM, min((m+1)*kBlockM, sq)) of one sequence with
// lengths (sq, sk)) and the FlashAttention mask (bottom-right aligned; query i sees key j iff
// j < sk, j >= i + sk - sq - left when left >= 0, j <= i + sk - sq + right when right >= 0),
// the half-open range [n_min, n_max) of KV tiles of kBlockN keys that hold at least one visible
// key for some row of the tile; tiles outside are never loaded. A tile inside the range needs
// the per-element mask only if it crosses sk, the right (causal) edge or the left window edge.
// Invariants: n_min >= 0, n_max <= ceil(sk / kBlockN); n_max <= n_min means "no key visible":
// the tile's rows get out = 0 and lse = -inf. Host and device.
#pragma once

namespace longctx {
namespace flash {

struct KvTileRange {  // named apart from mask.h's TileRange (CPU twin) until the two are unified
  int n_min, n_max;
};

__host__ __device__ inline KvTileRange kv_tile_range(int m_block, int kBlockM, int kBlockN, int sq,
                                                   int sk, int window_left, int window_right) {
  const int m0 = m_block * kBlockM;
  const int m1 = (m0 + kBlockM < sq ? m0 + kBlockM : sq);  // exclusive, m1 > m0 assumed
  int n_max = (sk + kBlockN - 1) / kBlockN;
  int n_min = 0;
  if (window_right >= 0) {
    const long long hi = (long long)(m1 - 1) + sk - sq + window_right;  // last visible key
    const int lim = hi < 0 ? 0 : int(hi / kBlockN) + 1;
    n_max = lim < n_max ? lim : n_max;
  }
  if (window_left >= 0) {
    const long long lo = (long long)m0 + sk - sq - window_left;  // first visible key of row m0
    const int lim = lo <= 0 ? 0 : int(lo / kBlockN);
    n_min = lim > n_min ? lim : n_min;
  }
  return {n_min, n_max};
}

// True if some element of tile (m_block, n_block) is masked out while others may be visible.
__host__ __device__ inline bool kv_tile_needs_mask(int m_block, int n_block, int kBlockM,
                                                   int kBlockN, int sq, int sk, int window_left,
                                                   int window_right) {
  const long long m0 = (long long)m_block * kBlockM;
  const long long n0 = (long long)n_block * kBlockN;
  if (n0 + kBlockN > sk) return true;
  if (window_right >= 0 && n0 + kBlockN - 1 > m0 + sk - sq + window_right) return true;
  if (window_left >= 0 && n0 < m0 + kBlockM - 1 + sk - sq - window_left) return true;
  return false;
}

}  // namespace flash
}  // namespace longctx
