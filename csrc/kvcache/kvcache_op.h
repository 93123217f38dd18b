// The KV-cache ops, written once for both devices: the argument checks (kvcache_args) and the
// outputs here, the device's work in a Device policy (kvcache_cpu.cpp, kvcache_cuda.cu). Each
// device registers kvcache_append_op<Device>, flash_attn_with_kvcache_op<Device> and
// flash_attn_with_kvcache_check_op<Device> under the schemas of csrc/bindings.cpp.
//
// A Device provides:
//   static void append(const kvcache::AppendParams& p, const at::Tensor& k);
//       (called only when there is a new token)
//   static bool needs_host_checks(const at::Tensor& q, const at::Tensor& k_cache,
//                                 int64_t seqlen_q);
//       true where its path for this shape reads the cache's page ids unmasked, so that the
//       host-side validation must run even with validate=False (CUDA's gathered prefill);
//   static void check(const kvcache::AttnParams& p, const at::Tensor& q,
//                     const KVCacheTensors& cache);
//       what only this device's attention refuses (after the shared checks);
//   static void attend(const KVCacheAttnCall& c);
//       fills c.out and c.lse; c.num_splits is the caller's (0 = the device chooses).
#pragma once
#include <ATen/ATen.h>
#include <algorithm>
#include <optional>
#include <tuple>
#include "common/checks.h"
#include "common/nvtx.h"
#include "flash/flash_args.h"
#include "kvcache/kvcache_args.h"

namespace longctx {

struct KVCacheAttnCall {
  kvcache::AttnParams& params;  // checked; params.num_splits = max(1, num_splits)
  const at::Tensor& q;
  const KVCacheTensors& cache;
  const std::optional<at::Tensor>& cu_seqlens_q;
  const std::optional<at::Tensor>& sinks;  // params.mods.sinks as a tensor
  int64_t num_splits;  // as passed: 0 = automatic
  at::Tensor &out, &lse;
};

template <typename Device>
void kvcache_append_op(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                       const at::Tensor& v_cache, const std::optional<at::Tensor>& k_scale_cache,
                       const std::optional<at::Tensor>& v_scale_cache,
                       const std::optional<at::Tensor>& k_fp8_scale,
                       const std::optional<at::Tensor>& v_fp8_scale, const at::Tensor& block_table,
                       const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& cu_new,
                       const std::optional<at::Tensor>& positions,
                       const std::optional<at::Tensor>& inv_freq, double attention_factor,
                       bool rope_interleaved, bool validate) {
  constexpr const char* op = "kvcache_append";
  NvtxRange range("longctx::kvcache_append");
  const KVCacheTensors cache{k_cache,     v_cache,     k_scale_cache, v_scale_cache,
                             k_fp8_scale, v_fp8_scale, block_table,   cache_seqlens};
  const kvcache::AppendParams p = make_kvcache_append_args(
      k, v, cache, cu_new, positions, inv_freq, attention_factor, rope_interleaved, validate, op);
  if (p.total_new == 0) return;
  Device::append(p, k);
}

// The checks of flash_attn_with_kvcache (both ops below): the shared ones, then the device's.
// out and lse must be allocated with the shapes flash_fwd_output_shapes gives (the check-only op
// passes q as out: same shape, dtype and device).
template <typename Device>
kvcache::AttnParams check_kvcache_attn(
    const at::Tensor& q, const KVCacheTensors& cache, const std::optional<at::Tensor>& cu_seqlens_q,
    int64_t max_seqlen_q, double softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, int64_t num_splits, bool validate,
    const std::optional<at::Tensor>& sinks, double softcap, const at::Tensor& out,
    const at::Tensor& lse, const char* op, int64_t new_tokens = 0) {
  LONGCTX_CHECK_ARG(num_splits >= 0 && num_splits <= 1024, op, "num_splits",
                    "must lie in [0, 1024] (0 = automatic), got ", num_splits);
  const int64_t seqlen_q = cu_seqlens_q.has_value() ? max_seqlen_q : q.size(1);
  const bool host_checks = validate || Device::needs_host_checks(q, cache.k_cache, seqlen_q);
  kvcache::AttnParams p = make_kvcache_attn_args(
      q, cache, cu_seqlens_q, max_seqlen_q, softmax_scale, causal, window_left, window_right,
      sinks, softcap, std::max<int64_t>(1, num_splits), host_checks, out, lse, op, new_tokens);
  Device::check(p, q, cache);
  return p;
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor> flash_attn_with_kvcache_op(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const std::optional<at::Tensor>& k_scale_cache, const std::optional<at::Tensor>& v_scale_cache,
    const std::optional<at::Tensor>& k_fp8_scale, const std::optional<at::Tensor>& v_fp8_scale,
    const at::Tensor& block_table, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& cu_seqlens_q, int64_t max_seqlen_q, double softmax_scale,
    bool causal, int64_t window_left, int64_t window_right, int64_t num_splits, bool validate,
    const std::optional<at::Tensor>& sinks, double softcap) {
  constexpr const char* op = "flash_attn_with_kvcache";
  NvtxRange range("longctx::flash_attn_with_kvcache");
  const KVCacheTensors cache{k_cache,     v_cache,     k_scale_cache, v_scale_cache,
                             k_fp8_scale, v_fp8_scale, block_table,   cache_seqlens};
  const auto shapes = flash_fwd_output_shapes(q, cu_seqlens_q.has_value(), op);  // q's rank
  auto out = at::empty(shapes.out, q.options());
  auto lse = at::empty(shapes.lse, q.options().dtype(at::kFloat));
  kvcache::AttnParams p = check_kvcache_attn<Device>(
      q, cache, cu_seqlens_q, max_seqlen_q, softmax_scale, causal, window_left, window_right,
      num_splits, validate, sinks, softcap, out, lse, op);
  Device::attend(KVCacheAttnCall{p, q, cache, cu_seqlens_q, sinks, num_splits, out, lse});
  return {out, lse};
}

// Every check flash_attn_with_kvcache_op makes, nothing computed: flash_attn_with_kvcache (Python)
// runs it before it appends new tokens (new_tokens: kvcache_args.h; cache_seqlens are the lengths
// before the append), so that a call the attention would refuse writes nothing.
template <typename Device>
void flash_attn_with_kvcache_check_op(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const std::optional<at::Tensor>& k_scale_cache, const std::optional<at::Tensor>& v_scale_cache,
    const std::optional<at::Tensor>& k_fp8_scale, const std::optional<at::Tensor>& v_fp8_scale,
    const at::Tensor& block_table, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& cu_seqlens_q, int64_t max_seqlen_q, double softmax_scale,
    bool causal, int64_t window_left, int64_t window_right, int64_t num_splits, bool validate,
    const std::optional<at::Tensor>& sinks, double softcap, int64_t new_tokens) {
  constexpr const char* op = "flash_attn_with_kvcache";
  const KVCacheTensors cache{k_cache,     v_cache,     k_scale_cache, v_scale_cache,
                             k_fp8_scale, v_fp8_scale, block_table,   cache_seqlens};
  const auto shapes = flash_fwd_output_shapes(q, cu_seqlens_q.has_value(), op);  // q's rank
  const auto lse = at::empty(shapes.lse, q.options().dtype(at::kFloat));
  check_kvcache_attn<Device>(q, cache, cu_seqlens_q, max_seqlen_q, softmax_scale, causal,
                             window_left, window_right, num_splits, validate, sinks, softcap, q,
                             lse, op, new_tokens);
}

}  // namespace longctx
