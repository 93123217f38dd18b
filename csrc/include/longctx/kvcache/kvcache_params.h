// Plain-data description of the paged KV cache and of the two ops that use it: kvcache_append
// (write new K/V tokens into their pages, RoPE on K, quantize on write) and
// flash_attn_with_kvcache (attention of queries over the cached keys). Framework-free: raw
// pointers and element strides, shared by the CPU twin and the CUDA kernels.
//
// Storage layout (the vLLM / FlashInfer "NHD" paged layout):
//   k_cache, v_cache   pools of pages, (num_blocks, block_size, kv_heads, head_dim); the last
//                      dimension is contiguous, the other three may have any stride (a view
//                      k_cache = kv[:, 0] of a combined (num_blocks, 2, block_size, ...) pool works).
//   block_table        int32 (batch, max_blocks), rows with a unit column stride: token t of
//                      sequence b lives in page block_table[b][t / block_size], slot
//                      t % block_size. Entries past a sequence's last needed page are never used
//                      (the decode kernel may read them; PagedKVCache pads them with -1).
//   cache_seqlens      int32 (batch,): tokens in the cache per sequence. For append: the length
//                      before the new tokens (they go to positions cache_seqlens[b] + i); for
//                      attention: the number of keys each sequence attends to (new tokens
//                      included).
// Formats (one for k_cache and v_cache together; the pool dtype says which):
//   native     bf16 / fp16 (and fp32 on CPU), the dtype of the new tokens and of q.
//   int8       symmetric, one fp32 scale per (token, kv head) stored beside the page in
//              k_scale_cache / v_scale_cache, (num_blocks, block_size, kv_heads), any strides:
//                scale = amax_c |x_c| / 127,  q_c = clamp(rint(x_c / scale), -127, 127),
//                x_c ~= q_c * scale   (a head of zeros stores scale 0 and q 0).
//   fp8 e4m3   (torch.float8_e4m3fn) with one fixed fp32 scale per kv head,
//              k_fp8_scale / v_fp8_scale (kv_heads,), contiguous, finite and > 0:
//                q_c = e4m3(x_c / scale[h])  (round to nearest even, saturating to +-448),
//                x_c ~= float(q_c) * scale[h].
// Dequantization is always x = stored * scale, in fp32.
//
// Append semantics: the new token i of sequence b (row cu_new[b] + i of the packed k/v, or
// (b, i) of the batched ones) is written to cache position cache_seqlens[b] + i. With inv_freq,
// K is rotated first at positions[...] (default: its cache position) by rope_math.h's cos_sin /
// rotate, and the rotated value is rounded to k's dtype before storing or quantizing, exactly as
// apply_rope followed by an append would do. V is never rotated.
//
// Attention semantics (FlashAttention's flash_attn_with_kvcache): queries of sequence b are the
// last sq_b positions of its sk_b = cache_seqlens[b] keys (bottom-right aligned); query row i sees
// key j iff mask.h's mask_visible(i, j, sq_b, sk_b, window_left, window_right); causal is
// window_right = 0. GQA: query head h reads kv head h / (heads / kv_heads). A row that sees no
// key gets out = 0 and lse = -inf. lse is natural-log, fp32: batched (batch, heads, seqlen_q),
// varlen (heads, total_q).
//
// Split-KV (decode): with num_splits > 1 the key tiles of each (sequence, kv head, query tile) are
// divided into num_splits sets (contiguous ranges; in the staged kernel, 16-key tiles dealt
// round-robin); each writes an fp32 partial (out normalized by its own sum, and its lse) into
// out_accum / lse_accum, and a merge pass combines them:
//   lse = log(sum_s exp(lse_s)),  out = sum_s exp(lse_s - lse) * out_s.
//
// validate: when true, the launcher has checked on the host that every page a sequence needs
// lies in [0, num_blocks), that lengths fit in max_blocks * block_size, and (append) that no page
// written by one sequence is used by another. When false (CUDA graphs: no host sync) the kernels
// still never touch memory outside the pool: a token whose page id is out of range is not written
// and a key whose page id is out of range is masked; sk is clamped to max_blocks * block_size.
// cu_new / cu_seqlens_q are then trusted (they index the new tokens and q, not the pool).
//
// Offsets are int64: page * page_stride passes 2^31 elements for pools of a few GB.
#pragma once
#include <cstdint>
#include "longctx/logit_mods.h"

