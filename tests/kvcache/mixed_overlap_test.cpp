// CPU test of mixed_overlap.h: visible_pairs against a count of mask.h's mask_visible over every
// (row, key), and the SM split of a mixed batch (bounds, monotonic in the decode's share, the
// shapes of bench/kvcache's mixed group).
#include <cstdio>
#include <initializer_list>
#include "longctx/flash/mask.h"
#include "longctx/kvcache/mixed_overlap.h"

namespace kv = longctx::kvcache;
static int failures = 0;
static long checks = 0;
static void check(bool ok, const char* what, long long a, long long b) {
  ++checks;
  if (!ok && ++failures <= 10) std::printf("FAIL %s: %lld vs %lld\n", what, a, b);
}

int main() {
  for (int sq = 0; sq <= 12; ++sq)
    for (int sk = 0; sk <= 20; ++sk)
      for (int wl : {-1, 0, 3, 30})
        for (int wr : {-1, 0, 2, 30}) {
          long long want = 0;
          for (int i = 0; i < sq; ++i)
            for (int j = 0; j < sk; ++j)
              want += longctx::flash::mask_visible(i, j, sq, sk, wl, wr);
          const long long got = kv::visible_pairs(sq, sk, wl, wr);
          check(got == want, "visible_pairs", got, want);
        }
  // causal 8192 x 16384: 8192 * 8192 + 8192 * 8193 / 2
  check(kv::visible_pairs(8192, 16384, -1, 0) == 8192LL * 8192 + 8192LL * 8193 / 2,
        "causal pairs", kv::visible_pairs(8192, 16384, -1, 0), 0);
  check(kv::mixed_decode_sms(0, 1e12, 132) == 0, "no decode", 0, 0);
  check(kv::mixed_decode_sms(1e9, 0, 132) == 0, "no prefill", 0, 0);
  check(kv::mixed_decode_sms(1e3, 1e15, 132) == 1, "tiny decode", 0, 1);
  check(kv::mixed_decode_sms(1e15, 1e3, 132) == 66, "tiny prefill", 0, 66);
  int last = 0;
  for (double bytes = 1e6; bytes < 1e12; bytes *= 1.5) {
    const int m = kv::mixed_decode_sms(bytes, 1.65e12, 132);
    check(m >= last && m >= 1 && m <= 66, "monotonic, in [1, 66]", m, last);
    last = m;
  }
  // bench's mixed group: 15 rows x 32K keys x 8 kv heads x 128 x (K, V): bf16 2 bytes
  const double pairs = double(kv::visible_pairs(8192, 16384, -1, 0));
  const double flops = 4.0 * 32 * 128 * pairs;
  const int m_bf16 = kv::mixed_decode_sms(15.0 * 32768 * 8 * 128 * 2 * 2, flops, 132);
  const int m_fp8 = kv::mixed_decode_sms(15.0 * 32768 * 8 * 128 * 2, flops, 132);
  check(m_bf16 >= 8 && m_bf16 <= 20 && m_fp8 >= 4 && m_fp8 < m_bf16, "bench split", m_bf16, m_fp8);
  std::printf("mixed_overlap_test: %ld checks, %d failures (bench split: bf16 %d, 8-bit %d SMs)\n",
              checks, failures, m_bf16, m_fp8);
  return failures == 0 ? 0 : 1;
}
