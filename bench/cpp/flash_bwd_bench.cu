// Times the flash-attention backward (preprocess + main + postprocess) at head_dim 128, bf16,
// batch*seqlen = 32K, heads*hdim = 2048 (docs/design.md convention: bwd FLOPs = 2.5 x
// 4*b*h*pairs*d, causal pairs = s(s+1)/2), atomic and deterministic dQ. Random inputs (never
// zeros); median of 10 timed runs after 2 warm-ups (CUDA events). Built by CMake.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>
#include "longctx/flash/flash_bwd_dispatch.cuh"
#include "../../tests/support/cuda_test_util.cuh"

using longctx::flash::BwdParams;
using longctx::flash::FlashBwdFn;

__global__ void fill(uint16_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 2654435761u ^ seed; x ^= x >> 13; x *= 0x5bd1e995u; x ^= x >> 15;
    p[i] = __bfloat16_as_ushort(__float2bfloat16((x & 0xFFFF) / 32768.f - 1.f));
  }
}
__global__ void fill_lse(float* p, size_t n, float v) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) p[i] = v;
}

int main() {
  skip_without_gpu(9);
  const int d = 128;
  FlashBwdFn fn = longctx::flash::FlashBwdTable::find(d, longctx::DType::kBF16);
  if (!fn) { printf("hdim 128 bf16 not compiled\n"); return 1; }
  printf("seqlen causal det | ms | TFLOP/s\n");
  for (int s : {16384, 1024}) for (int causal : {0, 1}) {
    const int b = 32768 / s, h = 2048 / d;
    const size_t n = size_t(b) * s * h * d;
    uint16_t *q, *k, *v, *o, *dout, *dq, *dk, *dv; float *lse, *dsum, *accum; int* sems;
    for (auto** ptr : {&q, &k, &v, &o, &dout, &dq, &dk, &dv}) CK(cudaMalloc(ptr, n * 2));
    int i = 0;
    for (auto* ptr : {q, k, v, o, dout}) fill<<<1024, 256>>>(ptr, n, 17 * ++i);
    CK(cudaMalloc(&lse, size_t(b) * h * s * 4)); CK(cudaMalloc(&dsum, size_t(b) * h * s * 4));
    // lse = log(s) + 1 keeps P in a realistic range for unit-scale random q, k.
    fill_lse<<<1024, 256>>>(lse, size_t(b) * h * s, std::log(float(s)) + 1.f);
    BwdParams bp; auto& p = bp.fwd;
    p.q = q; p.k = k; p.v = v; p.out = o; p.lse = lse;
    const int64_t rs = int64_t(h) * d, bs = int64_t(s) * rs;
    p.q_row_stride = p.k_row_stride = p.v_row_stride = p.out_row_stride = rs;
    p.q_head_stride = p.k_head_stride = p.v_head_stride = p.out_head_stride = d;
    p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.out_batch_stride = bs;
    p.lse_batch_stride = int64_t(h) * s; p.lse_head_stride = s;
    p.batch = b; p.heads = h; p.heads_kv = h; p.head_dim = d; p.seqlen_q = p.seqlen_k = s;
    p.softmax_scale = 1.f / std::sqrt(float(d)); p.softmax_scale_log2 = p.softmax_scale * 1.4426950408889634f;
    p.causal = causal; p.window_right = causal ? 0 : -1; p.is_bf16 = true;
    bp.dout = dout; bp.dq = dq; bp.dk = dk; bp.dv = dv; bp.dsoftmax_sum = dsum;
    bp.dout_row_stride = bp.dq_row_stride = bp.dk_row_stride = bp.dv_row_stride = rs;
    bp.dout_head_stride = bp.dq_head_stride = bp.dk_head_stride = bp.dv_head_stride = d;
    bp.dout_batch_stride = bp.dq_batch_stride = bp.dk_batch_stride = bp.dv_batch_stride = bs;
    bp.dsoftmax_sum_batch_stride = p.lse_batch_stride; bp.dsoftmax_sum_head_stride = s;
    CK(cudaMalloc(&accum, longctx::flash::flash_bwd_accum_floats(bp, 0) * 4));
    CK(cudaMalloc(&sems, longctx::flash::flash_bwd_num_sems(bp) * 4));
    const double pairs = causal ? double(s) * (s + 1) / 2 : double(s) * s;
    const double flops = 2.5 * 4.0 * b * h * pairs * d;
    for (int det : {0, 1}) {
      bp.deterministic = det;
      for (int w = 0; w < 2; ++w) CK(fn(bp, 0, 0, accum, sems, 0));
      CK(cudaDeviceSynchronize());
      std::vector<float> ts;
      cudaEvent_t a, e; cudaEventCreate(&a); cudaEventCreate(&e);
      for (int r = 0; r < 10; ++r) {
        cudaEventRecord(a); CK(fn(bp, 0, 0, accum, sems, 0)); cudaEventRecord(e);
        CK(cudaEventSynchronize(e)); float ms; cudaEventElapsedTime(&ms, a, e); ts.push_back(ms);
      }
      std::sort(ts.begin(), ts.end());
      printf("%6d %d %d | %.3f | %.0f\n", s, causal, det, ts[5], flops / ts[5] / 1e9);
    }
    for (auto* ptr : {q, k, v, o, dout, dq, dk, dv}) cudaFree(ptr);
    cudaFree(lse); cudaFree(dsum); cudaFree(accum); cudaFree(sems);
  }
  return 0;
}
