// The two flash-attention ops, written once for both devices: the argument checks and the
// outputs here, the device's work in a runner (flash_cpu.cpp, flash_fwd_cuda.cu,
// flash_bwd_cuda.cu). Each device registers flash_attn_fwd_op<its runner> and
// flash_attn_bwd_op<its runner> under the schemas of csrc/bindings.cpp.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <tuple>
#include "common/checks.h"
#include "common/logit_mods.h"
#include "common/nvtx.h"
#include "flash/flash_args.h"

namespace longctx {

// The inputs a runner may need beyond the params: q and k (the packed row counts), the
// cu_seqlens (their values) and the sinks (the lse of rows without keys).
struct FlashInputs {
  const at::Tensor& q;
  const at::Tensor& k;
  const std::optional<at::Tensor>& cu_seqlens_q;
  const std::optional<at::Tensor>& cu_seqlens_k;
  const std::optional<at::Tensor>& sinks;
};

// What a runner gets: the checked arguments, the inputs and the allocated outputs. The backward's
// runner also fills dsoftmax_sum (D = rowsum(dout * out), fp32, laid out like lse).
struct FlashFwdCall {
  const FlashFwdArgs& args;
  FlashInputs in;
  at::Tensor &out, &lse;
};
struct FlashBwdCall {
  const FlashBwdArgs& args;
  FlashInputs in;
  at::Tensor &dq, &dk, &dv;
};

using FlashFwdRunner = void (*)(const FlashFwdCall&);
using FlashBwdRunner = void (*)(const FlashBwdCall&);

// deterministic does not change the forward (bindings.cpp says why the schema carries it).
template <FlashFwdRunner run>
std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_op(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal,
    int64_t window_left, int64_t window_right, bool /*deterministic*/,
    const std::optional<at::Tensor>& sinks, double softcap) {
  constexpr const char* op = "flash_attn_fwd";
  NvtxRange range("longctx::flash_attn_fwd");
  const auto shapes = flash_fwd_output_shapes(q, cu_seqlens_q.has_value(), op);
  auto out = at::empty(shapes.out, q.options());
  auto lse = at::empty(shapes.lse, q.options().dtype(at::kFloat));
  const FlashFwdArgs a = make_flash_fwd_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                             max_seqlen_k, softmax_scale, causal, window_left,
                                             window_right, sinks, softcap, out, lse, op);
  run(FlashFwdCall{a, {q, k, cu_seqlens_q, cu_seqlens_k, sinks}, out, lse});
  return {out, lse};
}

// Returns (dq, dk, dv, dsinks); dsinks is (heads,) fp32 with sinks and empty (0,) without.
template <FlashBwdRunner run>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_op(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double softmax_scale, bool causal, int64_t window_left, int64_t window_right,
    bool deterministic, const std::optional<at::Tensor>& sinks, double softcap) {
  constexpr const char* op = "flash_attn_bwd";
  NvtxRange range("longctx::flash_attn_bwd");
  // Shapes are checked by make_flash_bwd_args; allocate only once q/k/v have a sane rank.
  flash_fwd_output_shapes(q, cu_seqlens_q.has_value(), op);
  check_dim(k, op, "k", {q.dim()});
  check_dim(v, op, "v", {q.dim()});
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  auto dsum = at::empty(lse.sizes(), q.options().dtype(at::kFloat));
  const FlashBwdArgs a = make_flash_bwd_args(
      dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      softmax_scale, causal, window_left, window_right, sinks, softcap, deterministic, dq, dk,
      dv, dsum, op);
  run(FlashBwdCall{a, {q, k, cu_seqlens_q, cu_seqlens_k, sinks}, dq, dk, dv});
  // The sinks' gradient needs only lse and D = rowsum(dout * out), which the runner left in dsum.
  at::Tensor dsinks = sinks.has_value() ? sinks_grad(*sinks, lse, dsum, a.varlen)
                                        : at::empty({0}, q.options().dtype(at::kFloat));
  return {dq, dk, dv, dsinks};
}

}  // namespace longctx
