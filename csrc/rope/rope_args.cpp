#include "rope/rope_args.h"
#include <cmath>
#include "common/checks.h"
#include "longctx/rope/rope_kernel_limits.h"

namespace longctx {
namespace {

rope::HeadsView heads_view(const at::Tensor& in, const at::Tensor& out) {
  // Both are viewed as (batch, seqlen, heads, dim); a packed (tokens, heads, dim) tensor has batch 1.
  rope::HeadsView h;
  h.in = in.data_ptr();
  h.out = out.data_ptr();
  const bool packed = in.dim() == 3;
  h.heads = static_cast<int>(in.size(-2));
  h.in_stride_b = packed ? 0 : in.stride(0);
  h.in_stride_s = in.stride(-3);
  h.in_stride_h = in.stride(-2);
  h.out_stride_b = packed ? 0 : out.stride(0);
  h.out_stride_s = out.stride(-3);
  h.out_stride_h = out.stride(-2);
  return h;
}

}  // namespace

rope::Params make_rope_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_out,
                              const at::Tensor& k_out, const at::Tensor& positions,
                              const at::Tensor& inv_freq, double attention_factor,
                              bool interleaved, bool inverse, const char* op) {
  check_dtype(q, op, "q", {at::kBFloat16, at::kHalf, at::kFloat});
  LONGCTX_CHECK_ARG(k.scalar_type() == q.scalar_type(), op, "k",
                    "must have the same dtype as q (", q.scalar_type(), "), got ",
                    k.scalar_type());
  check_dim(q, op, "q", {3, 4});
  LONGCTX_CHECK_ARG(k.dim() == q.dim(), op, "k",
                    "must have the same layout as q: q has shape ", q.sizes(), ", k has shape ",
                    k.sizes());
  LONGCTX_CHECK_ARG(k.sizes().slice(0, q.dim() - 2) == q.sizes().slice(0, q.dim() - 2), op, "k",
                    "must have the same leading (batch, seqlen) or (tokens) sizes as q: q has "
                    "shape ", q.sizes(), ", k has shape ", k.sizes());
  LONGCTX_CHECK_ARG(k.size(-1) == q.size(-1), op, "k",
                    "must have the same head_dim as q: q has ", q.size(-1), ", k has ", k.size(-1));
  check_same_device(k, q, op, "k", "q");
  check_same_device(positions, q, op, "positions", "q");
  check_same_device(inv_freq, q, op, "inv_freq", "q");
  check_same_device(q_out, q, op, "q (output)", "q");
  check_same_device(k_out, q, op, "k (output)", "q");
  check_last_dim_contiguous(q, op, "q");
  check_last_dim_contiguous(k, op, "k");
  check_last_dim_contiguous(q_out, op, "q (output)");
  check_last_dim_contiguous(k_out, op, "k (output)");

  check_dtype(positions, op, "positions", {at::kInt, at::kLong});
  const int64_t batch = q.dim() == 4 ? q.size(0) : 1;
  const int64_t seqlen = q.size(-3);
  if (q.dim() == 4) {
    LONGCTX_CHECK_ARG((positions.dim() == 2 && positions.size(0) == batch &&
                       positions.size(1) == seqlen) ||
                          (positions.dim() == 1 && positions.size(0) == seqlen),
                      op, "positions", "must have shape (batch, seqlen) = (", batch, ", ", seqlen,
                      ") or (seqlen,) = (", seqlen, ",) for q of shape ", q.sizes(), ", got ",
                      positions.sizes());
  } else {
    LONGCTX_CHECK_ARG(positions.dim() == 1 && positions.size(0) == seqlen, op, "positions",
                      "must have shape (tokens,) = (", seqlen, ",) for packed q of shape ",
                      q.sizes(), ", got ", positions.sizes());
  }

  check_dtype(inv_freq, op, "inv_freq", {at::kFloat});
  LONGCTX_CHECK_ARG(inv_freq.dim() == 1 && inv_freq.is_contiguous(), op, "inv_freq",
                    "must be a contiguous 1-D tensor of rotary_dim / 2 frequencies, got shape ",
                    inv_freq.sizes());
  const int64_t n_freq = inv_freq.numel();
  const int64_t head_dim = q.size(-1);
  LONGCTX_CHECK_ARG(n_freq >= 1 && 2 * n_freq <= head_dim, op, "inv_freq",
                    "has ", n_freq, " frequencies, so rotary_dim = ", 2 * n_freq,
                    "; it must lie in [2, head_dim = ", head_dim, "]");
  LONGCTX_CHECK_ARG(n_freq <= rope::kMaxFrequencies, op, "inv_freq", "has ", n_freq,
                    " frequencies; at most ", rope::kMaxFrequencies,
                    " are supported (head_dim <= ", 2 * rope::kMaxFrequencies, ")");
  LONGCTX_CHECK_ARG(std::isfinite(attention_factor) && attention_factor > 0, op,
                    "attention_factor", "must be a finite positive number, got ",
                    attention_factor);
  LONGCTX_CHECK_ARG(q.size(-2) + k.size(-2) <= (int64_t{1} << 30), op, "q",
                    "and k have too many heads");

  rope::Params p;
  p.q = heads_view(q, q_out);
  p.k = heads_view(k, k_out);
  p.positions = positions.data_ptr();
  p.positions_int64 = positions.scalar_type() == at::kLong;
  p.pos_stride_b = positions.dim() == 2 ? positions.stride(0) : 0;
  p.pos_stride_s = positions.stride(-1);
  p.inv_freq = inv_freq.data_ptr<float>();
  p.n_freq = static_cast<int>(n_freq);
  p.head_dim = static_cast<int>(head_dim);
  p.batch = batch;
  p.seqlen = seqlen;
  p.scale = static_cast<float>(attention_factor);
  p.interleaved = interleaved;
  p.inverse = inverse;
  p.inplace = q_out.is_same(q);
  return p;
}

