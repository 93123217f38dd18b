// Host interface of the flash-attention backward: workspace sizing, the layout requirement of its
// kernels, the launch function type and the table of compiled (head_dim, dtype) instantiations
// (registry.h). Framework-free: the torch launcher (csrc/flash/flash_bwd_cuda.cu) and the
// standalone test and benchmark use it alike.
//
// Head dims: any multiple of 8 up to 256 runs the kernel of width D = fwd_kernel_head_dim
// (64, 128 or 256), as the forward does: its TMA views are head_dim wide, so Q, K, V and dO's
// columns past head_dim load as zeros (S, dP exact; the extra columns of dQ, dK, dV are 0), and
// the epilogues and the dQ postprocess store head_dim columns.
// Workspace (caller-allocated, 16-byte aligned, stream-private):
//   dq_accum: heads * dq_rows * D floats, D the kernel width (flash_bwd_dq_rows: 64 rows per
//             padded query tile, bwd_dq_tiles; D 64 and 128 row-major, D 256 in that kernel's
//             fragment order), followed by the row-padded lse2 and D buffers
//             (2 * heads * bwd_pad_head_stride floats; flash_bwd_accum_floats counts all);
//   sems:     batch * heads * ceil(seqlen_q / 64) ints (deterministic mode only; may be null
//             otherwise). seqlen_q is max_seqlen_q in varlen.
// Requirements (flash_bwd_unsupported_reason): head_dim a multiple of 8 in [8, 256],
// 16-byte-aligned q/k/v/out/dout/dq/dk/dv, row and head strides multiples of 8 elements.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include "longctx/config.h"
#include "longctx/flash/flash_fwd_dispatch.cuh"
#include "longctx/flash/flash_params.h"
#include "longctx/registry.h"

