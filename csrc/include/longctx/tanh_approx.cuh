// tanh on the SFU (tanh.approx.f32, sm_75+; max relative error about 2^-11): the logit softcap
// of the CUDA attention kernels (logit_mods.h). tanh(+-inf) = +-1, NaN stays NaN.
#pragma once

namespace longctx {

__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace longctx