namespace longctx {
namespace kvcache {

enum class Format : int32_t {
  kNative = 0,  // the element type of q / new tokens: bf16, fp16 (fp32 on CPU)
  kInt8 = 1,    // int8 with per-(token, head) fp32 scales beside the page
  kFp8E4M3 = 2  // float8_e4m3fn with per-kv-head fp32 scales
};

// One pool (k or v) and its scales.
struct CacheView {
  void* data = nullptr;  // (num_blocks, block_size, kv_heads, head_dim)
  int64_t page_stride = 0, slot_stride = 0, head_stride = 0;  // elements
  float* token_scale = nullptr;  // int8: (num_blocks, block_size, kv_heads)
  int64_t scale_page_stride = 0, scale_slot_stride = 0, scale_head_stride = 0;
  const float* head_scale = nullptr;  // fp8: (kv_heads,), contiguous
};

// The cache as a whole: both pools, the page map and the lengths.
struct PagedKV {
  CacheView k, v;
  Format format = Format::kNative;
  const int32_t* block_table = nullptr;  // (batch, max_blocks)
  int64_t block_table_stride = 0;        // elements between rows; columns are contiguous
  const int32_t* cache_seqlens = nullptr;  // (batch,)
  int64_t num_blocks = 0;
  int batch = 0, kv_heads = 0, head_dim = 0, block_size = 0, max_blocks = 0;
  bool validated = true;  // see "validate" above
};

// kvcache_append: new tokens k/v, batched (batch, seqlen_new, kv_heads, head_dim) or packed
// (total_new, kv_heads, head_dim) with cu_new (batch + 1,) int32 offsets.
struct AppendParams {
  PagedKV cache;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;  // batch stride unused if packed
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  const int32_t* cu_new = nullptr;  // packed layout when non-null
  int seqlen_new = 0;               // batched layout: tokens per sequence
  int64_t total_new = 0;            // rows of packed k (batched: batch * seqlen_new)

  // RoPE on K (inv_freq != nullptr). positions: batched (batch, seqlen_new) or packed
  // (total_new,), int32 or int64; nullptr means cache_seqlens[b] + i.
  const float* inv_freq = nullptr;
  int n_freq = 0;  // rotary_dim / 2
  float rope_scale = 1.f;
  bool rope_interleaved = false;
  const void* positions = nullptr;
  bool positions_int64 = true;
  int64_t pos_batch_stride = 0, pos_row_stride = 0;
};

// flash_attn_with_kvcache: q batched (batch, seqlen_q, heads, head_dim) or packed
// (total_q, heads, head_dim) with cu_seqlens_q; out like q; lse as described above.
struct AttnParams {
  PagedKV cache;
  const void* q = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;  // lse rows are contiguous
  const int32_t* cu_seqlens_q = nullptr;  // packed layout when non-null
  int seqlen_q = 0;                       // batched: rows per sequence; packed: max_seqlen_q
  int64_t total_q = 0;                    // rows of q (batched: batch * seqlen_q)
  int heads = 0;

  float softmax_scale = 1.f;
  bool causal = false;
  int window_left = -1, window_right = -1;  // causal => window_right == 0
  LogitMods mods;  // softcap and sinks (logit_mods.h)

  // Split-KV scratch (num_splits > 1): out_accum (num_splits, total_q, heads, head_dim) fp32 and
  // lse_accum (num_splits, heads, total_q) fp32, contiguous; row index = the row of q (batched:
  // b * seqlen_q + i).
  int num_splits = 1;
  float* out_accum = nullptr;
  float* lse_accum = nullptr;

  // CUDA staged decode kernel (set by the launcher, ignored elsewhere): each warp takes runs of
  // 2^decode_tile_run_log2 adjacent 16-key tiles per round-robin step (0: single tiles).
  int decode_tile_run_log2 = 0;
};

}  // namespace kvcache
}  // namespace longctx
