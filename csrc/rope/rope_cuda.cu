// CUDA launcher of longctx::apply_rope / apply_rope_: checks arguments, launches rope_kernel.cuh
// on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include "common/build_registry.h"
#include "common/nvtx.h"
#include "rope/rope_args.h"
#include "longctx/rope/rope_kernel.cuh"

namespace longctx {
namespace {

void run_rope_cuda(const rope::Params& p, at::ScalarType dtype, const at::Tensor& q) {
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  switch (dtype) {
    case at::kBFloat16: err = rope::launch_rope<__nv_bfloat16>(p, stream); break;
    case at::kHalf: err = rope::launch_rope<__half>(p, stream); break;
    case at::kFloat: err = rope::launch_rope<float>(p, stream); break;
    default: TORCH_CHECK(false, "longctx.apply_rope: unsupported dtype ", dtype);
  }
  TORCH_CHECK(err == cudaSuccess, "longctx.apply_rope: kernel launch failed: ",
              cudaGetErrorString(err));
}

void apply_rope_inplace_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                             const at::Tensor& inv_freq, double attention_factor, bool interleaved,
                             bool inverse, int64_t max_position) {
  NvtxRange range("longctx::apply_rope_");
  apply_rope_inplace(q, k, positions, inv_freq, attention_factor, interleaved, inverse,
                     max_position, &run_rope_cuda);
}

std::tuple<at::Tensor, at::Tensor> apply_rope_cuda(const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& positions,
                                                   const at::Tensor& inv_freq,
                                                   double attention_factor, bool interleaved,
                                                   bool inverse, int64_t max_position) {
  NvtxRange range("longctx::apply_rope");
  return apply_rope_out_of_place(q, k, positions, inv_freq, attention_factor, interleaved,
                                 inverse, max_position, &run_rope_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(longctx, CUDA, m) {
  m.impl("apply_rope_", &apply_rope_inplace_cuda);
  m.impl("apply_rope", &apply_rope_cuda);
}

LONGCTX_REGISTER_KERNEL("rope", "cuda", "fp32,bf16,fp16", "neox,interleaved,partial,inverse");

}  // namespace longctx
