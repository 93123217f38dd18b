// Folding one key chunk's attention into the running result (host and device code): with
// lse_a, lse_b the log-sum-exps of two disjoint key sets and o_a, o_b their normalized outputs,
// the union's output is w_a o_a + w_b o_b and its lse is lse_new, where
//     m = max(lse_a, lse_b), s = e^(lse_a - m) + e^(lse_b - m),
//     w_a = e^(lse_a - m) / s, w_b = e^(lse_b - m) / s, lse_new = m + log(s).
// Rows that see no key in either set (both -inf) keep out = 0 and lse = -inf (weights 0); a NaN
// lse makes both weights and lse_new NaN (it reaches the row's output).
#pragma once
#include <cmath>
#include "longctx/config.h"

namespace longctx {
namespace kvcache {

struct FoldWeights {
  float a, b, lse;
};

LONGCTX_HOST_DEVICE FoldWeights fold_weights(float lse_a, float lse_b) {
  const float m = lse_b > lse_a ? lse_b : lse_a;  // a NaN lse_a or lse_b gives NaN below
  if (m == -INFINITY) return {0.f, 0.f, -INFINITY};
  const float ea = expf(lse_a - m), eb = expf(lse_b - m);
  const float s = ea + eb;
  return {ea / s, eb / s, m + logf(s)};
}

}  // namespace kvcache
}  // namespace longctx
