// How a mixed KV-cache batch (leading decode rows and prefill chunks in one call) shares the SMs
// when its two parts run at the same time (host code, no framework headers): the prefill's
// forward runs on sms - m SMs (its persistent grid capped, FwdParams::max_ctas) on a side
// stream, the decode kernels fill the other m beside it. The decode streams its cache (memory
// bound), the forward is bound by its math, so each part is charged at its own per-SM rate and
// m is chosen so that both take the same time:
//     m / sms = t_decode / (t_decode + t_prefill),  t_decode = bytes / kDecodeBytesPerSm,
//     t_prefill = flops / kPrefillFlopsPerSm,
// rounded, at least 1 and at most half the SMs. No decode bytes or no prefill work: 0 (the two
// parts run one after the other, as two calls would).
#pragma once
#include <cstdint>
#include "longctx/flash/mask.h"

namespace longctx {
namespace kvcache {

// Per-SM rates of the two parts on Hopper: a decode CTA pair keeps ~48 KiB of cp.async copies in
// flight per SM (~50 GB/s at ~1 us latency); the forward reaches ~600 TFLOP/s on 132 SMs.
constexpr double kDecodeBytesPerSm = 50e9;
constexpr double kPrefillFlopsPerSm = 4.5e12;

// (query, key) pairs the mask keeps in one sequence of sq rows and sk keys: each row's visible
// keys are mask.h's key range of a one-row tile of one-key tiles.
inline int64_t visible_pairs(int sq, int sk, int window_left, int window_right) {
  int64_t pairs = 0;
  for (int i = 0; i < sq; ++i) {
    const flash::TileRange r = flash::fwd_key_tiles(i, 1, 1, sq, sk, window_left, window_right);
    if (r.end > r.begin) pairs += r.end - r.begin;
  }
  return pairs;
}

inline int mixed_decode_sms(double decode_bytes, double prefill_flops, int sms) {
  if (decode_bytes <= 0 || prefill_flops <= 0 || sms < 2) return 0;
  const double td = decode_bytes / kDecodeBytesPerSm, tp = prefill_flops / kPrefillFlopsPerSm;
  const int m = static_cast<int>(sms * td / (td + tp) + 0.5);
  return m < 1 ? 1 : m > sms / 2 ? sms / 2 : m;
}

}  // namespace kvcache
}  // namespace longctx
