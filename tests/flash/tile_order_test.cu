// Host-only checks of the attention kernels' tile orders (tile_scheduler.cuh), over grids of
// tile counts, heads, batches and L2 footprints:
//  1. FwdTileScheduler::make / BwdTileOrder::make size a section to the (head, batch) pairs
//     that share ~32 MB of L2 (a GQA group's query heads share one K/V), at least 1 pair and at
//     most all of them; the forward's total is num_m x heads x batch.
//  2. decode is a bijection from [0, total) onto (tile, head, batch); tiles come last to first
//     (forward) or first to last (backward) within a section, and every tile of a section comes
//     before any tile of the next one.
// Exit code 0 iff all pass.
#include <cstdint>
#include <cstdio>
#include <vector>
#include "longctx/flash/tile_scheduler.cuh"
#include "host_check.h"

using namespace longctx::flash;

static int64_t expected_pairs(int64_t bytes, int64_t share, int num_hb) {
  const int64_t n = (int64_t(32) << 20) * share / bytes;
  return n < 1 ? 1 : n > num_hb ? num_hb : n;
}

// decode(t) for t < total covers every (tile, head, batch) once, section by section, the tiles
// of a section last to first (last_first) or first to last.
template <typename Order>
static void check_walk(const char* name, const Order& o, int nt, int h, int batch,
                       bool last_first) {
  const int total = nt * h * batch;
  std::vector<int> seen(total, 0);
  int prev_section = 0, prev = last_first ? nt : -1;
  for (int t = 0; t < total; ++t) {
    int tile, hh, b;
    o.decode(t, tile, hh, b);
    const bool ok = tile >= 0 && tile < nt && hh >= 0 && hh < h && b >= 0 && b < batch;
    CHECK(ok, "%s t %d -> (%d, %d, %d)", name, t, tile, hh, b);
    if (!ok) continue;
    ++seen[(b * h + hh) * nt + tile];
    const int section = (b * h + hh) / o.hb_per_section;
    CHECK(section >= prev_section, "%s t %d: section %d after %d", name, t, section,
          prev_section);
    if (section > prev_section) prev = last_first ? nt : -1;
    CHECK(last_first ? tile <= prev : tile >= prev, "%s t %d: tile %d after %d in a section",
          name, t, tile, prev);
    prev_section = section;
    prev = tile;
  }
  for (int i = 0; i < total; ++i)
    CHECK(seen[i] == 1, "%s (%d, %d, %d): tile %d decoded %d times", name, nt, h, batch, i,
          seen[i]);
}

int main() {
  const int tiles[] = {1, 3, 17, 64};
  const int heads[] = {1, 4, 32};
  const int batches[] = {1, 2, 5};
  const int64_t footprints[] = {1, int64_t(1) << 20, int64_t(12) << 20, int64_t(64) << 20,
                                int64_t(1) << 30};
  for (int nt : tiles)
    for (int h : heads)
      for (int batch : batches)
        for (int64_t bytes : footprints) {
          for (int group : {1, 4}) {
            const FwdTileScheduler s = FwdTileScheduler::make(nt, h, batch, bytes, group);
            CHECK(s.num_hb == h * batch && s.total == nt * h * batch &&
                      s.hb_per_section == expected_pairs(bytes, group, h * batch),
                  "fwd make(%d, %d, %d, %lld, %d): num_hb %d total %d section %d", nt, h, batch,
                  (long long)bytes, group, s.num_hb, s.total, s.hb_per_section);
            check_walk("fwd", s, nt, h, batch, true);
          }
          const BwdTileOrder o = BwdTileOrder::make(nt, h, batch, bytes);
          CHECK(o.num_hb == h * batch && o.hb_per_section == expected_pairs(bytes, 1, h * batch),
                "bwd make(%d, %d, %d, %lld): num_hb %d section %d", nt, h, batch,
                (long long)bytes, o.num_hb, o.hb_per_section);
          check_walk("bwd", o, nt, h, batch, false);
        }
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("all tile order checks passed\n");
  return 0;
}
