// What the CUDA runners of both flash ops (flash_fwd_cuda.cu, flash_bwd_cuda.cu) check before
// looking up their kernel: a 16-bit dtype and a Hopper GPU as the current device.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

namespace longctx {

// what: the tensors the dtype belongs to, for the message.
inline void check_flash_cuda(at::ScalarType dtype, const char* op, const char* what) {
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "longctx.", op,
              ": the CUDA kernel takes bfloat16 or float16 ", what, ", got ", dtype);
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major == 9, "longctx.", op, ": the CUDA kernel needs a Hopper GPU (sm_90), ",
              "this is sm_", prop->major, prop->minor, " (", prop->name, ")");
}

}  // namespace longctx
