// Plain-data description of one flash-attention launch: FwdParams for the forward, BwdParams
// (a FwdParams plus the gradient tensors) for the backward.
// Framework-free: raw pointers and element strides, shared by the CPU twin and the CUDA kernels.
//
// Batched: q (batch, seqlen_q, heads, head_dim), k/v (batch, seqlen_k, heads_kv, head_dim),
// lse (batch, heads, seqlen_q). Varlen (cu_seqlens_q != nullptr): q (total_q, heads, head_dim),
// k/v (total_k, heads_kv, head_dim), lse (heads, total_q); sequence b spans rows
// [cu_seqlens_q[b], cu_seqlens_q[b+1]) of q and [cu_seqlens_k[b], cu_seqlens_k[b+1]) of k/v, and
// the batch strides are unused. seqlen_q/seqlen_k are then the maxima over the batch.
//
// Mask (bottom-right aligned, FlashAttention semantics): query row i of a sequence with lengths
// (sq, sk) sees key j iff  j >= i + sk - sq - window_left  (when window_left >= 0)
//                     and  j <= i + sk - sq + window_right (when window_right >= 0).
// causal is window_right = 0. A row that sees no key gets out = 0 and lse = -inf (with sinks:
// lse = the row's sink, logit_mods.h).
#pragma once
#include <cstdint>
#include "longctx/config.h"
#include "longctx/logit_mods.h"
#include "longctx/seqlen.h"

namespace longctx {
namespace flash {

struct FwdParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;

  // Element strides. Row = one token; the last dimension is contiguous.
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;  // lse rows are contiguous

  const int32_t* cu_seqlens_q = nullptr;  // (batch + 1,), varlen only
  const int32_t* cu_seqlens_k = nullptr;

  int batch = 0, heads = 0, heads_kv = 0, head_dim = 0;
  int seqlen_q = 0, seqlen_k = 0;  // varlen: max_seqlen_q / max_seqlen_k

  float softmax_scale = 1.f;
  float softmax_scale_log2 = 1.f;  // softmax_scale * log2(e)
  bool causal = false;
  int window_left = -1, window_right = -1;  // causal => window_right == 0
  LogitMods mods;  // softcap and sinks (logit_mods.h)

  bool is_bf16 = true;  // else fp16 (CPU twin also accepts fp32 through its own path)
};

// Backward: fwd describes q, k, v, out and lse (all read), with the same mask and scale as the
// forward that produced out and lse. dout has q's shape; dq/dk/dv have the shapes of q/k/v (for
// GQA, dk/dv sum the contributions of the heads / heads_kv query heads of each kv head).
// dsoftmax_sum (D = rowsum(dout * out), fp32) is a scratch buffer laid out like lse: batched
// (batch, heads, seqlen_q), varlen (heads, total_q); its batch stride is 0 for varlen.
struct BwdParams {
  FwdParams fwd;

  const void* dout = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* dsoftmax_sum = nullptr;

  // Element strides, same conventions as FwdParams (last dimension contiguous).
  int64_t dout_batch_stride = 0, dout_row_stride = 0, dout_head_stride = 0;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;
  int64_t dsoftmax_sum_batch_stride = 0, dsoftmax_sum_head_stride = 0;  // rows contiguous

  // Bitwise-reproducible gradients (CUDA: dQ accumulated in a fixed order). The CPU twin is
  // deterministic whatever this says.
  bool deterministic = false;
};

// Sequence b of a launch (seqlen.h): lengths and first rows, batched or varlen.
LONGCTX_HOST_DEVICE SeqLen sequence(const FwdParams& p, int b) {
  return seq_len(p.cu_seqlens_q, p.cu_seqlens_k, p.seqlen_q, p.seqlen_k, b);
}

}  // namespace flash
}  // namespace longctx
