// Argument checking for the RoPE ops, shared by the CPU and CUDA implementations: validates the
// tensors a user passed and describes them as a framework-free rope::Params.
#pragma once
#include <ATen/ATen.h>
#include "longctx/rope/rope_params.h"

namespace longctx {

// q_out/k_out are q/k themselves for an in-place call, or tensors of the same shape.
rope::Params make_rope_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_out,
                              const at::Tensor& k_out, const at::Tensor& positions,
                              const at::Tensor& inv_freq, double attention_factor,
                              bool interleaved, bool inverse, const char* op);

// With max_position >= 0, every position must lie in [0, max_position) (one reduction and a
// device sync); -1 skips the check; anything below -1 is an error.
void check_positions_in_range(const at::Tensor& positions, int64_t max_position, const char* op);

// What differs between devices: run the rotation described by p on tensors of dtype.
using RopeRunner = void (*)(const rope::Params& p, at::ScalarType dtype, const at::Tensor& q);

// The two ops, written once: check, describe, run. apply_rope_ rotates q and k in place;
// apply_rope returns rotated copies (channels past rotary_dim copied through).
void apply_rope_inplace(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                        const at::Tensor& inv_freq, double attention_factor, bool interleaved,
                        bool inverse, int64_t max_position, RopeRunner run);
std::tuple<at::Tensor, at::Tensor> apply_rope_out_of_place(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
    const at::Tensor& inv_freq, double attention_factor, bool interleaved, bool inverse,
    int64_t max_position, RopeRunner run);

}  // namespace longctx
