// CPU test of the chunked prefill's key chunks and fold (prefill_chunks.h, prefill_fold.h): for
// random lengths, masks and small chunk sizes, every key lies in exactly one chunk, the chunk's
// moved mask (window_right + c * chunk over the chunk's keys) sees exactly the keys the call's
// mask sees, and folding the chunks' softmax states by their lse gives the one-pass softmax. A
// call's chunks (prefill_call_chunk: clamped lengths, windows) fit the capacity bounds a CUDA
// graph capture sizes them by.
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <initializer_list>
#include <random>
#include <vector>
#include "longctx/flash/mask.h"
#include "longctx/kvcache/prefill_chunks.h"
#include "longctx/kvcache/prefill_fold.h"

using longctx::flash::mask_visible;
namespace kv = longctx::kvcache;

static int failures = 0;
static long checks = 0;
__attribute__((format(printf, 2, 3))) static void check(bool ok, const char* fmt, ...) {
  ++checks;
  if (ok || ++failures > 10) return;
  std::va_list args;
  va_start(args, fmt);
  std::printf("FAIL: ");
  std::vprintf(fmt, args);
  std::printf("\n");
  va_end(args);
}

// Masks of one case: keys in chunks, and each chunk's mask against the call's.
static void check_masks(int sq, int sk, int wr, int64_t chunk) {
  const int n = kv::prefill_key_chunks(sk, false, chunk);
  check(n >= 1 && (n - 1) * chunk < (sk > 0 ? sk : 1), "chunks %d for sk %d chunk %lld", n, sk,
        (long long)chunk);
  std::vector<int> owner(sk, -1);
  for (int c = 0; c < n; ++c) {
    const kv::KeyChunk kc = kv::prefill_key_chunk(sk, c, chunk);
    check(kc.count >= 0 && kc.count <= chunk && kc.first >= 0 && kc.first + kc.count <= sk,
          "chunk %d of sk %d: [%lld, +%lld)", c, sk, (long long)kc.first, (long long)kc.count);
    const int64_t cwr = kv::prefill_chunk_window_right(wr, c, chunk);
    for (int64_t j = kc.first; j < kc.first + kc.count; ++j) {
      check(owner[j] < 0, "key %lld in chunks %d and %d", (long long)j, owner[j], c);
      owner[j] = c;
      for (int i = 0; i < sq; ++i) {
        const bool want = mask_visible(i, j, sq, sk, -1, wr);
        const bool got = mask_visible(i, j - kc.first, sq, static_cast<int>(kc.count), -1,
                                      static_cast<int>(cwr));
        check(want == got, "sq %d sk %d wr %d chunk %lld: row %d key %lld (chunk %d) %d vs %d",
              sq, sk, wr, (long long)chunk, i, (long long)j, c, want, got);
      }
    }
  }
  for (int j = 0; j < sk; ++j) check(owner[j] >= 0, "key %d of sk %d in no chunk", j, sk);
}

