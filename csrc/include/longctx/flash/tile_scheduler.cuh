// Tile order of the forward kernel's persistent grid: which (query tile, head, batch) tile t is.
//
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

namespace longctx {
namespace flash {

struct FwdTileScheduler {
  int num_m = 0;           // query tiles per (head, batch): ceil(seqlen_q / kBlockM)
  int heads = 0;
  int num_hb = 0;          // heads * batch
  int hb_per_section = 1;  // >= 1
  int total = 0;           // num_m * num_hb

  __host__ __device__ void decode(int t, int& m_block, int& h, int& b) const {
    const int section_tiles = num_m * hb_per_section;
    const int s = t / section_tiles;
    const int r = t - s * section_tiles;
    const int hb0 = s * hb_per_section;
    const int hps = (num_hb - hb0) < hb_per_section ? (num_hb - hb0) : hb_per_section;
    const int mi = r / hps;
    const int hb = hb0 + (r - mi * hps);
    m_block = num_m - 1 - mi;
    h = hb % heads;
    b = hb / heads;
  }
};

}  // namespace flash
}  // namespace longctx
