// Argument checking for the paged KV-cache ops (kvcache_append, flash_attn_with_kvcache), shared
// by the CPU twin and the CUDA launchers: validates the tensors (dtypes, shapes, devices,
// strides, scale tensors of each format, heads, lengths, page ids) with errors that name the
// argument, and describes the call as a framework-free kvcache::AppendParams / AttnParams.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include "longctx/kvcache/kvcache_params.h"

namespace longctx {

struct KVCacheTensors {
  const at::Tensor& k_cache;
  const at::Tensor& v_cache;
  const std::optional<at::Tensor>& k_scale_cache;  // int8: (num_blocks, block_size, kv_heads)
  const std::optional<at::Tensor>& v_scale_cache;
  const std::optional<at::Tensor>& k_fp8_scale;    // fp8: (kv_heads,)
  const std::optional<at::Tensor>& v_fp8_scale;
  const at::Tensor& block_table;                   // int32 (batch, max_blocks)
  const at::Tensor& cache_seqlens;                 // int32 (batch,)
};

// kvcache_append. With validate, also reads cu_new / cache_seqlens / block_table / fp8 scales on
// the host (a device-to-host copy and a sync on CUDA) and checks their values: new tokens fit in
// the sequence's pages, every page they need is in [0, num_blocks), no page written by one
// sequence is used by another (or twice by the same one), fp8 scales are finite and > 0.
kvcache::AppendParams make_kvcache_append_args(
    const at::Tensor& k, const at::Tensor& v, const KVCacheTensors& cache,
    const std::optional<at::Tensor>& cu_new, const std::optional<at::Tensor>& positions,
    const std::optional<at::Tensor>& inv_freq, double attention_factor, bool rope_interleaved,
    bool validate, const char* op);

// flash_attn_with_kvcache: out (q's shape and dtype) and lse (batched (batch, heads, seqlen_q),
// varlen (heads, total_q), fp32) must be allocated (flash_fwd_output_shapes gives the shapes).
// num_splits must already be resolved (>= 1); the split scratch is attached by the caller.
// sinks / softcap: common/logit_mods.h. new_tokens (the check before an append,
// flash_attn_with_kvcache_check): 0, none; n > 0, n new tokens per sequence (batched q); -1, as
// many as the sequence's query rows (packed q). cache_seqlens are then the lengths before the
// append, and validate checks the pages of the lengths after it as the append will. With
// validate, checks on the host that cache_seqlens fit in the block table, that the pages they
// need are in [0, num_blocks), the cu_seqlens_q values and the fp8 scales.
kvcache::AttnParams make_kvcache_attn_args(
    const at::Tensor& q, const KVCacheTensors& cache, const std::optional<at::Tensor>& cu_seqlens_q,
    int64_t max_seqlen_q, double softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, const std::optional<at::Tensor>& sinks, double softcap,
    int64_t num_splits, bool validate, const at::Tensor& out, const at::Tensor& lse,
    const char* op, int64_t new_tokens = 0);

// The dtype of the pool's elements as the format enum (after the checks above).
kvcache::Format kvcache_format(const at::Tensor& k_cache);

}  // namespace longctx
