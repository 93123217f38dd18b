// Flash-attention backward, step 3 of 3 (postprocess): dq = softmax_scale * dq_accum, converted
// from the fp32 accumulator to the input dtype and written with dq's strides.
//
// Tiling: one thread per 8 consecutive elements of a (row, head) of dq (a 16-byte store), a
// grid-stride loop over heads * tiles * 64 rows * head_dim / 8 chunks of the accumulator.
// Accumulator layout (shared with the hdim 64/128 main kernel, flash_bwd_dispatch.cuh): per head
// `tiles` query tiles of 64 rows of D floats, row-major, D = kHeadDim the kernel width; query
// row i of sequence b at tile row 64 * bwd_dq_tile_base(b) + i (spaced for the main kernel's
// query tiles of up to bwd_layout_block_m(kHeadDim) rows). The spare rows past a sequence
// (bwd_dq_tile_owner gives a query index >= its length) are skipped; only the head_dim <= D
// columns of dq are written. Head dim 256 keeps its accumulator in fragment order and has its
// own postprocess (flash_bwd_sm90_hdim256.cuh).
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include "longctx/flash/flash_bwd_dispatch.cuh"  // bwd_dq_tile_owner
#include "longctx/flash/flash_params.h"

namespace longctx {
namespace flash {

template <typename Element, int kHeadDim>
__global__ void flash_bwd_postprocess_kernel(BwdParams p, int64_t tiles,
                                             const float* __restrict__ dq_accum) {
  const FwdParams& f = p.fwd;
  const int chunks = f.head_dim / 8;
  const int64_t rows = tiles * 64;
  const int64_t n = rows * f.heads * chunks;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < n;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int c = int(t % chunks) * 8;
    const int64_t rh = t / chunks;
    const int64_t row = rh % rows;
    const int h = int(rh / rows);
    int b = 0;
    int64_t m = 0;
    bwd_dq_tile_owner(f.cu_seqlens_q, f.batch, f.seqlen_q, bwd_layout_block_m(kHeadDim),
                      row / 64, b, m);
    const int64_t i = m * 64 + row % 64;
    const int64_t q_off = f.cu_seqlens_q != nullptr ? f.cu_seqlens_q[b] : 0;
    const int64_t sq = f.cu_seqlens_q != nullptr ? f.cu_seqlens_q[b + 1] - q_off : f.seqlen_q;
    if (i >= sq) continue;  // a spare row
    const float* a = dq_accum + (int64_t(h) * rows + row) * kHeadDim + c;
    const float4 x0 = reinterpret_cast<const float4*>(a)[0];
    const float4 x1 = reinterpret_cast<const float4*>(a)[1];
    const float s = f.softmax_scale;
    alignas(16) Element o[8] = {Element(x0.x * s), Element(x0.y * s), Element(x0.z * s),
                                Element(x0.w * s), Element(x1.x * s), Element(x1.y * s),
                                Element(x1.z * s), Element(x1.w * s)};
    const int64_t batch_off = f.cu_seqlens_q != nullptr ? 0 : b * p.dq_batch_stride;
    Element* dst = reinterpret_cast<Element*>(p.dq) + batch_off + (q_off + i) * p.dq_row_stride +
                   int64_t(h) * p.dq_head_stride + c;
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(o);
  }
}

}  // namespace flash
}  // namespace longctx
