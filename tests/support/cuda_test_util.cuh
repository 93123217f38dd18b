// Helpers shared by the standalone CUDA tests and microbenchmarks (tests/<family>/*.cu,
// bench/cpp): abort on a CUDA error with its location, skip (exit 77, ctest's skip code) without
// the GPU a test needs, convert between float and the raw bits of bf16/fp16 on the host (round
// to nearest even, as the kernels' conversions do), and spread a host reference loop over all
// cores.
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <atomic>
#include <functional>
#include <thread>
#include <vector>

#define CK(x)                                                                                  \
  do {                                                                                         \
    cudaError_t e_ = (x);                                                                      \
    if (e_ != cudaSuccess) {                                                                   \
      fprintf(stderr, "CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      exit(2);                                                                                 \
    }                                                                                          \
  } while (0)

// Exits 77 unless a GPU of compute capability major `major` (0: any) is present.
[[maybe_unused]] static void skip_without_gpu(int major = 0) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    printf("SKIP: no CUDA GPU\n");
    exit(77);
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  if (major != 0 && prop.major != major) {
    printf("SKIP: needs compute capability %d.x, this is %d.%d\n", major, prop.major, prop.minor);
    exit(77);
  }
}

[[maybe_unused]] static float bits_to_float(uint16_t h, bool bf16) {
  if (bf16) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  }
  return __half2float(__ushort_as_half(h));
}

[[maybe_unused]] static uint16_t float_to_bits(float f, bool bf16) {
  if (bf16) return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  return __half_as_ushort(__float2half_rn(f));
}

// f rounded to bf16 or fp16 and back.
[[maybe_unused]] static float round16(float f, bool bf16) {
  return bits_to_float(float_to_bits(f, bf16), bf16);
}

// fn(0) .. fn(n - 1) on all hardware threads, each index once.
[[maybe_unused]] static void parallel_for(int n, const std::function<void(int)>& fn) {
  int nt = std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::thread> ts;
  std::atomic<int> next{0};
  for (int t = 0; t < nt; ++t)
    ts.emplace_back([&] { for (int i; (i = next++) < n;) fn(i); });
  for (auto& t : ts) t.join();
}
