// Argument checking for the flash-attention ops, shared by the CPU twin and the CUDA launchers:
// validates user tensors (dtype, shape, device, strides, heads, cu_seqlens, window) with errors
// that name the argument, normalizes the mask (causal => window_right = 0), and describes the
// launch as a framework-free flash::FwdParams (forward) or flash::BwdParams (backward).
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <vector>
#include "longctx/flash/flash_params.h"

namespace longctx {

struct FlashFwdArgs {
  flash::FwdParams params;
  bool varlen = false;
  at::ScalarType dtype = at::kBFloat16;  // of q/k/v/out (params.is_bf16 says only bf16 vs fp16)
};

struct FlashBwdArgs {
  flash::BwdParams params;
  bool varlen = false;
  at::ScalarType dtype = at::kBFloat16;
};

// The shapes of out and lse for q (and whether the call is varlen). Checks only what it needs to
// compute them (q's rank); make_flash_fwd_args checks the rest.
struct FlashFwdOutputShapes {
  std::vector<int64_t> out;  // q's shape
  std::vector<int64_t> lse;  // batched (batch, heads, seqlen_q); varlen (heads, total_q)
};
FlashFwdOutputShapes flash_fwd_output_shapes(const at::Tensor& q, bool varlen, const char* op);

// Checks q/k/v/cu_seqlens, the mask, sinks and softcap (common/logit_mods.h); out and lse must
// already be allocated with the shapes flash_fwd_output_shapes gives. op names the op in error
// messages.
FlashFwdArgs make_flash_fwd_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& cu_seqlens_q,
                                 const std::optional<at::Tensor>& cu_seqlens_k,
                                 int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                                 bool causal, int64_t window_left, int64_t window_right,
                                 const std::optional<at::Tensor>& sinks, double softcap,
                                 const at::Tensor& out, const at::Tensor& lse, const char* op);

// Backward: checks everything make_flash_fwd_args checks on q/k/v/out/lse/cu_seqlens/mask, plus
// dout (q's shape, dtype, device), dq/dk/dv (allocated with the shapes of q/k/v) and
// dsoftmax_sum (fp32 scratch with lse's shape, rows contiguous).
FlashBwdArgs make_flash_bwd_args(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                 const std::optional<at::Tensor>& cu_seqlens_q,
                                 const std::optional<at::Tensor>& cu_seqlens_k,
                                 int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                                 bool causal, int64_t window_left, int64_t window_right,
                                 const std::optional<at::Tensor>& sinks, double softcap,
                                 bool deterministic, const at::Tensor& dq, const at::Tensor& dk,
                                 const at::Tensor& dv, const at::Tensor& dsoftmax_sum,
                                 const char* op);

// Validates the contents of cu_seqlens (arg names it): starts at 0, non-decreasing, ends at
// total_rows, and every sequence length is <= max_seqlen. Reads the values on the host: for a
// CUDA tensor that is a device-to-host copy and a stream sync, which launchers accept as the
// price of turning a would-be out-of-bounds read into an error.
void check_cu_seqlens_values(const at::Tensor& cu_seqlens, int64_t total_rows, int64_t max_seqlen,
                             const char* op, const char* arg);

}  // namespace longctx