namespace longctx {
namespace flash {

// Row spacing of the workspace layouts below for kernel width D: the tallest query tile a main
// kernel of that width walks (Traits::kBlockM): 128 at D 64 (FA3's 128 x 128 tiles), 64
// otherwise. The padded layouts leave room for whole tiles of this height after every
// sequence.
LONGCTX_HOST_DEVICE constexpr int bwd_layout_block_m(int kernel_head_dim) {
  return kernel_head_dim == 64 ? 128 : 64;
}

// Row-padded per-head layout of lse2 / D for the wgmma backward (flash_bwd_preprocess.cuh). Each
// sequence starts at a 16-byte-aligned row and is followed by >= block_m spare rows, so a
// block_m-row tile starting inside it never reaches the next sequence. Batched:
// b * roundup(seqlen_q, block_m).
LONGCTX_HOST_DEVICE int64_t bwd_pad_base(bool varlen, int b, int64_t q_off, int seqlen_q,
                                         int block_m) {
  return varlen ? ((q_off + (block_m + 8) * int64_t(b) + 3) & ~int64_t(3))
                : int64_t(b) * ((int64_t(seqlen_q) + block_m - 1) / block_m * block_m);
}
LONGCTX_HOST_DEVICE int64_t bwd_pad_head_stride(bool varlen, int batch, int64_t total_q,
                                                int seqlen_q, int block_m) {
  return varlen ? ((total_q + (block_m + 8) * int64_t(batch) + 8) & ~int64_t(3))
                : int64_t(batch) * ((int64_t(seqlen_q) + block_m - 1) / block_m * block_m);
}

// dQ accumulator of the wgmma kernels: per head, query tiles of 64 rows, each a contiguous block
// of 64 x D floats (row-major at D 64 and 128, the TMA reduce's target; fragment order at D 256,
// flash_bwd_sm90_hdim256.cuh); a sequence's tiles are consecutive and sequences never share one,
// so a whole block_m-row reduce past a sequence's last row stays in its spare rows. Tile of
// (sequence b, query tile 0): batched b * roundup(seqlen_q, block_m) / 64, varlen
// (cu_seqlens_q[b] + block_m b) / 64: sequence b then owns at least floor((len + block_m) / 64)
// >= block_m / 64 * ceil(len / block_m) tiles, all its block_m-row tiles.
LONGCTX_HOST_DEVICE int64_t bwd_dq_tile_base(bool varlen, int b, int64_t q_off, int seqlen_q,
                                             int block_m) {
  return varlen ? (q_off + block_m * int64_t(b)) / 64
                : int64_t(b) * ((int64_t(seqlen_q) + block_m - 1) / block_m * (block_m / 64));
}
// Tiles per head: every (b, m) above has a tile index below this.
LONGCTX_HOST_DEVICE int64_t bwd_dq_tiles(bool varlen, int batch, int64_t total_q, int seqlen_q,
                                         int block_m) {
  return varlen ? (total_q + block_m * int64_t(batch)) / 64
                : int64_t(batch) * ((int64_t(seqlen_q) + block_m - 1) / block_m * (block_m / 64));
}

// Inverse of bwd_dq_tile_base: the sequence b that owns tile t and t's 64-row query tile m in
// it (m may lie past the sequence's rows: the spare tiles a sequence is followed by).
LONGCTX_HOST_DEVICE void bwd_dq_tile_owner(const int32_t* cu_seqlens_q, int batch, int seqlen_q,
                                           int block_m, int64_t t, int& b, int64_t& m) {
  if (cu_seqlens_q == nullptr) {
    const int64_t per_b = bwd_dq_tile_base(false, 1, 0, seqlen_q, block_m);
    b = int(t / per_b);
    m = t % per_b;
    return;
  }
  int lo = 0, hi = batch - 1;  // last b whose first tile is <= t
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (bwd_dq_tile_base(true, mid, cu_seqlens_q[mid], seqlen_q, block_m) <= t) lo = mid;
    else hi = mid - 1;
  }
  b = lo;
  m = t - bwd_dq_tile_base(true, lo, cu_seqlens_q[lo], seqlen_q, block_m);
}

constexpr int kBwdBlockM = 64;  // rows of a dQ accumulator tile

inline int flash_bwd_layout_block_m(const BwdParams& p) {
  return bwd_layout_block_m(fwd_kernel_head_dim(p.fwd.head_dim));
}
inline int64_t flash_bwd_total_q_rows(const BwdParams& p, int64_t total_q) {
  return p.fwd.cu_seqlens_q != nullptr ? total_q : int64_t(p.fwd.batch) * p.fwd.seqlen_q;
}
// Rows per head of the dQ accumulator (see the workspace above).
inline int64_t flash_bwd_dq_rows(const BwdParams& p, int64_t total_q) {
  return 64 * bwd_dq_tiles(p.fwd.cu_seqlens_q != nullptr, p.fwd.batch, total_q, p.fwd.seqlen_q,
                           flash_bwd_layout_block_m(p));
}
inline int64_t flash_bwd_dq_floats(const BwdParams& p, int64_t total_q) {
  const int d = fwd_kernel_head_dim(p.fwd.head_dim);  // the kernels' row width
  return int64_t(p.fwd.heads) * flash_bwd_dq_rows(p, total_q) * d;
}
inline int64_t flash_bwd_pad_stride(const BwdParams& p, int64_t total_q) {
  return bwd_pad_head_stride(p.fwd.cu_seqlens_q != nullptr, p.fwd.batch, total_q, p.fwd.seqlen_q,
                             flash_bwd_layout_block_m(p));
}
// Whole workspace: dQ accumulator + padded lse2 and D.
inline int64_t flash_bwd_accum_floats(const BwdParams& p, int64_t total_q) {
  return flash_bwd_dq_floats(p, total_q) + 2 * int64_t(p.fwd.heads) * flash_bwd_pad_stride(p, total_q);
}
inline int64_t flash_bwd_num_sems(const BwdParams& p) {  // one per 64-row query tile
  return int64_t(p.fwd.batch) * p.fwd.heads * ((p.fwd.seqlen_q + kBwdBlockM - 1) / kBwdBlockM);
}

inline const char* flash_bwd_unsupported_reason(const BwdParams& p) {
  auto mis = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) != 0; };
  const FwdParams& f = p.fwd;
  if (f.head_dim % 8 != 0 || f.head_dim < 8 || f.head_dim > 256)
    return "head_dim must be a multiple of 8 in [8, 256]";
  if (mis(f.q) || mis(f.k) || mis(f.v) || mis(f.out) || mis(p.dout) || mis(p.dq) || mis(p.dk) ||
      mis(p.dv))
    return "q, k, v, out, dout, dq, dk and dv must be 16-byte aligned";
  const int64_t s[] = {f.q_row_stride,  f.q_head_stride,  f.k_row_stride,   f.k_head_stride,
                       f.v_row_stride,  f.v_head_stride,  f.out_row_stride, f.out_head_stride,
                       p.dout_row_stride, p.dout_head_stride, p.dq_row_stride, p.dq_head_stride,
                       p.dk_row_stride, p.dk_head_stride, p.dv_row_stride,  p.dv_head_stride,
                       f.cu_seqlens_q ? 0 : f.q_batch_stride, f.cu_seqlens_q ? 0 : f.k_batch_stride,
                       f.cu_seqlens_q ? 0 : f.v_batch_stride, f.cu_seqlens_q ? 0 : f.out_batch_stride,
                       f.cu_seqlens_q ? 0 : p.dout_batch_stride, f.cu_seqlens_q ? 0 : p.dq_batch_stride,
                       f.cu_seqlens_q ? 0 : p.dk_batch_stride, f.cu_seqlens_q ? 0 : p.dv_batch_stride};
  for (int64_t x : s)
    if (x % 8 != 0) return "row, head and batch strides must be multiples of 8 elements";
  return nullptr;
}

// dq_accum / sems: the workspace above; total_q / total_k: rows of the packed tensors in
// varlen mode (ignored when batched).
using FlashBwdFn = cudaError_t (*)(const BwdParams&, int64_t total_q, int64_t total_k,
                                   float* dq_accum, int* sems, cudaStream_t);

struct FlashBwdTag {};
// Keyed by (head_dim, dtype); filled by the generated flash_bwd_hdim<D>_<dtype>.cu files.
using FlashBwdTable = KernelTable<FlashBwdTag, FlashBwdFn>;

}  // namespace flash
}  // namespace longctx
