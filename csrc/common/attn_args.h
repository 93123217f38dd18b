// Argument checking for the flash-attention ops, shared by the CPU twin and the CUDA launchers:
// validates user tensors (dtype, shape, device, strides, heads, cu_seqlens, window) with errors
// that name the argument, normalizes the mask (causal => window_right = 0), and describes the
// launch as a framework-free flash::FwdParams.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include "longctx/flash/flash_params.h"

namespace longctx {

struct FlashFwdArgs {
  flash::FwdParams params;
  bool varlen = false;
};

// Checks q/k/v/cu_seqlens and the mask; out and lse must already be allocated with the shapes
// flash_fwd_output_shapes gives. op names the op in error messages.
FlashFwdArgs make_flash_fwd_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& cu_seqlens_q,
                                 const std::optional<at::Tensor>& cu_seqlens_k,
                                 int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                                 bool causal, int64_t window_left, int64_t window_right,
                                 const at::Tensor& out, const at::Tensor& lse, const char* op);

}  // namespace longctx