// prefill_call_chunk of one sequence against the definition (the keys its queries can see, in
// chunks from the last key back without a left window), and the capacity bounds a call that
// cannot read the lengths sizes its buffers and chunk count by: every chunk fits them, and the
// chunks past prefill_key_chunks(cap) are empty.
static void check_call_chunks(int64_t len, int64_t cap, int64_t sq, int64_t max_sq, int wl,
                              int64_t chunk) {
  const int64_t keys = len < 0 ? 0 : (len > cap ? cap : len);
  const bool windowed = wl >= 0;
  const int64_t bound = kv::prefill_chunk_keys_bound(cap, max_sq, wl, chunk);
  const int by_cap = kv::prefill_key_chunks(cap, windowed, chunk);
  const int by_len = kv::prefill_key_chunks(keys, windowed, chunk);
  check(by_len <= by_cap, "len %lld cap %lld: %d chunks by length, %d by capacity",
        (long long)len, (long long)cap, by_len, by_cap);
  int64_t covered = 0;
  for (int c = 0; c < by_cap + 2; ++c) {
    const kv::KeyChunk got = kv::prefill_call_chunk(len, cap, sq, wl, c, chunk);
    kv::KeyChunk want;
    if (!windowed) {
      want = kv::prefill_key_chunk(keys, c, chunk);
    } else if (c == 0) {
      const int64_t first = keys - sq - wl;
      want.first = first < 0 ? 0 : (first > keys ? keys : first);
      want.count = keys - want.first;
    }
    check(got.first == want.first && got.count == want.count,
          "len %lld cap %lld sq %lld wl %d chunk %lld, chunk %d: [%lld, +%lld) vs [%lld, +%lld)",
          (long long)len, (long long)cap, (long long)sq, wl, (long long)chunk, c,
          (long long)got.first, (long long)got.count, (long long)want.first,
          (long long)want.count);
    check(got.count >= 0 && got.first >= 0 && got.first + got.count <= keys,
          "chunk %d outside the keys", c);
    if (sq >= 0 && sq <= max_sq)
      check(got.count <= bound, "len %lld cap %lld sq %lld wl %d: chunk %d holds %lld > bound "
            "%lld", (long long)len, (long long)cap, (long long)sq, wl, c, (long long)got.count,
            (long long)bound);
    if (c >= by_len) check(got.count == 0, "chunk %d past the length's %d is not empty", c, by_len);
    covered += got.count;
  }
  if (!windowed) check(covered == keys, "len %lld: chunks cover %lld keys", (long long)len,
                       (long long)covered);
  // a window's chunk holds every key some query row sees (bottom-right aligned)
  if (windowed && sq > 0) {
    const kv::KeyChunk kc = kv::prefill_call_chunk(len, cap, sq, wl, 0, chunk);
    for (int64_t j = 0; j < keys; ++j) {
      bool seen = false;
      for (int64_t i = 0; i < sq && !seen; ++i)
        seen = mask_visible(int(i), int(j), int(sq), int(keys), wl, -1);
      check(seen == (j >= kc.first), "len %lld sq %lld wl %d: key %lld seen %d, chunk from %lld",
            (long long)len, (long long)sq, wl, (long long)j, seen, (long long)kc.first);
    }
  }
}

// Folding per-chunk (lse, out) states of random scores equals the one-pass softmax.
static void check_fold(std::mt19937& rng, int keys, int64_t chunk, bool sink) {
  std::normal_distribution<double> nd(0.0, 3.0);
  std::vector<double> s(keys), v(keys);
  for (int j = 0; j < keys; ++j) {
    s[j] = (j % 7 == 3) ? -INFINITY : nd(rng);  // masked keys
    v[j] = nd(rng);
  }
  const double sink_logit = sink ? nd(rng) : -INFINITY;
  double m = sink_logit;
  for (double x : s) m = x > m ? x : m;
  double den = m == -INFINITY ? 0 : std::exp(sink_logit - m), num = 0;
  for (int j = 0; j < keys; ++j)
    if (s[j] != -INFINITY) den += std::exp(s[j] - m), num += std::exp(s[j] - m) * v[j];
  const double want_lse = den > 0 ? m + std::log(den) : -INFINITY;
  const double want_out = den > 0 ? num / den : 0;
  float lse = 0, out = 0;
  const int n = kv::prefill_key_chunks(keys, false, chunk);
  for (int c = 0; c < n; ++c) {
    const kv::KeyChunk kc = kv::prefill_key_chunk(keys, c, chunk);
    double cm = c == 0 ? sink_logit : -INFINITY;
    for (int64_t j = kc.first; j < kc.first + kc.count; ++j) cm = s[j] > cm ? s[j] : cm;
    double cden = (c == 0 && cm != -INFINITY) ? std::exp(sink_logit - cm) : 0, cnum = 0;
    for (int64_t j = kc.first; j < kc.first + kc.count; ++j)
      if (s[j] != -INFINITY) cden += std::exp(s[j] - cm), cnum += std::exp(s[j] - cm) * v[j];
    const float cl = cden > 0 ? float(cm + std::log(cden)) : -INFINITY;
    const float co = cden > 0 ? float(cnum / cden) : 0.f;
    if (c == 0) {
      lse = cl, out = co;
    } else {
      const kv::FoldWeights w = kv::fold_weights(lse, cl);
      out = w.a * out + w.b * co;
      lse = w.lse;
    }
  }
  check(std::isinf(want_lse) == std::isinf(lse), "keys %d: lse %g vs %g", keys, lse, want_lse);
  if (!std::isinf(want_lse))
    check(std::fabs(lse - want_lse) < 1e-4 * (1 + std::fabs(want_lse)), "keys %d: lse %g vs %g",
          keys, lse, want_lse);
  check(std::fabs(out - want_out) < 1e-4 * (1 + std::fabs(want_out)), "keys %d: out %g vs %g",
        keys, out, want_out);
}

