// What the CUDA runners of both flash ops (flash_fwd_cuda.cu, flash_bwd_cuda.cu) share before
// launching: a 16-bit dtype and a Hopper GPU as the current device, and the lookup of the
// compiled (head_dim, dtype) instantiation.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include "common/dispatch.h"
#include "flash/flash_op.h"
#include "generated/build_config.h"
#include "longctx/registry.h"

namespace longctx {

// what: the tensors the dtype belongs to, for the message.
inline void check_flash_cuda(at::ScalarType dtype, const char* op, const char* what) {
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "longctx.", op,
              ": the CUDA kernel takes bfloat16 or float16 ", what, ", got ", dtype);
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major == 9, "longctx.", op, ": the CUDA kernel needs a Hopper GPU (sm_90), ",
              "this is sm_", prop->major, prop->minor, " (", prop->name, ")");
}

// Table's function for (head_dim, dtype), or an error that names the build's switches; hint: how
// to rebuild with it.
template <typename Table>
auto find_flash_kernel(int head_dim, at::ScalarType dtype, const char* op, const char* hint) {
  const DType dt = registry_dtype(dtype);
  const auto fn = Table::find(head_dim, dt);
  TORCH_CHECK(fn != nullptr, "longctx.", op, ": head_dim ", head_dim, " ", dtype_name(dt),
              " not compiled in this build (", LONGCTX_BUILD_SWITCHES, "; ", hint, ")");
  return fn;
}

// The forward's CUDA runner (flash_fwd_cuda.cu): the library's other CUDA ops (the KV cache's
// chunked prefill) call it through flash_attn_fwd_op<&run_fwd_cuda> (flash_op.h).
void run_fwd_cuda(const FlashFwdCall& c);

}  // namespace longctx
