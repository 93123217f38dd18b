// Key chunks of the chunked prefill: the gathered prefill copies at most kPrefillKeyChunk keys of
// a sequence at a time, so its temporary K/V stays the size of one chunk however long the
// context is (host and device code, no framework headers).
//
// Chunk c of a sequence with sk keys holds keys [max(0, sk - (c + 1) C), max(0, sk - c C)):
// chunk 0 is the last C keys, the next chunks walk back to key 0. Dropping keys on the left of a
// bottom-right aligned mask keeps it (both ends of every row move with the shift); dropping the
// c C keys on the right moves the diagonal by c C, so chunk c runs the call's mask with
// window_right + c C (unbounded stays unbounded) and causal = false. A bounded window_left would
// have to move the other way (window_left - c C), which the forward's windows cannot express:
// windowed calls gather only their window and run as one chunk (prefill_key_chunks = 1).
// The chunks' outputs are combined by their log-sum-exp (prefill_fold.h).
#pragma once
#include <cstdint>
#include "longctx/config.h"

namespace longctx {
namespace kvcache {

constexpr int64_t kPrefillKeyChunk = 32768;

struct KeyChunk {
  int64_t first = 0;  // first key of the chunk
  int64_t count = 0;  // keys in it (0: the sequence has none there)
};

// Chunks of a call whose longest sequence has max_sk keys (at least 1).
LONGCTX_HOST_DEVICE int prefill_key_chunks(int64_t max_sk, bool windowed,
                                           int64_t chunk = kPrefillKeyChunk) {
  if (windowed || max_sk <= chunk) return 1;
  return static_cast<int>((max_sk + chunk - 1) / chunk);
}

// Keys of chunk c of a sequence with sk keys.
LONGCTX_HOST_DEVICE KeyChunk prefill_key_chunk(int64_t sk, int c,
                                               int64_t chunk = kPrefillKeyChunk) {
  const int64_t hi = sk - int64_t(c) * chunk;
  KeyChunk r;
  if (hi <= 0) return r;
  r.first = hi > chunk ? hi - chunk : 0;
  r.count = hi - r.first;
  return r;
}

// Keys a sequence of cache length len holds in a block table of capacity cap (len clamped to
// [0, cap], as the decode clamps it).
LONGCTX_HOST_DEVICE int64_t prefill_seq_keys(int64_t len, int64_t cap) {
  return len < 0 ? 0 : (len > cap ? cap : len);
}

// Keys of chunk c of one sequence of a call: len its cache length (clamped to [0, cap], cap the
// block table's capacity), sq its query length, window_left the call's (-1: none). With a left
// window the call has one chunk, the keys [len - sq - window_left, len) its queries can see (the
// forward over them keeps the bottom-right mask); without one, chunk c of prefill_key_chunk.
LONGCTX_HOST_DEVICE KeyChunk prefill_call_chunk(int64_t len, int64_t cap, int64_t sq,
                                                int64_t window_left, int c,
                                                int64_t chunk = kPrefillKeyChunk) {
  const int64_t keys = prefill_seq_keys(len, cap);
  if (window_left < 0) return prefill_key_chunk(keys, c, chunk);
  KeyChunk r;
  if (c > 0) return r;
  const int64_t first = keys - sq - window_left;  // clamped: unvalidated sq may be negative
  r.first = first < 0 ? 0 : (first > keys ? keys : first);
  r.count = keys - r.first;
  return r;
}

// Bounds that hold for any cache lengths (a call that cannot read them on the host, e.g. in a
// CUDA graph capture): the keys of one sequence's chunk and the number of chunks, from the
// block table's capacity cap and the longest query max_sq.
LONGCTX_HOST_DEVICE int64_t prefill_chunk_keys_bound(int64_t cap, int64_t max_sq,
                                                     int64_t window_left,
                                                     int64_t chunk = kPrefillKeyChunk) {
  if (window_left >= 0) return max_sq + window_left < cap ? max_sq + window_left : cap;
  return cap < chunk ? cap : chunk;
}

// window_right of chunk c (causal normalized to window_right = 0 before): -1 stays -1.
LONGCTX_HOST_DEVICE int64_t prefill_chunk_window_right(int64_t window_right, int c,
                                                       int64_t chunk = kPrefillKeyChunk) {
  return window_right < 0 ? -1 : window_right + int64_t(c) * chunk;
}

}  // namespace kvcache
}  // namespace longctx
