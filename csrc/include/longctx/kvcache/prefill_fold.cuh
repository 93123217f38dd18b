// The chunked prefill's fold (CUDA): out, lse += one key chunk's (o, l), in place, by
// prefill_fold.h's weights. out/lse are the op's outputs in either layout (packed rows, or
// (batch, rows, ...) with rows_per_batch rows per batch entry) given by strides; o is the
// forward's packed (rows, heads, head_dim) output and l its (heads, rows) lse, both contiguous.
//
// Tiling: a group of P lanes (P = the power of two >= head_dim / 8, at most 32) per (row, head),
// each lane 8 channels (16-byte loads and stores), 256 threads per CTA. Every lane reads the
// pair's two lse values before the warp synchronizes; then lane 0 of the group writes lse_new,
// so no lane reads an lse another has already replaced. fp32 arithmetic, one rounding to T.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include "longctx/kvcache/decode_common.cuh"
#include "longctx/kvcache/prefill_fold.h"

namespace longctx {
namespace kvcache {
namespace cuda {

constexpr int kFoldThreads = 256;

// Element strides of an output: offset = b * batch + row * row + h * head.
struct FoldStrides {
  int64_t batch, row, head;
};

template <typename T>
struct PrefillFold {
  T* out;
  float* lse;
  const T* o;
  const float* l;
  int64_t rows, rows_per_batch;
  int heads, head_dim;
  FoldStrides out_at, lse_at;
};

// Lanes per (row, head): the power of two >= head_dim / 8.
inline int fold_lanes(int head_dim) {
  int p = 1;
  while (p * 8 < head_dim) p *= 2;
  return p;
}

template <typename T>
__global__ void __launch_bounds__(kFoldThreads) prefill_fold_kernel(const PrefillFold<T> f,
                                                                    int lanes) {
  const int64_t pair = (int64_t(blockIdx.x) * kFoldThreads + threadIdx.x) / lanes;
  const int lane = threadIdx.x % lanes;
  const bool live = pair < f.rows * f.heads;
  const int64_t r = live ? pair / f.heads : 0;
  const int h = live ? static_cast<int>(pair % f.heads) : 0;
  const int64_t b = r / f.rows_per_batch, rb = r % f.rows_per_batch;
  float* lse = f.lse + b * f.lse_at.batch + rb * f.lse_at.row + h * f.lse_at.head;
  const FoldWeights w = fold_weights(live ? *lse : 0.f, live ? f.l[h * f.rows + r] : 0.f);
  __syncwarp();
  if (!live) return;
  if (lane == 0) *lse = w.lse;
  const int ch = lane * 8;
  if (ch >= f.head_dim) return;
  T* dst = f.out + b * f.out_at.batch + rb * f.out_at.row + h * f.out_at.head + ch;
  const T* src = f.o + (r * f.heads + h) * int64_t(f.head_dim) + ch;
  uint4 a = *reinterpret_cast<const uint4*>(dst);
  const uint4 c = *reinterpret_cast<const uint4*>(src);
  T* av = reinterpret_cast<T*>(&a);
  const T* cv = reinterpret_cast<const T*>(&c);
#pragma unroll
  for (int e = 0; e < 8; ++e) av[e] = from_float<T>(w.a * to_float(av[e]) + w.b * to_float(cv[e]));
  *reinterpret_cast<uint4*>(dst) = a;
}

}  // namespace cuda
}  // namespace kvcache
}  // namespace longctx
