// Tile orders of the attention kernels: which (query tile, head, batch) tile t of the forward's
// persistent grid is (FwdTileScheduler), and which (KV tile, kv head, batch) CTA t of the
// backward's grid is (BwdTileOrder). Both walk sections of (head, batch) pairs sized to L2 with
// the longest tiles first inside a section (section_walk).
//
// Forward:
// The tile space is num_m query tiles x (heads * batch). It is walked in sections of
// hb_per_section (head, batch) pairs whose K/V fit together in L2 (the host sizes the section
// from seqlen_k * head_dim); inside a section, query tiles go from the last to the first (under
// a causal mask the last tiles have the most KV tiles: longest first, so the final wave is
// short), and the (head, batch) pairs of a section are adjacent, so the CTAs running at the same
// time share K/V through L2. The launch takes tiles in this order: CTA c starts with tile c and
// then takes the next tile of an atomic counter as soon as its producer has issued the current
// one (the dynamic schedule, the default), or tiles c + gridDim.x, c + 2 gridDim.x, ... (the
// static schedule, a launch without a counter). Tiles past a varlen sequence's end are skipped by
// the producer, which hands the consumers only the tiles they write.
#pragma once
#include <cstdint>

namespace longctx {
namespace flash {

// Pairs per section (host): as many (head, batch) pairs as share about 32 MB of L2 when `pairs`
// of them read `bytes` bytes, at least 1 and at most num_hb.
inline int l2_section_pairs(int64_t bytes, int64_t pairs, int num_hb) {
  const int64_t n = (int64_t(32) << 20) * pairs / (bytes > 0 ? bytes : 1);
  return int(n < 1 ? 1 : n > num_hb ? num_hb : n);
}

// Tile t of num_m tiles x num_hb (head, batch) pairs walked in sections of hb_per_section pairs
// (the last section may be smaller), the pairs fastest inside a section: mi is the tile's place
// in the walk along num_m (0 first), hb its pair.
__host__ __device__ inline void section_walk(int t, int num_m, int num_hb, int hb_per_section,
                                             int& mi, int& hb) {
  const int section_tiles = num_m * hb_per_section;
  const int s = t / section_tiles;
  const int r = t - s * section_tiles;
  const int hb0 = s * hb_per_section;
  const int hps = (num_hb - hb0) < hb_per_section ? (num_hb - hb0) : hb_per_section;
  mi = r / hps;
  hb = hb0 + (r - mi * hps);
}

struct FwdTileScheduler {
  int num_m = 0;           // query tiles per (head, batch): ceil(seqlen_q / kBlockM)
  int heads = 0;
  int num_hb = 0;          // heads * batch
  int hb_per_section = 1;  // >= 1
  int total = 0;           // num_m * num_hb (the caller checks that it fits an int)

  // Host: num_m query tiles x (heads * batch) pairs, a GQA group of `group` heads sharing
  // kv_bytes of K and V.
  static FwdTileScheduler make(int num_m, int heads, int batch, int64_t kv_bytes, int group) {
    FwdTileScheduler s;
    s.num_m = num_m;
    s.heads = heads;
    s.num_hb = heads * batch;
    s.hb_per_section = l2_section_pairs(kv_bytes, group, s.num_hb);
    s.total = int(int64_t(num_m) * s.num_hb);
    return s;
  }

  __host__ __device__ void decode(int t, int& m_block, int& h, int& b) const {
    int mi, hb;
    section_walk(t, num_m, num_hb, hb_per_section, mi, hb);
    m_block = num_m - 1 - mi;
    h = hb % heads;
    b = hb / heads;
  }
};

// Backward: one CTA per (KV tile, kv head, batch), grid num_n x heads_kv x batch in one
// dimension. Sections of hb_per_section (kv head, batch) pairs whose query heads' Q and dO fit
// in L2 together (the host sizes them from seqlen_q * head_dim * group); inside a section KV
// tiles go first to last with the pairs fastest. Under a causal mask the first KV tiles see the
// most query tiles, so the longest CTAs start first and the last wave is short, and the CTAs
// resident together read their heads' Q and dO through L2. Deterministic mode: a CTA waits
// only for lower KV tiles of its own (kv head, batch), which come earlier in this order.
struct BwdTileOrder {
  int num_n = 0;           // KV tiles per (kv head, batch): ceil(seqlen_k / kBlockN)
  int heads_kv = 0;
  int num_hb = 0;          // heads_kv * batch
  int hb_per_section = 1;  // >= 1

  // Host: num_n KV tiles x (heads_kv * batch) pairs, each pair's query heads reading
  // qdo_bytes of Q and dO.
  static BwdTileOrder make(int num_n, int heads_kv, int batch, int64_t qdo_bytes) {
    BwdTileOrder o;
    o.num_n = num_n;
    o.heads_kv = heads_kv;
    o.num_hb = heads_kv * batch;
    o.hb_per_section = l2_section_pairs(qdo_bytes, 1, o.num_hb);
    return o;
  }

  __host__ __device__ void decode(int t, int& n_block, int& hk, int& b) const {
    int hb;
    section_walk(t, num_n, num_hb, hb_per_section, n_block, hb);
    hk = hb % heads_kv;
    b = hb / heads_kv;
  }
};

}  // namespace flash
}  // namespace longctx
