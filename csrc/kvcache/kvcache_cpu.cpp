// CPU implementation of longctx::kvcache_append and longctx::flash_attn_with_kvcache: the ops of
// kvcache_op.h (argument checks, outputs) with a CPU policy that splits the task functions of
// kvcache/kvcache_cpu.h over threads with at::parallel_for.
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
#include "common/dispatch.h"
#include "kvcache/kvcache_op.h"
#include "longctx/kvcache/kvcache_cpu.h"

namespace longctx {
namespace {

namespace kc = kvcache::cpu;

struct Cpu {
  static void append(const kvcache::AppendParams& p, const at::Tensor& k) {
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

  // Every CPU path masks keys on invalid pages: validate=False needs no host checks.
  static bool needs_host_checks(const at::Tensor&, const at::Tensor&, int64_t) { return false; }

  // The CPU takes everything the shared checks accept.
  static void check(const kvcache::AttnParams&, const at::Tensor&, const KVCacheTensors&) {}

  static void attend(const KVCacheAttnCall& c) {
    kvcache::AttnParams& p = c.params;  // num_splits: the caller's, automatic (0) = 1
    at::Tensor out_accum, lse_accum;
    if (p.num_splits > 1) {
      out_accum = at::empty({p.num_splits, p.total_q, p.heads, p.cache.head_dim},
                            c.q.options().dtype(at::kFloat));
      lse_accum = at::empty({p.num_splits, p.heads, p.total_q}, c.q.options().dtype(at::kFloat));
      p.out_accum = out_accum.data_ptr<float>();
      p.lse_accum = lse_accum.data_ptr<float>();
    }
    const int group = p.heads / p.cache.kv_heads;
    const int64_t m_tiles = (int64_t(p.seqlen_q) * group + kc::kBlockM - 1) / kc::kBlockM;
    const int64_t per_b = int64_t(p.cache.kv_heads) * m_tiles * p.num_splits;
    const int64_t total = int64_t(p.cache.batch) * per_b;
    dispatch_cpu_dtype_and_format(c.q.scalar_type(), p.cache.format, [&](auto* tag, auto fmt) {
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
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(longctx, CPU, m) {
  m.impl("kvcache_append", &kvcache_append_op<Cpu>);
  m.impl("flash_attn_with_kvcache", &flash_attn_with_kvcache_op<Cpu>);
  m.impl("flash_attn_with_kvcache_check", &flash_attn_with_kvcache_check_op<Cpu>);
}

// One family, "kvcache" (the name longctx info plans for): append and attention.
LONGCTX_REGISTER_KERNEL("kvcache", "cpu", "fp32,bf16,fp16",
                        "append,attention,cache_bf16,cache_fp16,cache_fp32,cache_int8,"
                        "cache_fp8_e4m3,rope,hdim<=256,causal,window,gqa,varlen,split_kv,"
                        "any_block_size,softcap,sinks");

}  // namespace longctx
