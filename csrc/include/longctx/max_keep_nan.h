// A maximum that keeps NaN, for host and device code. fmaxf and std::max drop a NaN operand (or
// return the first one), so a running max over values with a NaN forgets it; the softmax and
// quantization code uses this one where a NaN input must stay visible in its outputs (a NaN in
// q, k or v gives NaN in the rows it reaches; a NaN in a K/V head makes its int8 scale NaN).
#pragma once
#include "longctx/config.h"

namespace longctx {

template <typename T>
LONGCTX_HOST_DEVICE T max_keep_nan(T a, T b) {
  return (b > a || b != b) ? b : a;  // a NaN a stays (b > NaN is false)
}

}  // namespace longctx
