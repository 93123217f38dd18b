// Development probe (session 9): can 8 clusters of 16 CTAs (256 threads, ~200 KiB shared memory,
// one CTA per SM) be co-resident on this GPU, and what does a cluster barrier + a DSMEM merge of
// 16 CTAs' partials (4 rows x 128 fp32 + lse each) cost? Build: nvcc -arch=sm_90a -std=c++17.
#include <cooperative_groups.h>
#include <cstdio>
#include <cuda_runtime.h>
namespace cg = cooperative_groups;

__device__ __forceinline__ unsigned long long gt() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void probe(unsigned long long* stamps, float* out, int spin_ns) {
  extern __shared__ float sm[];
  cg::cluster_group cl = cg::this_cluster();
  const unsigned long long t0 = gt();
  // partial: 4 rows x 128 + 4 lse
  for (int i = threadIdx.x; i < 4 * 128 + 4; i += blockDim.x) sm[i] = float(blockIdx.x + i);
  while (gt() - t0 < (unsigned long long)spin_ns) {}
  const unsigned long long t1 = gt();
  cl.sync();
  const unsigned long long t2 = gt();
  // CTA rank r merges 32 outputs: row r / 4, cols 32 (r % 4) .. +32; one warp, lane = col
  const int r = cl.block_rank(), n = cl.num_blocks();
  if (threadIdx.x < 32) {
    const int row = r / 4, col = 32 * (r % 4) + threadIdx.x;
    float lse[16], v[16];
#pragma unroll
    for (int s = 0; s < 16; ++s) {
      const float* rem = cl.map_shared_rank(sm, s % n);
      lse[s] = rem[512 + row];
      v[s] = rem[row * 128 + col];
    }
    float M = -1e30f;
#pragma unroll
    for (int s = 0; s < 16; ++s) M = fmaxf(M, lse[s] * 1e-3f);
    float acc = 0.f, L = 0.f;
#pragma unroll
    for (int s = 0; s < 16; ++s) {
      const float w = __expf(lse[s] * 1e-3f - M);
      L += w;
      acc += w * v[s];
    }
    out[(blockIdx.x / n) * 512 + row * 128 + col] = acc / L;
  }
  const unsigned long long t3 = gt();
  cl.sync();
  const unsigned long long t4 = gt();
  if (threadIdx.x == 0) {
    unsigned smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    unsigned long long* s = stamps + 6 * blockIdx.x;
    s[0] = t0; s[1] = t1; s[2] = t2; s[3] = t3; s[4] = t4; s[5] = smid;
  }
}

int main() {
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  printf("%s, %d SMs\n", prop.name, prop.multiProcessorCount);
  cudaFuncSetAttribute(probe, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  for (int smem : {100 * 1024, 200 * 1024}) {
    cudaFuncSetAttribute(probe, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    for (int threads : {128, 256}) {
      for (int c : {2, 4, 8, 12, 16}) {
        cudaLaunchConfig_t cfg = {};
        cudaLaunchAttribute at[1];
        at[0].id = cudaLaunchAttributeClusterDimension;
        at[0].val.clusterDim.x = c; at[0].val.clusterDim.y = 1; at[0].val.clusterDim.z = 1;
        cfg.gridDim = dim3(c * 8); cfg.blockDim = dim3(threads); cfg.dynamicSmemBytes = smem;
        cfg.attrs = at; cfg.numAttrs = 1;
        int n = -1;
        cudaError_t e = cudaOccupancyMaxActiveClusters(&n, probe, &cfg);
        printf("smem %d KiB threads %d cluster %d: max active clusters %d (%s)\n", smem / 1024,
               threads, c, n, cudaGetErrorString(e));
      }
    }
  }
  // 8 clusters of 16, 256 threads, 200 KiB: co-resident? merge cost?
  const int C = 16, NC = 8, smem = 200 * 1024;
  unsigned long long* st; float* out;
  cudaMalloc(&st, 6 * C * NC * 8); cudaMalloc(&out, NC * 512 * 4);
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeClusterDimension;
  at[0].val.clusterDim.x = C; at[0].val.clusterDim.y = 1; at[0].val.clusterDim.z = 1;
  cfg.gridDim = dim3(C * NC); cfg.blockDim = dim3(256); cfg.dynamicSmemBytes = smem;
  cfg.attrs = at; cfg.numAttrs = 1;
  for (int rep = 0; rep < 5; ++rep) {
    cudaError_t e = cudaLaunchKernelEx(&cfg, probe, st, out, 20000);
    cudaError_t e2 = cudaDeviceSynchronize();
    unsigned long long h[6 * C * NC];
    cudaMemcpy(h, st, sizeof(h), cudaMemcpyDeviceToHost);
    unsigned long long mn0 = ~0ull, mx0 = 0, mx2 = 0, mn1 = ~0ull;
    double merge = 0, sync1 = 0, sync2 = 0, mxm = 0;
    int sms[256] = {};
    for (int b = 0; b < C * NC; ++b) {
      unsigned long long* s = h + 6 * b;
      mn0 = s[0] < mn0 ? s[0] : mn0; mx0 = s[0] > mx0 ? s[0] : mx0;
      mn1 = s[1] < mn1 ? s[1] : mn1;
      sync1 += s[2] - s[1]; merge += s[3] - s[2]; sync2 += s[4] - s[3];
      mxm = (s[4] - s[1]) > mxm ? (s[4] - s[1]) : mxm;
      sms[s[5] % 256]++;
    }
    int dup = 0;
    for (int i = 0; i < 256; ++i) dup += sms[i] > 1;
    printf("rep %d (%s/%s): start spread %.2f us (co-resident if < 20), SMs shared %d; mean "
           "sync1 %.0f ns, merge %.0f ns, sync2 %.0f ns, max spin-end->exit %.0f ns\n", rep,
           cudaGetErrorString(e), cudaGetErrorString(e2), (mx0 - mn0) / 1e3, dup,
           sync1 / (C * NC), merge / (C * NC), sync2 / (C * NC), mxm);
  }
  return 0;
}
