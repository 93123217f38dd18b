// The sinks and softcap arguments of the attention ops (flash_attn_fwd/bwd,
// flash_attn_with_kvcache): their checks, and the framework-free LogitMods they become
// (longctx/logit_mods.h states what they compute).
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include "longctx/logit_mods.h"

namespace longctx {

// sinks: fp32, shape (heads,), contiguous, on q's device; softcap: finite and >= 0 (0 = none).
LogitMods make_logit_mods(const std::optional<at::Tensor>& sinks, double softcap,
                          const at::Tensor& q, int64_t heads, const char* op);

// dsinks[h] = -sum over the rows i of head h of exp(sinks[h] - lse_i) * dsoftmax_sum_i, from the
// forward's lse and D = rowsum(dout * out) laid out alike: batched (batch, heads, seqlen_q),
// varlen (heads, total_q). Summed in float64, returned as fp32 (heads,).
at::Tensor sinks_grad(const at::Tensor& sinks, const at::Tensor& lse,
                      const at::Tensor& dsoftmax_sum, bool varlen);

}  // namespace longctx
