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
            std::vector<int> seen(s.total, 0);
            int prev_section = 0, prev_m = nt;
            for (int t = 0; t < s.total; ++t) {
              int m, hh, b;
              s.decode(t, m, hh, b);
              const bool ok = m >= 0 && m < nt && hh >= 0 && hh < h && b >= 0 && b < batch;
              CHECK(ok, "fwd t %d -> (%d, %d, %d)", t, m, hh, b);
              if (!ok) continue;
              ++seen[(b * h + hh) * nt + m];
              const int section = (b * h + hh) / s.hb_per_section;
              CHECK(section >= prev_section, "fwd t %d: section %d after %d", t, section,
                    prev_section);
              if (section > prev_section) prev_m = nt;
              CHECK(m <= prev_m, "fwd t %d: query tile %d after %d in a section", t, m, prev_m);
              prev_section = section;
              prev_m = m;
            }
            for (int i = 0; i < s.total; ++i)
              CHECK(seen[i] == 1, "fwd make(%d, %d, %d): tile %d decoded %d times", nt, h, batch,
                    i, seen[i]);
          }
          const BwdTileOrder o = BwdTileOrder::make(nt, h, batch, bytes);
          const int total = nt * h * batch;
          CHECK(o.num_hb == h * batch && o.hb_per_section == expected_pairs(bytes, 1, h * batch),
                "bwd make(%d, %d, %d, %lld): num_hb %d section %d", nt, h, batch,
                (long long)bytes, o.num_hb, o.hb_per_section);
          std::vector<int> seen(total, 0);
          int prev_section = 0, prev_n = -1;
          for (int t = 0; t < total; ++t) {
            int n, hk, b;
            o.decode(t, n, hk, b);
            const bool ok = n >= 0 && n < nt && hk >= 0 && hk < h && b >= 0 && b < batch;
            CHECK(ok, "bwd t %d -> (%d, %d, %d)", t, n, hk, b);
            if (!ok) continue;
            ++seen[(b * h + hk) * nt + n];
            const int section = (b * h + hk) / o.hb_per_section;
            CHECK(section >= prev_section, "bwd t %d: section %d after %d", t, section,
                  prev_section);
            if (section > prev_section) prev_n = -1;
            CHECK(n >= prev_n, "bwd t %d: KV tile %d after %d in a section", t, n, prev_n);
            prev_section = section;
            prev_n = n;
          }
          for (int i = 0; i < total; ++i)
            CHECK(seen[i] == 1, "bwd make(%d, %d, %d): tile %d decoded %d times", nt, h, batch, i,
                  seen[i]);
        }
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("all tile order checks passed\n");
  return 0;
}
