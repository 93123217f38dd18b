// Standalone timing of the Hopper flash-attention forward kernel (no torch).
//
// Random bf16/fp16 inputs (batch*seqlen = 32K tokens, heads*hdim = 2048, the grid of
// bench/attn_fwd.py), CUDA-event timing after warm-up, median of N runs, TFLOP/s with the
// convention of docs/design.md: fwd FLOPs = 4 * b * h * pairs * d (pairs = visible (query, key)
// pairs; causal s(s+1)/2). Usage: flash_fwd_bench [reps]. Prints one line per case and schedule:
// "dynamic" (the default: persistent grid, atomic tile counter) and "static" (persistent,
// round-robin, the launch without a tile counter). Built by CMake.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
#include "longctx/flash/flash_fwd_dispatch.cuh"
#include "../../tests/support/cuda_test_util.cuh"

__global__ void fill_random(uint16_t* x, size_t n, uint32_t seed, bool bf16) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    const float f = (float(h & 0xFFFFFF) / float(0x1000000) - 0.5f) * 3.4f;  // ~unit variance
    x[i] = bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(f)) : __half_as_ushort(__float2half_rn(f));
  }
}

struct BenchCase { int d; bool bf16; int seqlen; bool causal; int wl; };

int main(int argc, char** argv) {
  skip_without_gpu(9);
  const int reps = argc > 1 ? atoi(argv[1]) : 20;
  int* counter = nullptr;
  CK(cudaMalloc(&counter, sizeof(int)));
  std::vector<BenchCase> cases = {
      {128, true, 16384, false, -1}, {128, true, 16384, true, -1},
      {128, true, 1024, false, -1},  {128, true, 1024, true, -1},
      {128, true, 4096, true, -1},   {128, false, 16384, true, -1},
      {128, true, 16384, true, 4096},
      {64, true, 16384, false, -1},  {64, true, 16384, true, -1},
      {256, true, 16384, false, -1}, {256, true, 16384, true, -1},
  };
  printf("%-5s %-5s %-7s %-7s %-6s %-10s %10s %9s\n", "hdim", "dtype", "seqlen", "causal", "window", "grid", "ms", "TFLOP/s");
  for (const auto& c : cases)
  for (const char* grid : {"dynamic", "static"}) {
    int* tile_counter = std::strcmp(grid, "dynamic") == 0 ? counter : nullptr;
    auto fn = longctx::flash::FlashFwdTable::find(
        c.d, c.bf16 ? longctx::DType::kBF16 : longctx::DType::kFP16);
    if (!fn) { printf("%d %s not compiled\n", c.d, c.bf16 ? "bf16" : "fp16"); continue; }
    const int b = 32768 / c.seqlen, h = 2048 / c.d, s = c.seqlen, d = c.d;
    const size_t n = size_t(b) * s * h * d;
    uint16_t *q, *k, *v, *o; float* lse;
    CK(cudaMalloc(&q, n * 2)); CK(cudaMalloc(&k, n * 2)); CK(cudaMalloc(&v, n * 2));
    CK(cudaMalloc(&o, n * 2)); CK(cudaMalloc(&lse, size_t(b) * h * s * 4));
    fill_random<<<1024, 256>>>(q, n, 1, c.bf16); fill_random<<<1024, 256>>>(k, n, 2, c.bf16);
    fill_random<<<1024, 256>>>(v, n, 3, c.bf16);
    longctx::flash::FwdParams p;
    p.q = q; p.k = k; p.v = v; p.out = o; p.lse = lse;
    p.q_row_stride = p.k_row_stride = p.v_row_stride = p.out_row_stride = int64_t(h) * d;
    p.q_head_stride = p.k_head_stride = p.v_head_stride = p.out_head_stride = d;
    p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.out_batch_stride = int64_t(s) * h * d;
    p.lse_batch_stride = int64_t(h) * s; p.lse_head_stride = s;
    p.batch = b; p.heads = h; p.heads_kv = h; p.head_dim = d; p.seqlen_q = s; p.seqlen_k = s;
    p.softmax_scale = 1.f / std::sqrt(float(d));
    p.softmax_scale_log2 = p.softmax_scale * 1.4426950408889634f;
    p.causal = c.causal; p.window_right = c.causal ? 0 : -1; p.window_left = c.wl;
    p.is_bf16 = c.bf16;
    double pairs = 0;  // visible pairs
    for (int i = 0; i < s; ++i) {
      int hi = c.causal ? i : s - 1, lo = c.wl >= 0 ? std::max(0, i - c.wl) : 0;
      pairs += hi - lo + 1;
    }
    const double flops = 4.0 * b * h * pairs * d;
    for (int i = 0; i < 3; ++i) CK(fn(p, 0, 0, tile_counter, 0));
    CK(cudaDeviceSynchronize());
    cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
    std::vector<float> ms(reps);
    for (int r = 0; r < reps; ++r) {
      CK(cudaEventRecord(e0)); CK(fn(p, 0, 0, tile_counter, 0)); CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1)); CK(cudaEventElapsedTime(&ms[r], e0, e1));
    }
    CK(cudaGetLastError());
    std::sort(ms.begin(), ms.end());
    const float med = ms[reps / 2];
    printf("%-5d %-5s %-7d %-7d %-6d %-10s %10.3f %9.1f   (min %.3f max %.3f)\n", d, c.bf16 ? "bf16" : "fp16", s,
           int(c.causal), c.wl, grid, med, flops / (med * 1e-3) / 1e12, ms[0], ms[reps - 1]);
    cudaFree(q); cudaFree(k); cudaFree(v); cudaFree(o); cudaFree(lse);
    cudaEventDestroy(e0); cudaEventDestroy(e1);
  }
  return 0;
}
