// The one runtime-to-compile-time dispatch of element dtype and KV-cache format, for the CPU twins
// and the CUDA launchers.
//   dispatch_format(format, f)            f(std::integral_constant<kvcache::Format, F>{})
//   dispatch_cpu_dtype(dtype, f)          f(T*) with T in double, float, c10::BFloat16, c10::Half
//   dispatch_cuda_dtype(dtype, op, f)     f(T*) with T in __nv_bfloat16, __half (CUDA sources only)
//   dispatch_{cpu,cuda}_dtype_and_format  both: f(T*, std::integral_constant<Format, F>{})
// (op names the op in the CUDA error for a dtype the kernels do not take; the argument checks
// reject such dtypes first.)
// The T* argument is a null pointer that carries the type.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <type_traits>
#include "longctx/kvcache/kvcache_params.h"
#include "longctx/registry.h"
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace longctx {

template <typename Fn>
decltype(auto) dispatch_format(kvcache::Format format, Fn&& f) {
  using kvcache::Format;
  switch (format) {
    case Format::kInt8: return f(std::integral_constant<Format, Format::kInt8>{});
    case Format::kFp8E4M3: return f(std::integral_constant<Format, Format::kFp8E4M3>{});
    default: return f(std::integral_constant<Format, Format::kNative>{});
  }
}

template <typename Fn>
void dispatch_cpu_dtype(at::ScalarType dtype, Fn&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "longctx_cpu",
                                  [&] { f(static_cast<scalar_t*>(nullptr)); });
}

template <typename Fn>
void dispatch_cpu_dtype_and_format(at::ScalarType dtype, kvcache::Format format, Fn&& f) {
  dispatch_cpu_dtype(dtype, [&](auto* tag) {
    dispatch_format(format, [&](auto fmt) { f(tag, fmt); });
  });
}

// The registry key of a 16-bit dtype (registry.h); call only for bf16 / fp16.
inline DType registry_dtype(at::ScalarType dtype) {
  return dtype == at::kBFloat16 ? DType::kBF16 : DType::kFP16;
}

#if defined(__CUDACC__)
template <typename Fn>
void dispatch_cuda_dtype(at::ScalarType dtype, const char* op, Fn&& f) {
  if (dtype == at::kBFloat16) {
    f(static_cast<__nv_bfloat16*>(nullptr));
  } else {
    TORCH_CHECK(dtype == at::kHalf, "longctx.", op, ": unsupported dtype ", dtype);
    f(static_cast<__half*>(nullptr));
  }
}

template <typename Fn>
void dispatch_cuda_dtype_and_format(at::ScalarType dtype, kvcache::Format format, const char* op,
                                    Fn&& f) {
  dispatch_cuda_dtype(dtype, op, [&](auto* tag) {
    dispatch_format(format, [&](auto fmt) { f(tag, fmt); });
  });
}
#endif

}  // namespace longctx
