// Checks of the sinks and softcap arguments, and the sinks' gradient (logit_mods.h).
#include "common/logit_mods.h"
#include <cmath>
#include <limits>
#include "common/checks.h"

namespace longctx {

LogitMods make_logit_mods(const std::optional<at::Tensor>& sinks, double softcap,
                          const at::Tensor& q, int64_t heads, const char* op) {
  LONGCTX_CHECK_ARG(std::isfinite(softcap) && softcap >= 0, op, "softcap",
                    "must be finite and >= 0 (0 = no capping), got ", softcap);
  LogitMods m;
  m.softcap = static_cast<float>(softcap);
  LONGCTX_CHECK_ARG(softcap == 0 || m.softcap > 0, op, "softcap",
                    "is too small for fp32, got ", softcap);
  if (!sinks.has_value()) return m;
  const at::Tensor& s = *sinks;
  check_dtype(s, op, "sinks", {at::kFloat});
  LONGCTX_CHECK_ARG(s.dim() == 1 && s.size(0) == heads, op, "sinks",
                    "must have shape (heads,) = (", heads, "), got ", s.sizes());
  check_same_device(s, q, op, "sinks", "q");
  LONGCTX_CHECK_ARG(s.is_contiguous(), op, "sinks", "must be contiguous, got strides ",
                    s.strides());
  m.sinks = s.data_ptr<float>();
  return m;
}

at::Tensor sinks_grad(const at::Tensor& sinks, const at::Tensor& lse,
                      const at::Tensor& dsoftmax_sum, bool varlen) {
  const int64_t heads = sinks.size(0);
  const at::Tensor l = lse.to(at::kDouble);
  const at::Tensor s = sinks.to(at::kDouble).view(varlen ? at::IntArrayRef{heads, 1}
                                                         : at::IntArrayRef{1, heads, 1});
  // lse = -inf only where a row sees no key and its sink is -inf: its sink weight is 0.
  const at::Tensor p = at::where(l == -std::numeric_limits<double>::infinity(),
                                 at::zeros({}, l.options()), at::exp(s - l));
  const at::Tensor g = -(p * dsoftmax_sum.to(at::kDouble));
  return (varlen ? g.sum(1) : g.sum(at::IntArrayRef{0, 2})).to(at::kFloat);
}

}  // namespace longctx
