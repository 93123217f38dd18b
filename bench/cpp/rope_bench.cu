// Standalone microbenchmark of the RoPE kernel without Python: 32K tokens, 32 q heads and 8 kv
// heads of 128, bf16, in place, vs a device-to-device copy of the same bytes. Prints GB/s
// (bytes read + written) and the fraction of the copy bandwidth.
#include <cuda_bf16.h>
#include <algorithm>
#include <cstdio>
#include <vector>
#include "longctx/rope/rope_kernel.cuh"

#define CHECK_CUDA(x)                                                                     \
  do {                                                                                    \
    cudaError_t e = (x);                                                                  \
    if (e != cudaSuccess) {                                                               \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__); \
      return 1;                                                                           \
    }                                                                                     \
  } while (0)

template <typename F>
float median_ms(F&& f, int reps = 50) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (int i = 0; i < 5; ++i) f(i);
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(a);
    f(i);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main() {
  const int64_t T = 32768;
  const int H = 32, HK = 8, D = 128;
  const int64_t nq = T * H * D, nk = T * HK * D;
  __nv_bfloat16 *q[2], *k[2];
  int64_t* pos;
  float* inv;
  for (int s = 0; s < 2; ++s) {  // two input sets, past L2
    CHECK_CUDA(cudaMalloc(&q[s], nq * 2));
    CHECK_CUDA(cudaMalloc(&k[s], nk * 2));
    CHECK_CUDA(cudaMemset(q[s], 0x3c, nq * 2));  // finite non-zero bf16 values
    CHECK_CUDA(cudaMemset(k[s], 0x3c, nk * 2));
  }
  void *copy_src, *copy_dst;  // the copy peer moves the same bytes as one RoPE call
  CHECK_CUDA(cudaMalloc(&copy_src, (nq + nk) * 2));
  CHECK_CUDA(cudaMalloc(&copy_dst, (nq + nk) * 2));
  CHECK_CUDA(cudaMemset(copy_src, 1, (nq + nk) * 2));
  CHECK_CUDA(cudaMalloc(&pos, T * 8));
  CHECK_CUDA(cudaMalloc(&inv, D / 2 * 4));
  std::vector<int64_t> hp(T);
  for (int64_t i = 0; i < T; ++i) hp[i] = (i * 7919) % (1 << 20);
  std::vector<float> hi(D / 2);
  for (int i = 0; i < D / 2; ++i) hi[i] = powf(500000.f, -2.f * i / D);
  CHECK_CUDA(cudaMemcpy(pos, hp.data(), T * 8, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(inv, hi.data(), D / 2 * 4, cudaMemcpyHostToDevice));

  auto params = [&](int s) {
    longctx::rope::Params p;
    p.q.in = p.q.out = q[s];
    p.k.in = p.k.out = k[s];
    p.q.heads = H;
    p.k.heads = HK;
    p.q.in_stride_s = p.q.out_stride_s = H * D;
    p.k.in_stride_s = p.k.out_stride_s = HK * D;
    p.q.in_stride_h = p.q.out_stride_h = p.k.in_stride_h = p.k.out_stride_h = D;
    p.positions = pos;
    p.pos_stride_s = 1;
    p.inv_freq = inv;
    p.n_freq = D / 2;
    p.head_dim = D;
    p.batch = 1;
    p.seqlen = T;
    return p;
  };
  const double bytes = 2.0 * (nq + nk) * 2;  // read + write
  for (bool il : {false, true}) {
    float ms = median_ms([&](int i) {
      auto p = params(i % 2);
      p.interleaved = il;
      longctx::rope::launch_rope<__nv_bfloat16>(p, 0);
    });
    CHECK_CUDA(cudaGetLastError());
    float copy = median_ms([&](int) {
      cudaMemcpyAsync(copy_dst, copy_src, (nq + nk) * 2, cudaMemcpyDeviceToDevice);
    });
    CHECK_CUDA(cudaGetLastError());
    std::printf("rope bf16 %s: %.4f ms, %.0f GB/s; copy of the same bytes %.4f ms, %.0f GB/s; "
                "%.1f%% of copy\n", il ? "interleaved" : "neox", ms, bytes / ms / 1e6, copy,
                bytes / copy / 1e6, 100.0 * copy / ms);
  }
  return 0;
}
