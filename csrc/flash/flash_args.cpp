// Argument checks for flash_attn_fwd / flash_attn_bwd (CPU twin and CUDA launchers) and the
// translation of checked tensors into flash::FwdParams / flash::BwdParams.
//
// Order matters: every check runs before anything that would index a size the user got wrong
// (rank before size(i), dtype before data_ptr<T>), so bad input is an error, never a crash.
// The CPU path accepts fp32 and float64 on top of bf16/fp16 (float64 makes gradcheck possible)
// and any head_dim in [1, 256]; CUDA takes bf16/fp16 and head_dim a multiple of 8 in [8, 256].
#include "flash/flash_args.h"
#include <cmath>
#include <limits>
#include <vector>
#include "common/checks.h"
#include "common/logit_mods.h"

namespace longctx {
namespace {

constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

void check_cu_seqlens_tensor(const at::Tensor& cu, const at::Tensor& q, const char* op,
                             const char* arg) {
  check_dtype(cu, op, arg, {at::kInt});
  LONGCTX_CHECK_ARG(cu.dim() == 1, op, arg,
                    "must be 1-D (batch + 1 offsets), got shape ", cu.sizes());
  LONGCTX_CHECK_ARG(cu.numel() >= 1, op, arg, "must hold batch + 1 >= 1 offsets, got 0");
  LONGCTX_CHECK_ARG(cu.is_contiguous(), op, arg, "must be contiguous, got strides ",
                    cu.strides());
  check_same_device(cu, q, op, arg, "q");
  LONGCTX_CHECK_ARG(cu.numel() - 1 <= kIntMax, op, arg, "has too many sequences");
}

// A window bound larger than any int seqlen means the same as unbounded (-1); storing it as -1
// keeps the int fields of FwdParams exact.
int normalize_window(int64_t w, const char* op, const char* arg) {
  LONGCTX_CHECK_ARG(w >= -1, op, arg, "must be -1 (unbounded) or >= 0, got ", w);
  return w > kIntMax ? -1 : static_cast<int>(w);
}

void set_strides(const at::Tensor& t, bool varlen, int64_t& batch_stride, int64_t& row_stride,
                 int64_t& head_stride) {
  batch_stride = varlen ? 0 : t.stride(0);
  row_stride = t.stride(-3);
  head_stride = t.stride(-2);
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg,
                const char* ref_arg) {
  LONGCTX_CHECK_ARG(t.sizes() == ref.sizes(), op, arg, "must have the shape of ", ref_arg, " (",
                    ref.sizes(), "), got ", t.sizes());
  LONGCTX_CHECK_ARG(t.scalar_type() == ref.scalar_type(), op, arg, "must have the dtype of ",
                    ref_arg, " (", ref.scalar_type(), "), got ", t.scalar_type());
  check_same_device(t, ref, op, arg, ref_arg);
  check_last_dim_contiguous(t, op, arg);
}

void check_lse_like(const at::Tensor& t, const std::vector<int64_t>& shape, const at::Tensor& q,
                    const char* op, const char* arg) {
  check_dtype(t, op, arg, {at::kFloat});
  LONGCTX_CHECK_ARG(t.sizes() == at::IntArrayRef(shape), op, arg, "must have shape ",
                    at::IntArrayRef(shape), ", got ", t.sizes());
  check_same_device(t, q, op, arg, "q");
  check_last_dim_contiguous(t, op, arg);
}

}  // namespace

FlashFwdOutputShapes flash_fwd_output_shapes(const at::Tensor& q, bool varlen, const char* op) {
  if (varlen) {
    LONGCTX_CHECK_ARG(q.dim() == 3, op, "q",
                      "must have 3 dimensions (total_q, heads, head_dim) when cu_seqlens_q is "
                      "given, got shape ", q.sizes());
  } else {
    LONGCTX_CHECK_ARG(q.dim() == 4, op, "q",
                      "must have 4 dimensions (batch, seqlen_q, heads, head_dim) when "
                      "cu_seqlens_q is not given, got shape ", q.sizes());
  }
  FlashFwdOutputShapes s;
  s.out = q.sizes().vec();
  s.lse = varlen ? std::vector<int64_t>{q.size(1), q.size(0)}
                 : std::vector<int64_t>{q.size(0), q.size(2), q.size(1)};
  return s;
}

void check_cu_seqlens_values(const at::Tensor& cu_seqlens, int64_t total_rows, int64_t max_seqlen,
                             const char* op, const char* arg) {
  // On CUDA this is a device-to-host copy and a sync; acceptable for an argument check.
  const at::Tensor host = cu_seqlens.to(at::kCPU, at::kInt).contiguous();
  const int32_t* c = host.data_ptr<int32_t>();
  const int64_t n = host.numel();
  LONGCTX_CHECK_ARG(n >= 1 && c[0] == 0, op, arg, "must start at 0, got ",
                    n >= 1 ? c[0] : -1);
  for (int64_t b = 0; b + 1 < n; ++b) {
    const int64_t len = int64_t(c[b + 1]) - c[b];
    LONGCTX_CHECK_ARG(len >= 0, op, arg, "must be non-decreasing, got ", arg, "[", b, "] = ",
                      c[b], " > ", arg, "[", b + 1, "] = ", c[b + 1]);
    LONGCTX_CHECK_ARG(len <= max_seqlen, op, arg, "describes sequence ", b, " of length ", len,
                      ", longer than its max_seqlen = ", max_seqlen);
  }
  LONGCTX_CHECK_ARG(c[n - 1] == total_rows, op, arg, "must end at the number of packed rows (",
                    total_rows, "), got ", c[n - 1]);
}

FlashFwdArgs make_flash_fwd_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& cu_seqlens_q,
                                 const std::optional<at::Tensor>& cu_seqlens_k,
                                 int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                                 bool causal, int64_t window_left, int64_t window_right,
                                 const std::optional<at::Tensor>& sinks, double softcap,
                                 const at::Tensor& out, const at::Tensor& lse, const char* op) {
  const bool on_cpu = q.device().is_cpu();
  // dtypes and devices
  if (on_cpu) {
    check_dtype(q, op, "q", {at::kBFloat16, at::kHalf, at::kFloat, at::kDouble});
  } else {
    check_dtype(q, op, "q", {at::kBFloat16, at::kHalf});
  }
  LONGCTX_CHECK_ARG(k.scalar_type() == q.scalar_type(), op, "k", "must have the dtype of q (",
                    q.scalar_type(), "), got ", k.scalar_type());
  LONGCTX_CHECK_ARG(v.scalar_type() == q.scalar_type(), op, "v", "must have the dtype of q (",
                    q.scalar_type(), "), got ", v.scalar_type());
  check_same_device(k, q, op, "k", "q");
  check_same_device(v, q, op, "v", "q");

  // layout: batched or varlen
  LONGCTX_CHECK_ARG(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(), op,
                    cu_seqlens_q.has_value() ? "cu_seqlens_k" : "cu_seqlens_q",
                    "must be given together with ",
                    cu_seqlens_q.has_value() ? "cu_seqlens_q" : "cu_seqlens_k",
                    " (varlen) or both left out (batched)");
  const bool varlen = cu_seqlens_q.has_value();
  const auto shapes = flash_fwd_output_shapes(q, varlen, op);
  const int64_t rank = varlen ? 3 : 4;
  const char* layout = varlen ? "(total_k, heads_kv, head_dim) when cu_seqlens_k is given"
                              : "(batch, seqlen_k, heads_kv, head_dim) when cu_seqlens_k is not "
                                "given";
  LONGCTX_CHECK_ARG(k.dim() == rank, op, "k", "must have ", rank, " dimensions ", layout,
                    ", got shape ", k.sizes());
  LONGCTX_CHECK_ARG(v.dim() == rank, op, "v", "must have ", rank, " dimensions ", layout,
                    ", got shape ", v.sizes());

  // head_dim, heads
  const int64_t head_dim = q.size(-1);
  LONGCTX_CHECK_ARG(k.size(-1) == head_dim, op, "k", "must have the head_dim of q (", head_dim,
                    "), got ", k.size(-1));
  LONGCTX_CHECK_ARG(v.size(-1) == head_dim, op, "v", "must have the head_dim of q (", head_dim,
                    "), got ", v.size(-1));
  if (on_cpu) {
    LONGCTX_CHECK_ARG(head_dim >= 1 && head_dim <= 256, op, "q",
                      "must have head_dim in [1, 256] on CPU, got ", head_dim);
  } else {
    LONGCTX_CHECK_ARG(head_dim % 8 == 0 && head_dim >= 8 && head_dim <= 256, op, "q",
                      "must have head_dim a multiple of 8 in [8, 256] on CUDA, got ", head_dim);
  }
  const int64_t heads = q.size(-2), heads_kv = k.size(-2);
  LONGCTX_CHECK_ARG(v.size(-2) == heads_kv, op, "v", "must have the heads_kv of k (", heads_kv,
                    "), got ", v.size(-2));
  LONGCTX_CHECK_ARG(heads_kv >= 1, op, "k", "must have at least one head, got shape ",
                    k.sizes());
  LONGCTX_CHECK_ARG(heads % heads_kv == 0, op, "q",
                    "heads must be a multiple of the heads_kv of k/v (GQA): q has ", heads,
                    " heads, k has ", heads_kv);
  LONGCTX_CHECK_ARG(heads <= kIntMax, op, "q", "has too many heads: ", heads);

  // batch / seqlen consistency
  LONGCTX_CHECK_ARG(v.size(-3) == k.size(-3), op, "v", "must have the ",
                    varlen ? "total_k" : "seqlen_k", " of k (", k.size(-3), "), got ",
                    v.size(-3));
  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0;
  LONGCTX_CHECK_ARG(max_seqlen_q >= 0 && max_seqlen_q <= kIntMax, op, "max_seqlen_q",
                    "must lie in [0, 2^31), got ", max_seqlen_q);
  LONGCTX_CHECK_ARG(max_seqlen_k >= 0 && max_seqlen_k <= kIntMax, op, "max_seqlen_k",
                    "must lie in [0, 2^31), got ", max_seqlen_k);
  if (varlen) {
    check_cu_seqlens_tensor(*cu_seqlens_q, q, op, "cu_seqlens_q");
    check_cu_seqlens_tensor(*cu_seqlens_k, q, op, "cu_seqlens_k");
    LONGCTX_CHECK_ARG(cu_seqlens_k->numel() == cu_seqlens_q->numel(), op, "cu_seqlens_k",
                      "must have the batch + 1 = ", cu_seqlens_q->numel(),
                      " entries of cu_seqlens_q, got ", cu_seqlens_k->numel());
    batch = cu_seqlens_q->numel() - 1;
    seqlen_q = max_seqlen_q;
    seqlen_k = max_seqlen_k;
  } else {
    LONGCTX_CHECK_ARG(k.size(0) == q.size(0), op, "k", "must have the batch of q (", q.size(0),
                      "), got ", k.size(0));
    LONGCTX_CHECK_ARG(v.size(0) == q.size(0), op, "v", "must have the batch of q (", q.size(0),
                      "), got ", v.size(0));
    batch = q.size(0);
    seqlen_q = q.size(1);  // max_seqlen_* are not used by the batched layout
    seqlen_k = k.size(1);
    LONGCTX_CHECK_ARG(seqlen_q <= kIntMax, op, "q", "seqlen_q must be < 2^31, got ", seqlen_q);
    LONGCTX_CHECK_ARG(seqlen_k <= kIntMax, op, "k", "seqlen_k must be < 2^31, got ", seqlen_k);
    LONGCTX_CHECK_ARG(batch <= kIntMax, op, "q", "batch must be < 2^31, got ", batch);
  }
  check_last_dim_contiguous(q, op, "q");
  check_last_dim_contiguous(k, op, "k");
  check_last_dim_contiguous(v, op, "v");

  // scale and mask
  LONGCTX_CHECK_ARG(std::isfinite(softmax_scale), op, "softmax_scale", "must be finite, got ",
                    softmax_scale);
  int wl = normalize_window(window_left, op, "window_left");
  int wr = normalize_window(window_right, op, "window_right");
  if (causal) {
    LONGCTX_CHECK_ARG(window_right <= 0, op, "window_right",
                      "must be -1 or 0 with causal=True (causal means window_right = 0), got ",
                      window_right);
    wr = 0;
  }

  // outputs
  check_like(out, q, op, "out", "q");
  check_lse_like(lse, shapes.lse, q, op, "lse");

  FlashFwdArgs a;
  a.varlen = varlen;
  a.dtype = q.scalar_type();
  auto& p = a.params;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  set_strides(q, varlen, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  set_strides(k, varlen, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  set_strides(v, varlen, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  set_strides(out, varlen, p.out_batch_stride, p.out_row_stride, p.out_head_stride);
  p.lse_batch_stride = varlen ? 0 : lse.stride(0);
  p.lse_head_stride = lse.stride(-2);
  if (varlen) {
    p.cu_seqlens_q = cu_seqlens_q->data_ptr<int32_t>();
    p.cu_seqlens_k = cu_seqlens_k->data_ptr<int32_t>();
  }
  p.batch = static_cast<int>(batch);
  p.heads = static_cast<int>(heads);
  p.heads_kv = static_cast<int>(heads_kv);
  p.head_dim = static_cast<int>(head_dim);
  p.seqlen_q = static_cast<int>(seqlen_q);
  p.seqlen_k = static_cast<int>(seqlen_k);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.softmax_scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);
  p.causal = causal;
  p.window_left = wl;
  p.window_right = wr;
  p.mods = make_logit_mods(sinks, softcap, q, heads, op);
  p.is_bf16 = q.scalar_type() == at::kBFloat16;
  return a;
}

FlashBwdArgs make_flash_bwd_args(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                 const std::optional<at::Tensor>& cu_seqlens_q,
                                 const std::optional<at::Tensor>& cu_seqlens_k,
                                 int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                                 bool causal, int64_t window_left, int64_t window_right,
                                 const std::optional<at::Tensor>& sinks, double softcap,
                                 bool deterministic, const at::Tensor& dq, const at::Tensor& dk,
                                 const at::Tensor& dv, const at::Tensor& dsoftmax_sum,
                                 const char* op) {
  const FlashFwdArgs f =
      make_flash_fwd_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          softmax_scale, causal, window_left, window_right, sinks, softcap,
                          out, lse, op);
  check_like(dout, q, op, "dout", "q");
  check_like(dq, q, op, "dq", "q");
  check_like(dk, k, op, "dk", "k");
  check_like(dv, v, op, "dv", "v");
  check_lse_like(dsoftmax_sum, lse.sizes().vec(), q, op, "dsoftmax_sum");

  FlashBwdArgs a;
  a.varlen = f.varlen;
  a.dtype = f.dtype;
  auto& p = a.params;
  p.fwd = f.params;
  p.dout = dout.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dsoftmax_sum = dsoftmax_sum.data_ptr<float>();
  set_strides(dout, f.varlen, p.dout_batch_stride, p.dout_row_stride, p.dout_head_stride);
  set_strides(dq, f.varlen, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
  set_strides(dk, f.varlen, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
  set_strides(dv, f.varlen, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
  p.dsoftmax_sum_batch_stride = f.varlen ? 0 : dsoftmax_sum.stride(0);
  p.dsoftmax_sum_head_stride = dsoftmax_sum.stride(-2);
  p.deterministic = deterministic;
  return a;
}

}  // namespace longctx