void check_positions_in_range(const at::Tensor& positions, int64_t max_position, const char* op) {
  LONGCTX_CHECK_ARG(max_position >= -1, op, "max_position",
                    "must be -1 (no check) or >= 0, got ", max_position);
  if (max_position < 0 || positions.numel() == 0) return;
  const auto minmax = at::aminmax(positions);
  const int64_t lo = std::get<0>(minmax).item<int64_t>();
  const int64_t hi = std::get<1>(minmax).item<int64_t>();
  LONGCTX_CHECK_ARG(lo >= 0 && hi < max_position, op, "positions",
                    "must lie in [0, max_position = ", max_position, "), got values in [", lo,
                    ", ", hi, "]");
}

void apply_rope_inplace(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                        const at::Tensor& inv_freq, double attention_factor, bool interleaved,
                        bool inverse, int64_t max_position, RopeRunner run) {
  constexpr const char* op = "apply_rope_";
  check_writable(q, op, "q");
  check_writable(k, op, "k");
  const auto p = make_rope_params(q, k, q, k, positions, inv_freq, attention_factor, interleaved,
                                  inverse, op);
  check_positions_in_range(positions, max_position, op);
  run(p, q.scalar_type(), q);
}

std::tuple<at::Tensor, at::Tensor> apply_rope_out_of_place(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
    const at::Tensor& inv_freq, double attention_factor, bool interleaved, bool inverse,
    int64_t max_position, RopeRunner run) {
  constexpr const char* op = "apply_rope";
  auto q_out = at::empty_like(q);
  auto k_out = at::empty_like(k);
  const auto p = make_rope_params(q, k, q_out, k_out, positions, inv_freq, attention_factor,
                                  interleaved, inverse, op);
  check_positions_in_range(positions, max_position, op);
  run(p, q.scalar_type(), q);
  return {q_out, k_out};
}

}  // namespace longctx
