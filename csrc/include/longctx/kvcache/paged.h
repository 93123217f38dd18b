// Page addressing of the paged KV cache (kvcache_params.h), for host and device code.
//
// locate() maps (sequence b, token position t) to (page, slot) through the block table and says
// whether that page may be touched: t in [0, max_blocks * block_size) and the page id in
// [0, num_blocks). Every read and write of the pool goes through it, so even an unvalidated call
// (validate=False) never leaves the pool. Offsets are int64 (page * page_stride can pass 2^31).
#pragma once
#include <cstdint>
#include "longctx/config.h"
#include "longctx/kvcache/kvcache_params.h"
#include "longctx/seqlen.h"

namespace longctx {
namespace kvcache {

struct Slot {
  int64_t page = -1;
  int slot = 0;
  bool valid = false;
};

LONGCTX_HOST_DEVICE int64_t seq_capacity(const PagedKV& c) {
  return int64_t(c.max_blocks) * c.block_size;
}

LONGCTX_HOST_DEVICE Slot locate(const PagedKV& c, int b, int64_t t) {
  Slot s;
  if (t < 0 || t >= seq_capacity(c)) return s;
  const int64_t block = t / c.block_size;
  s.slot = static_cast<int>(t - block * c.block_size);
  s.page = c.block_table[int64_t(b) * c.block_table_stride + block];
  s.valid = s.page >= 0 && s.page < c.num_blocks;
  return s;
}

// Element offset of (page, slot, kv head) in a pool; the head's head_dim values follow.
LONGCTX_HOST_DEVICE int64_t elem_offset(const CacheView& v, int64_t page, int slot, int head) {
  return page * v.page_stride + int64_t(slot) * v.slot_stride + int64_t(head) * v.head_stride;
}

// Offset of the int8 scale of (page, slot, kv head).
LONGCTX_HOST_DEVICE int64_t scale_offset(const CacheView& v, int64_t page, int slot, int head) {
  return page * v.scale_page_stride + int64_t(slot) * v.scale_slot_stride +
         int64_t(head) * v.scale_head_stride;
}

// Keys sequence b attends to: cache_seqlens[b], clamped to [0, capacity] (validated calls never
// need the clamp).
LONGCTX_HOST_DEVICE int64_t cached_len(const PagedKV& c, int b) {
  int64_t sk = c.cache_seqlens[b];
  const int64_t cap = seq_capacity(c);
  return sk < 0 ? 0 : (sk > cap ? cap : sk);
}

// Sequence b of an attention call (seqlen.h): its query rows (batched or packed) and the keys it
// attends to, the first cached_len of its cache.
LONGCTX_HOST_DEVICE SeqLen sequence(const AttnParams& p, int b) {
  return seq_len(p.cu_seqlens_q, nullptr, p.seqlen_q, static_cast<int>(cached_len(p.cache, b)), b);
}

}  // namespace kvcache
}  // namespace longctx
