// Flash-attention backward, step 1 of 3 (preprocess): D = rowsum(dout * out) in fp32, written to
// params.dsoftmax_sum (laid out like lse), and zeroing of the fp32 dQ accumulator and of the
// per-(batch, head, query tile) semaphores that the deterministic mode orders its dQ additions by.
//
// Tiling: one warp per (row, head); each lane reads 16-byte chunks of dout and out (head_dim / 8
// chunks per row, so hdim 64/96/128/256 use 8/12/16/32 lanes: head_dim columns, not the kernel
// width kHeadDim), accumulates in fp32, reduces with shuffles. Rows past a varlen sequence do
// not exist (varlen rows are the packed rows), batched rows are all real. The accumulator is
// zeroed by a grid-stride loop over float4s.
// For the wgmma kernels (flash_bwd_sm90.cuh, flash_bwd_sm90_hdim256.cuh) it also writes, when
// pad.lse2 != nullptr, two row-padded fp32 copies that their producers bulk-copy per query
// tile: lse2 = lse * log2(e) (+inf where lse = -inf, so P = 0) and D, at
// [h * pad.head_stride + bwd_pad_base(b) + i] (flash_bwd_dispatch.cuh); the pad rows
// [sq, roundup(sq, kPadRows)) of every (sequence, head), kPadRows = bwd_layout_block_m(kHeadDim)
// the tallest query tile of the kernel width, get lse2 = +inf and D = 0 (P = dS = 0 for those
// query rows).
// Invariants: dq_accum holds accum_elems = flash_bwd_dq_floats floats (flash_bwd_dispatch.cuh:
// rows kHeadDim wide, all zeroed), 16-byte aligned; out/dout rows are 16-byte aligned (checked
// by the launcher).
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include "longctx/config.h"
#include "longctx/flash/flash_bwd_dispatch.cuh"
#include "longctx/flash/flash_params.h"

namespace longctx {
namespace flash {

struct BwdPad {
  float* lse2 = nullptr;  // nullptr: not written
  float* d = nullptr;
  int64_t head_stride = 0;
};

template <typename Element, int kHeadDim>
__global__ void flash_bwd_preprocess_kernel(BwdParams p, int64_t total_q_rows, float* dq_accum,
                                            int64_t accum_elems, int* sems, int64_t n_sems,
                                            BwdPad pad = BwdPad{}) {
  constexpr int kPadRows = bwd_layout_block_m(kHeadDim);  // the tallest query tile
  // Zero the accumulator and the semaphores.
  const int64_t gtid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t gsize = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = gtid; i < accum_elems / 4; i += gsize)
    reinterpret_cast<float4*>(dq_accum)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  if (sems != nullptr)
    for (int64_t i = gtid; i < n_sems; i += gsize) sems[i] = 0;

  // D: one warp per (row, head); row = packed row index in [0, total_q_rows).
  const FwdParams& f = p.fwd;
  const bool varlen = f.cu_seqlens_q != nullptr;
  const int lane = threadIdx.x & 31;
  const int64_t warp = gtid >> 5, nwarps = gsize >> 5;
  const int chunks = f.head_dim / 8;  // <= kHeadDim / 8 <= 32 lanes
  const int64_t work = total_q_rows * f.heads;
  for (int64_t w = warp; w < work; w += nwarps) {
    const int64_t row = w / f.heads;
    const int h = int(w % f.heads);
    int64_t b = 0, i = row;
    if (!varlen) { b = row / f.seqlen_q; i = row % f.seqlen_q; }
    float acc = 0.f;
    if (lane < chunks) {
      const Element* o = reinterpret_cast<const Element*>(f.out) + b * f.out_batch_stride +
                         i * f.out_row_stride + h * f.out_head_stride + lane * 8;
      const Element* d = reinterpret_cast<const Element*>(p.dout) + b * p.dout_batch_stride +
                         i * p.dout_row_stride + h * p.dout_head_stride + lane * 8;
      const uint4 ov = *reinterpret_cast<const uint4*>(o);
      const uint4 dv = *reinterpret_cast<const uint4*>(d);
      const Element* oe = reinterpret_cast<const Element*>(&ov);
      const Element* de = reinterpret_cast<const Element*>(&dv);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc += float(oe[e]) * float(de[e]);
    }
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
    if (lane == 0) {
      // varlen: dsoftmax_sum is (heads, total_q) with head stride = total_q, batch stride 0.
      p.dsoftmax_sum[b * p.dsoftmax_sum_batch_stride + h * p.dsoftmax_sum_head_stride + i] = acc;
      if (pad.lse2 != nullptr) {
        int64_t q_off = 0, li = i;
        int bb = int(b);
        if (varlen) {  // sequence of packed row `row`: last b with cu_seqlens_q[b] <= row
          int lo = 0, hi = f.batch - 1;
          while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (f.cu_seqlens_q[mid] <= row) lo = mid; else hi = mid - 1;
          }
          bb = lo;
          q_off = f.cu_seqlens_q[lo];
          li = row - q_off;
        }
        const float l = f.lse[b * f.lse_batch_stride + h * f.lse_head_stride + i];
        const int64_t at =
            h * pad.head_stride + bwd_pad_base(varlen, bb, q_off, f.seqlen_q, kPadRows) + li;
        pad.lse2[at] = l == -INFINITY ? INFINITY : l * 1.4426950408889634f;
        pad.d[at] = acc;
      }
    }
  }
  // Pad rows of every (sequence, head): lse2 = +inf, D = 0.
  if (pad.lse2 != nullptr) {
    const int64_t n_pad = int64_t(f.batch) * f.heads * kPadRows;
    for (int64_t t = gtid; t < n_pad; t += gsize) {
      const int j = int(t % kPadRows);
      const int h = int((t / kPadRows) % f.heads);
      const int bb = int(t / (kPadRows * int64_t(f.heads)));
      int64_t q_off = 0;
      int sq = f.seqlen_q;
      if (varlen) { q_off = f.cu_seqlens_q[bb]; sq = f.cu_seqlens_q[bb + 1] - int(q_off); }
      const int64_t li = int64_t(sq) + j;
      if (li >= (int64_t(sq) + kPadRows - 1) / kPadRows * kPadRows) continue;
      const int64_t at =
          h * pad.head_stride + bwd_pad_base(varlen, bb, q_off, f.seqlen_q, kPadRows) + li;
      pad.lse2[at] = INFINITY;
      pad.d[at] = 0.f;
    }
  }
}

}  // namespace flash
}  // namespace longctx
