// One sequence of a batch: its lengths and where its rows are, for host and device code alike
// (the CPU twins, the flash kernels and the KV-cache decode kernels all use this one type).
//
// A batch is either batched (q (batch, seqlen_q, heads, d): every sequence has seqlen_q rows and
// row i of sequence b is addressed through the batch stride) or packed (varlen: q (total_q,
// heads, d) with cu_seqlens_q (batch + 1,) int32 offsets: sequence b is rows
// [cu_seqlens_q[b], cu_seqlens_q[b + 1]) and batch strides are unused). Keys are packed the same
// way with cu_seqlens_k, or come from somewhere else (the KV cache passes each sequence's cached
// length). Row starts fit in int32 (cu_seqlens are int32); element offsets are int64.
#pragma once
#include <cstdint>
#include "longctx/config.h"

namespace longctx {

struct SeqLen {
  int sq = 0, sk = 0;            // this sequence's query rows and keys
  int q_start = 0, k_start = 0;  // first row in the packed tensors; 0 when batched
  int b = 0;                     // index in the batch
  bool packed_q = false;         // queries packed (cu_seqlens_q given)

  // Coordinate of the batch dimension for a batched tensor (the TMA's "batch"): b, or 0 packed.
  LONGCTX_HOST_DEVICE int tma_batch() const { return packed_q ? 0 : b; }
  // Element offset of query row 0 in a tensor laid out like q (out, dout, dq, ...).
  LONGCTX_HOST_DEVICE int64_t q_offset(int64_t batch_stride, int64_t row_stride) const {
    return packed_q ? int64_t(q_start) * row_stride : int64_t(b) * batch_stride;
  }
  // Index of query row 0 among all query rows of the batch: packed q_start, batched b * seqlen_q
  // (scratch buffers with one row per query row, e.g. the decode's split partials).
  LONGCTX_HOST_DEVICE int64_t q_row0(int seqlen_q) const {
    return packed_q ? int64_t(q_start) : int64_t(b) * seqlen_q;
  }
  // Offset of row 0's entry in an lse-like (batch, heads, seqlen_q) / (heads, total_q) tensor,
  // without the head term.
  LONGCTX_HOST_DEVICE int64_t lse_offset(int64_t batch_stride) const {
    return packed_q ? int64_t(q_start) : int64_t(b) * batch_stride;
  }
};

// Sequence b. cu_seqlens_q / cu_seqlens_k: packed offsets or nullptr (batched: seqlen_q /
// seqlen_k rows). Keys not described by either pass cu_seqlens_k = nullptr and their length as
// seqlen_k.
LONGCTX_HOST_DEVICE SeqLen seq_len(const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k,
                                   int seqlen_q, int seqlen_k, int b) {
  SeqLen s;
  s.b = b;
  s.packed_q = cu_seqlens_q != nullptr;
  if (s.packed_q) {
    s.q_start = cu_seqlens_q[b];
    s.sq = cu_seqlens_q[b + 1] - s.q_start;
  } else {
    s.sq = seqlen_q;
  }
  if (cu_seqlens_k != nullptr) {
    s.k_start = cu_seqlens_k[b];
    s.sk = cu_seqlens_k[b + 1] - s.k_start;
  } else {
    s.sk = seqlen_k;
  }
  return s;
}

}  // namespace longctx
