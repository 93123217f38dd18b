// Standalone test of the framework-free CUDA RoPE kernel (rope_kernel.cuh) against the host loop
// (rope_host.h) on random bf16 and fp32 inputs: vectorized and element-wise paths (a misaligned
// view forces the latter), NeoX and interleaved, partial rotary, in place and out of place.
// Exits 77 (ctest: skipped) when no GPU is present.
#include <cuda_bf16.h>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <random>
#include <vector>
#include "longctx/rope/rope_host.h"
#include "longctx/rope/rope_kernel.cuh"

#define CHECK_CUDA(x)                                                             \
  do {                                                                            \
    cudaError_t e = (x);                                                          \
    if (e != cudaSuccess) {                                                       \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__); \
      std::exit(1);                                                               \
    }                                                                             \
  } while (0)

using longctx::rope::Params;

struct HostBf16 {  // host twin of __nv_bfloat16 for rope_host.h (round to nearest even)
  uint16_t bits;
  HostBf16() = default;
  explicit HostBf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    bits = static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
  }
  explicit operator float() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

template <typename Dev, typename Host>
int run_case(bool interleaved, bool inplace, int rotary_dim, int elem_offset) {
  const int64_t B = 2, S = 301;
  const int H = 5, HK = 2, D = 128;
  const int64_t nq = B * S * H * D + elem_offset, nk = B * S * HK * D + elem_offset;
  std::mt19937 rng(7 + rotary_dim + interleaved * 2 + inplace * 4 + elem_offset);
  std::normal_distribution<float> normal;
  std::vector<Host> q(nq), k(nk);
  for (auto& v : q) v = Host(normal(rng));
  for (auto& v : k) v = Host(normal(rng));
  std::vector<int32_t> pos(B * S);
  for (auto& v : pos) v = static_cast<int32_t>(rng() % (1u << 21));
  const int n = rotary_dim / 2;
  std::vector<float> inv(n);
  for (int i = 0; i < n; ++i) inv[i] = static_cast<float>(std::pow(500000.0, -2.0 * i / rotary_dim));

  Dev *dq, *dk, *dqo, *dko;
  int32_t* dpos;
  float* dinv;
  CHECK_CUDA(cudaMalloc(&dq, nq * sizeof(Dev)));
  CHECK_CUDA(cudaMalloc(&dk, nk * sizeof(Dev)));
  CHECK_CUDA(cudaMalloc(&dqo, nq * sizeof(Dev)));
  CHECK_CUDA(cudaMalloc(&dko, nk * sizeof(Dev)));
  CHECK_CUDA(cudaMalloc(&dpos, pos.size() * 4));
  CHECK_CUDA(cudaMalloc(&dinv, n * 4));
  CHECK_CUDA(cudaMemcpy(dq, q.data(), nq * sizeof(Dev), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(dk, k.data(), nk * sizeof(Dev), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemset(dqo, 0xff, nq * sizeof(Dev)));  // poison: every element must be written
  CHECK_CUDA(cudaMemset(dko, 0xff, nk * sizeof(Dev)));
  CHECK_CUDA(cudaMemcpy(dpos, pos.data(), pos.size() * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(dinv, inv.data(), n * 4, cudaMemcpyHostToDevice));

  auto view = [&](void* in, void* out, int heads) {
    longctx::rope::HeadsView h;
    h.in = in;
    h.out = out;
    h.heads = heads;
    h.in_stride_b = h.out_stride_b = S * heads * D;
    h.in_stride_s = h.out_stride_s = heads * D;
    h.in_stride_h = h.out_stride_h = D;
    return h;
  };
  Params p;
  p.q = view(dq + elem_offset, inplace ? dq + elem_offset : dqo + elem_offset, H);
  p.k = view(dk + elem_offset, inplace ? dk + elem_offset : dko + elem_offset, HK);
  p.positions = dpos;
  p.positions_int64 = false;
  p.pos_stride_b = S;
  p.pos_stride_s = 1;
  p.inv_freq = dinv;
  p.n_freq = n;
  p.head_dim = D;
  p.batch = B;
  p.seqlen = S;
  p.scale = 1.1f;
  p.interleaved = interleaved;
  p.inplace = inplace;
  CHECK_CUDA(longctx::rope::launch_rope<Dev>(p, 0));
  CHECK_CUDA(cudaDeviceSynchronize());

  std::vector<Host> gq(nq), gk(nk), hq(q), hk(k);
  CHECK_CUDA(cudaMemcpy(gq.data(), inplace ? dq : dqo, nq * sizeof(Dev), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(gk.data(), inplace ? dk : dko, nk * sizeof(Dev), cudaMemcpyDeviceToHost));
  Params h = p;
  h.q = view(hq.data() + elem_offset, hq.data() + elem_offset, H);
  h.k = view(hk.data() + elem_offset, hk.data() + elem_offset, HK);
  h.positions = pos.data();
  h.inv_freq = inv.data();
  h.inplace = true;
  longctx::rope::rope_tokens_host<Host>(h, 0, B * S);

  double worst = 0;
  for (int64_t i = elem_offset; i < nq; ++i)
    worst = std::fmax(worst, std::fabs(static_cast<float>(gq[i]) - static_cast<float>(hq[i])));
  for (int64_t i = elem_offset; i < nk; ++i)
    worst = std::fmax(worst, std::fabs(static_cast<float>(gk[i]) - static_cast<float>(hk[i])));
  // Same fp32 arithmetic on both sides; device and host sin/cos may differ by an ulp, which can
  // flip one bf16 rounding: allow one bf16 ulp of |x| <= 8.
  const double tol = sizeof(Dev) == 2 ? 8.0 / 128 : 1e-5;
  const bool ok = worst <= tol && !std::isnan(worst);
  std::printf("%s %s interleaved=%d inplace=%d rotary=%d offset=%d: max abs diff vs host %.3g\n",
              ok ? "PASS" : "FAIL", sizeof(Dev) == 2 ? "bf16" : "fp32", interleaved, inplace,
              rotary_dim, elem_offset, worst);
  cudaFree(dq); cudaFree(dk); cudaFree(dqo); cudaFree(dko); cudaFree(dpos); cudaFree(dinv);
  return ok ? 0 : 1;
}

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  int failures = 0, cases = 0;
  for (bool il : {false, true})
    for (bool inplace : {true, false})
      for (int rot : {128, 64})
        for (int off : {0, 1}) {  // offset 1 misaligns: element-wise path
          failures += run_case<__nv_bfloat16, HostBf16>(il, inplace, rot, off);
          failures += run_case<float, float>(il, inplace, rot, off);
          cases += 2;
        }
  std::printf("%d passed, %d failed\n", cases - failures, failures);
  return failures == 0 ? 0 : 1;
}
