// Per-(batch) sequence geometry of one CTA: lengths and row offsets into q/k/v/out/lse.
//
// Batched: lengths are params.seqlen_q / seqlen_k, rows are addressed through the batch stride
// (TMA coordinate "batch" = b). Varlen: lengths come from cu_seqlens, the TMA sees the packed
// tensor as batch 1 and a sequence starts at row offset cu_seqlens[b] (TMA coordinates are
// shifted by that offset; rows past the sequence are read but masked (keys) or not stored
// (queries)). All gmem offsets that scale with tokens are 64-bit.
#pragma once
#include <cstdint>
#include "longctx/flash/flash_params.h"

namespace longctx {
namespace flash {

struct SeqInfo {
  int sq, sk;          // this sequence's lengths
  int q_off, k_off;    // first row of the sequence in the (packed) tensor; 0 when batched
  int tma_batch;       // batch coordinate for the TMA tensors

  __device__ __forceinline__ SeqInfo(const FwdParams& p, int b) {
    if (p.cu_seqlens_q != nullptr) {
      q_off = p.cu_seqlens_q[b];
      sq = p.cu_seqlens_q[b + 1] - q_off;
      k_off = p.cu_seqlens_k[b];
      sk = p.cu_seqlens_k[b + 1] - k_off;
      tma_batch = 0;
    } else {
      q_off = 0; k_off = 0;
      sq = p.seqlen_q; sk = p.seqlen_k;
      tma_batch = b;
    }
  }
};

}  // namespace flash
}  // namespace longctx
