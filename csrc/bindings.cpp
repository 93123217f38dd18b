// The op schemas of longctx (one TORCH_LIBRARY block: every schema lives here) and the pybind11
// module longctx._C that carries the non-tensor helpers. The CPU and CUDA implementations register
// themselves per dispatch key beside their code (csrc/<family>/*_cpu.cpp, *_cuda.cu).
#include <torch/extension.h>
#include <torch/library.h>
#include "common/build_registry.h"
#include "common/nvtx.h"
#include "generated/build_config.h"
#if defined(LONGCTX_WITH_NCCL)
#include "comm/nccl_ring.h"
#endif

TORCH_LIBRARY(longctx, m) {
  // RoPE: rotates the first 2 * len(inv_freq) channels of every head of q and k by
  // positions * inv_freq (fp32), scaled by attention_factor; inverse rotates by the negated angle.
  m.def(
      "apply_rope_(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor inv_freq, "
      "float attention_factor, bool interleaved, bool inverse, int max_position) -> ()");
  m.def(
      "apply_rope(Tensor q, Tensor k, Tensor positions, Tensor inv_freq, "
      "float attention_factor, bool interleaved, bool inverse, int max_position) "
      "-> (Tensor, Tensor)");
  // Flash attention. Batched: q (b, sq, h, d), k/v (b, sk, hk, d), lse (b, h, sq).
  // Varlen (cu_seqlens given): q (total_q, h, d), k/v (total_k, hk, d), lse (h, total_q).
  // Causal is bottom-right aligned; window (left, right), -1 = unbounded. sinks: (heads,) fp32
  // logits joining the softmax denominator; softcap > 0: scores capped as softcap * tanh(s /
  // softcap) (longctx/logit_mods.h); the backward's dsinks is empty (0,) without sinks.
  // deterministic does not change the forward: the registered autograd formula hands it to
  // flash_attn_bwd (an op's autograd sees only the op's arguments, and wrapping the op in an
  // autograd.Function instead breaks torch.compile(fullgraph=True) for flash_attn(x, x, x)).
  m.def(
      "flash_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal, int window_left, "
      "int window_right, bool deterministic=False, Tensor? sinks=None, float softcap=0.0) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "float softmax_scale, bool causal, int window_left, int window_right, bool deterministic, "
      "Tensor? sinks=None, float softcap=0.0) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dsinks)");
  // Paged KV cache (layout and formats: csrc/include/longctx/kvcache/kvcache_params.h).
  // Pools k_cache/v_cache (num_blocks, block_size, kv_heads, head_dim): bf16/fp16 (fp32 on CPU),
  // int8 with k/v_scale_cache (num_blocks, block_size, kv_heads) fp32, or float8_e4m3fn with
  // k/v_fp8_scale (kv_heads,) fp32; dequantization is x = stored * scale. block_table int32
  // (batch, max_blocks), cache_seqlens int32 (batch,).
  // kvcache_append writes new tokens k/v (batch, seqlen_new, kv_heads, d), or packed
  // (total_new, kv_heads, d) with cu_new, at positions cache_seqlens[b] + i (cache_seqlens:
  // lengths before the append; not updated), quantizing on write; with inv_freq, K is rotated
  // (RoPE) at `positions` (default: its cache position) first. validate=True checks page ids and
  // lengths on the host; with False nothing is checked but nothing outside the pool is written.
  m.def(
      "kvcache_append(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor(c!)? k_scale_cache, Tensor(d!)? v_scale_cache, Tensor? k_fp8_scale, "
      "Tensor? v_fp8_scale, Tensor block_table, Tensor cache_seqlens, Tensor? cu_new, "
      "Tensor? positions, Tensor? inv_freq, float attention_factor=1.0, "
      "bool rope_interleaved=False, bool validate=True) -> ()");
  // Attention of q (batch, seqlen_q, heads, d), or packed (total_q, heads, d) with
  // cu_seqlens_q, over the first cache_seqlens[b] cached keys of each sequence (bottom-right
  // aligned causal / window masks, GQA, dequantization in the kernel). num_splits > 1 splits the
  // keys and merges by lse (0: automatic). lse: batched (batch, heads, seqlen_q), packed
  // (heads, total_q), fp32. sinks / softcap as in flash_attn_fwd.
  m.def(
      "flash_attn_with_kvcache(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? k_scale_cache, "
      "Tensor? v_scale_cache, Tensor? k_fp8_scale, Tensor? v_fp8_scale, Tensor block_table, "
      "Tensor cache_seqlens, Tensor? cu_seqlens_q, int max_seqlen_q, float softmax_scale, "
      "bool causal, int window_left, int window_right, int num_splits=0, bool validate=True, "
      "Tensor? sinks=None, float softcap=0.0) -> (Tensor out, Tensor lse)");
  // Every check of flash_attn_with_kvcache, nothing computed: the Python wrapper runs it before
  // it appends new tokens (a refused call writes nothing). new_tokens: appended first to each
  // sequence (cache_seqlens: the lengths before it); -1 with packed q: its query rows.
  m.def(
      "flash_attn_with_kvcache_check(Tensor q, Tensor k_cache, Tensor v_cache, "
      "Tensor? k_scale_cache, Tensor? v_scale_cache, Tensor? k_fp8_scale, Tensor? v_fp8_scale, "
      "Tensor block_table, Tensor cache_seqlens, Tensor? cu_seqlens_q, int max_seqlen_q, "
      "float softmax_scale, bool causal, int window_left, int window_right, int num_splits=0, "
      "bool validate=True, Tensor? sinks=None, float softcap=0.0, int new_tokens=0) "
      "-> ()");
}

namespace {

pybind11::dict build_config() {
  pybind11::dict d;
  d["torch_version"] = LONGCTX_BUILD_TORCH_VERSION;
  d["cuda_version"] = LONGCTX_BUILD_CUDA_VERSION;
  d["cuda_archs"] = LONGCTX_BUILD_CUDA_ARCHS;
  d["switches"] = LONGCTX_BUILD_SWITCHES;
#if defined(LONGCTX_WITH_CUDA)
  d["with_cuda"] = true;
#else
  d["with_cuda"] = false;
#endif
#if defined(LONGCTX_WITH_NCCL)
  d["with_nccl"] = true;
#else
  d["with_nccl"] = false;
#endif
  pybind11::list kernels;
  for (const auto& e : longctx::kernel_registry()) {
    pybind11::dict k;
    k["family"] = e.family;
    k["device"] = e.device;
    k["dtypes"] = e.dtypes;
    k["features"] = e.features;
    kernels.append(k);
  }
  d["kernels"] = kernels;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "longctx native extension: ops live under torch.ops.longctx; helpers here.";
  m.def("build_config", &build_config,
        "What this binary was built against and which kernels it contains.");
  m.def("nvtx_push", &longctx::nvtx_push,
        "Open an NVTX range in the 'longctx' domain (no-op in CPU-only builds).");
  m.def("nvtx_pop", &longctx::nvtx_pop, "Close the innermost 'longctx' NVTX range.");
#if defined(LONGCTX_WITH_NCCL)
  longctx::comm::register_nccl_ring(m);  // ring attention's NCCL exchange
#endif
}