int main() {
  // chunk counts and bounds at the real chunk size
  check(kv::prefill_key_chunks(0, false) == 1 && kv::prefill_key_chunks(32768, false) == 1 &&
            kv::prefill_key_chunks(32769, false) == 2 && kv::prefill_key_chunks(1 << 20, true) == 1,
        "chunk counts");
  const kv::KeyChunk last = kv::prefill_key_chunk(70001, 2);
  check(last.first == 0 && last.count == 70001 - 2 * 32768, "third chunk of 70001 keys");
  check(kv::prefill_key_chunk(33000, 2).count == 0, "past the first key");
  check(kv::prefill_chunk_window_right(-1, 3) == -1 && kv::prefill_chunk_window_right(0, 2) ==
            65536, "window_right of a chunk");
  std::mt19937 rng(7);
  for (int sq = 0; sq <= 9; ++sq)
    for (int sk = 0; sk <= 23; ++sk)
      for (int wr : {-1, 0, 1, 5})
        for (int64_t chunk : {1, 2, 3, 5, 8}) check_masks(sq, sk, wr, chunk);
  std::uniform_int_distribution<int> len(1, 60);
  for (int t = 0; t < 300; ++t) {
    const int sq = len(rng), sk = len(rng);
    check_masks(sq, sk, t % 3 == 0 ? -1 : t % 17, 1 + t % 13);
    check_fold(rng, sk, 1 + t % 9, t % 2 == 1);
  }
  // one sequence's chunks: lengths around the chunk edges and past the capacity, negative ones
  // (unvalidated), windows, unvalidated query lengths (negative, past max_sq)
  for (int64_t chunk : {1, 3, 8})
    for (int64_t cap : {0, 1, 7, 8, 9, 24, 25})
      for (int64_t len : {-3, 0, 1, 7, 8, 9, 16, 17, 24, 30})
        for (int64_t sq : {-2, 0, 1, 3, 9})
          for (int wl : {-1, 0, 2, 11}) check_call_chunks(len, cap, sq, 9, wl, chunk);
  check(kv::prefill_chunk_keys_bound(200000, 8192, -1) == 32768 &&
            kv::prefill_chunk_keys_bound(1000, 8192, -1) == 1000 &&
            kv::prefill_chunk_keys_bound(200000, 8192, 4096) == 12288 &&
            kv::prefill_chunk_keys_bound(10000, 8192, 4096) == 10000,
        "key bounds at the real chunk size");
  // NaN reaches the fold's output; two empty states stay empty
  const kv::FoldWeights wn = kv::fold_weights(1.f, NAN);
  check(std::isnan(wn.a) && std::isnan(wn.b) && std::isnan(wn.lse), "NaN lse_b");
  const kv::FoldWeights wn2 = kv::fold_weights(NAN, 1.f);
  check(std::isnan(wn2.a) && std::isnan(wn2.lse), "NaN lse_a");
  const kv::FoldWeights we = kv::fold_weights(-INFINITY, -INFINITY);
  check(we.a == 0.f && we.b == 0.f && we.lse == -INFINITY, "empty states");
  std::printf("prefill_chunks_test: %ld checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
