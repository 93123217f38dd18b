// CPU implementation of longctx::flash_attn_fwd / flash_attn_bwd: the ops of flash_op.h with CPU
// runners, which split the task functions of flash_cpu.h over threads with at::parallel_for.
//
// Forward: one task per (batch, head, query tile of 64 rows); each task owns its out rows and
// lse entries, so there is no write sharing.
//
// Backward, three passes:
//   1. (batch, head, query tile): D = rowsum(dout * out) into an fp32 buffer shaped like lse.
//   2. (batch, kv head, KV tile): dK, dV of that tile, summed over the query heads of the group
//      and over every query tile that sees it: the task is their single writer.
//   3. (batch, head, query tile): dQ, recomputing P and dS over the visible KV tiles.
// Why a second pass for dQ instead of per-task fp32 dQ buffers reduced afterwards: in pass 2 every
// task touches the dQ rows of all query tiles that see its keys, so private buffers would cost
// (tasks x seqlen_q x group x head_dim) memory or a reduction with as many partial sums as KV
// tiles; the second pass costs two recomputed tile products (S and dP) per tile pair instead
// (7 tile GEMMs in all instead of 5), needs no extra memory, gives dQ a single writer, and keeps
// every sum in a fixed order: the result is bitwise identical for any thread count, which is
// why `deterministic` needs no special handling here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <tuple>
#include "common/build_registry.h"
#include "common/checks.h"
#include "common/dispatch.h"
#include "flash/flash_op.h"
#include "longctx/flash/flash_cpu.h"

namespace longctx {
namespace {

namespace fc = flash::cpu;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

int64_t num_tiles(int64_t n, int64_t block) { return (n + block - 1) / block; }

// Runs fn(b, h, tile, workspace) over batch x heads x tiles.
template <typename Acc, typename Fn>
void parallel_tiles(int64_t batch, int64_t heads, int64_t tiles, int head_dim, Fn&& fn) {
  const int64_t total = batch * heads * tiles;
  if (total == 0) return;
  at::parallel_for(0, total, 1, [&](int64_t begin, int64_t end) {
    fc::Workspace<Acc> ws(head_dim);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t tile = t % tiles;
      const int64_t bh = t / tiles;
      fn(static_cast<int>(bh / heads), static_cast<int>(bh % heads), static_cast<int>(tile), ws);
    }
  });
}

void check_varlen_values(const flash::FwdParams& p, bool varlen, const FlashInputs& in,
                         const char* op) {
  if (!varlen) return;
  check_cu_seqlens_values(*in.cu_seqlens_q, in.q.size(0), p.seqlen_q, op, "cu_seqlens_q");
  check_cu_seqlens_values(*in.cu_seqlens_k, in.k.size(0), p.seqlen_k, op, "cu_seqlens_k");
}

void run_fwd_cpu(const FlashFwdCall& c) {
  const flash::FwdParams& p = c.args.params;
  check_varlen_values(p, c.args.varlen, c.in, "flash_attn_fwd");
  dispatch_cpu_dtype(c.args.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using Acc = typename AccOf<T>::type;
    parallel_tiles<Acc>(p.batch, p.heads, num_tiles(p.seqlen_q, fc::kBlockM), p.head_dim,
                        [&](int b, int h, int m, fc::Workspace<Acc>& ws) {
                          fc::fwd_task<T, Acc>(p, b, h, m, ws);
                        });
  });
}

void run_bwd_cpu(const FlashBwdCall& c) {
  const flash::BwdParams& bp = c.args.params;
  const flash::FwdParams& p = bp.fwd;
  check_varlen_values(p, c.args.varlen, c.in, "flash_attn_bwd");
  const int64_t m_tiles = num_tiles(p.seqlen_q, fc::kBlockM);
  const int64_t n_tiles = num_tiles(p.seqlen_k, fc::kBlockN);
  dispatch_cpu_dtype(c.args.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using Acc = typename AccOf<T>::type;
    parallel_tiles<Acc>(p.batch, p.heads, m_tiles, p.head_dim,
                        [&](int b, int h, int m, fc::Workspace<Acc>&) {
                          fc::bwd_dot_task<T, Acc>(bp, b, h, m);
                        });
    const int64_t dacc_size = 2 * int64_t(fc::kBlockN) * p.head_dim;
    at::parallel_for(0, int64_t(p.batch) * p.heads_kv * n_tiles, 1,
                     [&](int64_t begin, int64_t end) {
                       fc::Workspace<Acc> ws(p.head_dim);
                       std::vector<Acc> dacc(dacc_size);
                       for (int64_t t = begin; t < end; ++t) {
                         const int64_t n = t % n_tiles, bh = t / n_tiles;
                         fc::bwd_dkdv_task<T, Acc>(bp, static_cast<int>(bh / p.heads_kv),
                                                   static_cast<int>(bh % p.heads_kv),
                                                   static_cast<int>(n), ws, dacc.data());
                       }
                     });
    parallel_tiles<Acc>(p.batch, p.heads, m_tiles, p.head_dim,
                        [&](int b, int h, int m, fc::Workspace<Acc>& ws) {
                          fc::bwd_dq_task<T, Acc>(bp, b, h, m, ws);
                        });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(longctx, CPU, m) {
  m.impl("flash_attn_fwd", &flash_attn_fwd_op<&run_fwd_cpu>);
  m.impl("flash_attn_bwd", &flash_attn_bwd_op<&run_bwd_cpu>);
}

LONGCTX_REGISTER_KERNEL("flash_fwd", "cpu", "fp64,fp32,bf16,fp16",
                        "hdim<=256,causal,window,gqa,varlen,softcap,sinks");
LONGCTX_REGISTER_KERNEL("flash_bwd", "cpu", "fp64,fp32,bf16,fp16",
                        "hdim<=256,causal,window,gqa,varlen,deterministic,softcap,sinks");

}  // namespace longctx
