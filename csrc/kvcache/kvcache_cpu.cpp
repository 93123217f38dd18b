// CPU implementation of longctx::kvcache_append and longctx::flash_attn_with_kvcache: argument
// checks (kvcache_args), then the task functions of kvcache/kvcache_cpu.h split over threads with
// at::parallel_for.
//
// Append: one task per new token; each owns its (page, slot) of K, V and the int8 scales (the
// checks make sure no two tokens share a slot), so there is no write sharing.
// Attention: one task per (sequence, kv head, tile of 64 packed GQA rows, split). With
// num_splits > 1 each task writes its fp32 partial to a scratch buffer and a second pass, one
// task per (sequence, head), merges the partials by their lse. num_splits = 0 (automatic) means 1
// on the CPU: results then do not depend on the thread count, and chunked prefill is bitwise
// equal to a single pass (see kvcache_cpu.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <tuple>
#include <vector>
#include "common/build_registry.h"
#include "common/checks.h"
#include "common/dispatch.h"
#include "flash/flash_args.h"
#include "kvcache/kvcache_args.h"
#include "longctx/kvcache/kvcache_cpu.h"

namespace longctx {
namespace {

namespace kc = kvcache::cpu;

void kvcache_append_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const std::optional<at::Tensor>& k_scale_cache,
                        const std::optional<at::Tensor>& v_scale_cache,
                        const std::optional<at::Tensor>& k_fp8_scale,
                        const std::optional<at::Tensor>& v_fp8_scale,
                        const at::Tensor& block_table, const at::Tensor& cache_seqlens,
                        const std::optional<at::Tensor>& cu_new,
                        const std::optional<at::Tensor>& positions,
                        const std::optional<at::Tensor>& inv_freq, double attention_factor,
                        bool rope_interleaved, bool validate) {
  constexpr const char* op = "kvcache_append";
  const KVCacheTensors cache{k_cache,     v_cache,     k_scale_cache, v_scale_cache,
                             k_fp8_scale, v_fp8_scale, block_table,   cache_seqlens};
  const kvcache::AppendParams p = make_kvcache_append_args(
      k, v, cache, cu_new, positions, inv_freq, attention_factor, rope_interleaved, validate, op);
  if (p.total_new == 0) return;
  const int64_t grain = std::max<int64_t>(1, 8192 / (2 * p.cache.kv_heads * p.cache.head_dim));
  dispatch_cpu_dtype_and_format(k.scalar_type(), p.cache.format, [&](auto* tag, auto fmt) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr kvcache::Format F = decltype(fmt)::value;
    at::parallel_for(0, p.total_new, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(p.cache.head_dim);
      std::vector<rope::CosSin> cs(std::max(1, p.n_freq));
      for (int64_t row = begin; row < end; ++row)
        kc::append_token<T, F>(p, row, buf.data(), cs.data());
    });
  });
}

std::tuple<at::Tensor, at::Tensor> flash_attn_with_kvcache_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const std::optional<at::Tensor>& k_scale_cache, const std::optional<at::Tensor>& v_scale_cache,
    const std::optional<at::Tensor>& k_fp8_scale, const std::optional<at::Tensor>& v_fp8_scale,
    const at::Tensor& block_table, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& cu_seqlens_q, int64_t max_seqlen_q, double softmax_scale,
    bool causal, int64_t window_left, int64_t window_right, int64_t num_splits, bool validate) {
  constexpr const char* op = "flash_attn_with_kvcache";
  const KVCacheTensors cache{k_cache,     v_cache,     k_scale_cache, v_scale_cache,
                             k_fp8_scale, v_fp8_scale, block_table,   cache_seqlens};
  const auto shapes = flash_fwd_output_shapes(q, cu_seqlens_q.has_value(), op);
  auto out = at::empty(shapes.out, q.options());
  auto lse = at::empty(shapes.lse, q.options().dtype(at::kFloat));
  LONGCTX_CHECK_ARG(num_splits >= 0, op, "num_splits", "must be >= 0 (0 = automatic), got ",
                    num_splits);
  const int64_t splits = num_splits == 0 ? 1 : num_splits;  // automatic: 1 on the CPU
  kvcache::AttnParams p =
      make_kvcache_attn_args(q, cache, cu_seqlens_q, max_seqlen_q, softmax_scale, causal,
                             window_left, window_right, splits, validate, out, lse, op);
  at::Tensor out_accum, lse_accum;
  if (p.num_splits > 1) {
    out_accum = at::empty({p.num_splits, p.total_q, p.heads, p.cache.head_dim},
                          q.options().dtype(at::kFloat));
    lse_accum = at::empty({p.num_splits, p.heads, p.total_q}, q.options().dtype(at::kFloat));
    p.out_accum = out_accum.data_ptr<float>();
    p.lse_accum = lse_accum.data_ptr<float>();
  }
  const int group = p.heads / p.cache.kv_heads;
  const int64_t m_tiles = (int64_t(p.seqlen_q) * group + kc::kBlockM - 1) / kc::kBlockM;
  const int64_t per_b = int64_t(p.cache.kv_heads) * m_tiles * p.num_splits;
  const int64_t total = int64_t(p.cache.batch) * per_b;
  dispatch_cpu_dtype_and_format(q.scalar_type(), p.cache.format, [&](auto* tag, auto fmt) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr kvcache::Format F = decltype(fmt)::value;
    if (total > 0) {
      at::parallel_for(0, total, 1, [&](int64_t begin, int64_t end) {
        flash::cpu::Workspace<float> ws(p.cache.head_dim);
        for (int64_t t = begin; t < end; ++t) {
          const int b = static_cast<int>(t / per_b);
          int64_t r = t % per_b;
          const int split = static_cast<int>(r % p.num_splits);
          r /= p.num_splits;
          const int m = static_cast<int>(r % m_tiles);
          const int hk = static_cast<int>(r / m_tiles);
          kc::attn_task<T, F>(p, b, hk, m, split, ws);
        }
      });
    }
    if (p.num_splits > 1 && p.cache.batch > 0) {
      at::parallel_for(0, int64_t(p.cache.batch) * p.heads, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> w(p.num_splits);
        for (int64_t t = begin; t < end; ++t)
          kc::merge_splits_task<T>(p, static_cast<int>(t / p.heads),
                                   static_cast<int>(t % p.heads), w.data());
      });
    }
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(longctx, CPU, m) {
  m.impl("kvcache_append", &kvcache_append_cpu);
  m.impl("flash_attn_with_kvcache", &flash_attn_with_kvcache_cpu);
}

// One family, "kvcache" (the name longctx info plans for): append and attention.
LONGCTX_REGISTER_KERNEL("kvcache", "cpu", "fp32,bf16,fp16",
                        "append,attention,cache_bf16,cache_fp16,cache_fp32,cache_int8,"
                        "cache_fp8_e4m3,rope,hdim<=256,causal,window,gqa,varlen,split_kv,"
                        "any_block_size");

}  // namespace longctx
