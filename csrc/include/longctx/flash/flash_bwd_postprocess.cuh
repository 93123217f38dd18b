// Flash-attention backward, step 3 of 3 (postprocess): dq = softmax_scale * dq_accum, converted
// from the fp32 accumulator to the input dtype and written with dq's strides.
//
// Tiling: one thread per 8 consecutive elements of a (row, head) of dq (a 16-byte store), a
// grid-stride loop over total_q_rows * heads * head_dim / 8 chunks.
// Accumulator layout (shared with the hdim 64/128 main kernel): accum[(h * total_q_rows + row) * D
// + c], where row is the packed row (varlen) or b * seqlen_q + i (batched) and D = kHeadDim, the
// kernel width; only the head_dim <= D columns of dq are written. Head dim 256 keeps
// its accumulator in fragment order and has its own postprocess (flash_bwd_sm90_hdim256.cuh).
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include "longctx/flash/flash_params.h"

namespace longctx {
namespace flash {

template <typename Element, int kHeadDim>
__global__ void flash_bwd_postprocess_kernel(BwdParams p, int64_t total_q_rows,
                                             const float* __restrict__ dq_accum) {
  const FwdParams& f = p.fwd;
  const bool varlen = f.cu_seqlens_q != nullptr;
  const int chunks = f.head_dim / 8;
  const int64_t n = total_q_rows * f.heads * chunks;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < n;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int c = int(t % chunks) * 8;
    const int64_t rh = t / chunks;
    const int64_t row = rh % total_q_rows;
    const int h = int(rh / total_q_rows);
    int64_t b = 0, i = row;
    if (!varlen) { b = row / f.seqlen_q; i = row % f.seqlen_q; }
    const float* a = dq_accum + (int64_t(h) * total_q_rows + row) * kHeadDim + c;
    const float4 x0 = reinterpret_cast<const float4*>(a)[0];
    const float4 x1 = reinterpret_cast<const float4*>(a)[1];
    const float s = f.softmax_scale;
    alignas(16) Element o[8] = {Element(x0.x * s), Element(x0.y * s), Element(x0.z * s),
                                Element(x0.w * s), Element(x1.x * s), Element(x1.y * s),
                                Element(x1.z * s), Element(x1.w * s)};
    Element* dst = reinterpret_cast<Element*>(p.dq) + b * p.dq_batch_stride +
                   i * p.dq_row_stride + int64_t(h) * p.dq_head_stride + c;
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(o);
  }
}

}  // namespace flash
}  // namespace longctx
