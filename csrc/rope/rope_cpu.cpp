// CPU implementation of longctx::apply_rope / apply_rope_: the host loop of rope_host.h split
// over tokens with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include "common/build_registry.h"
#include "rope/rope_args.h"
#include "longctx/rope/rope_host.h"

namespace longctx {
namespace {

void run_rope_cpu(const rope::Params& p, at::ScalarType dtype, const at::Tensor&) {
  const int64_t tokens = p.batch * p.seqlen;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max(1, (p.q.heads + p.k.heads) * p.head_dim));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "longctx_rope_cpu", [&] {
    at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
      rope::rope_tokens_host<scalar_t>(p, begin, end);
    });
  });
}

void apply_rope_inplace_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                            const at::Tensor& inv_freq, double attention_factor, bool interleaved,
                            bool inverse, int64_t max_position) {
  apply_rope_inplace(q, k, positions, inv_freq, attention_factor, interleaved, inverse,
                     max_position, &run_rope_cpu);
}

std::tuple<at::Tensor, at::Tensor> apply_rope_cpu(const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& positions,
                                                  const at::Tensor& inv_freq,
                                                  double attention_factor, bool interleaved,
                                                  bool inverse, int64_t max_position) {
  return apply_rope_out_of_place(q, k, positions, inv_freq, attention_factor, interleaved,
                                 inverse, max_position, &run_rope_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(longctx, CPU, m) {
  m.impl("apply_rope_", &apply_rope_inplace_cpu);
  m.impl("apply_rope", &apply_rope_cpu);
}

LONGCTX_REGISTER_KERNEL("rope", "cpu", "fp32,bf16,fp16", "neox,interleaved,partial,inverse");

}  // namespace longctx
