// RoPE arithmetic shared by the CPU op, the CUDA kernel and the standalone tests.
//
// What it computes: the rotation angle pos * inv_freq, reduced to [-pi, pi] with an error-free
// product so it stays accurate at positions of millions of tokens, and the rotation of one
// (x1, x2) pair by that angle, scaled by the attention factor.
//
// Invariants:
//  - Positions are exact in fp32 up to 2^24 (16.7M tokens). The product p * f is split into
//    hi + lo with one fma (exact), and the multiple of 2*pi is removed with fma against a
//    two-term split of 2*pi, so the reduced angle has an absolute error of a few 1e-7 rad where
//    the naive fp32 product p * f is off by up to ulp(p * f) / 2 (0.125 rad at 2^21).
//  - sin/cos are the accurate library functions (never the __sinf intrinsics).
#pragma once
#include <cmath>
#include "longctx/config.h"

namespace longctx {
namespace rope {

// fp32(2*pi) and the fp32 rounding of what it misses; the third term (~1e-15) is negligible
// for |k| < 2^22.
constexpr float kTwoPiHi = 6.28318548202514648438f;
constexpr float kTwoPiLo = -1.74845553146951715e-07f;
constexpr float kInvTwoPi = 0.159154943091895335769f;

LONGCTX_HOST_DEVICE float reduced_angle(float pos, float inv_freq) {
  float hi = pos * inv_freq;
  float lo = fmaf(pos, inv_freq, -hi);  // exact: p and f have 24-bit significands
  float k = rintf(hi * kInvTwoPi);
  float r = fmaf(-k, kTwoPiHi, hi);  // hi and k * 2pi nearly cancel: one rounding of a small value
  r = fmaf(-k, kTwoPiLo, r);
  return r + lo;
}

struct CosSin {
  float cos;
  float sin;
};

// cos/sin of the reduced angle, times the attention factor; sin is negated for the inverse
// rotation (the backward of RoPE is its transpose).
LONGCTX_HOST_DEVICE CosSin cos_sin(float pos, float inv_freq, float scale, bool inverse) {
  float r = reduced_angle(pos, inv_freq);
  float s, c;
#if defined(__CUDA_ARCH__)
  sincosf(r, &s, &c);
#else
  s = std::sin(r);
  c = std::cos(r);
#endif
  return CosSin{c * scale, (inverse ? -s : s) * scale};
}

// y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin.
LONGCTX_HOST_DEVICE void rotate(float& x1, float& x2, CosSin cs) {
  float y1 = x1 * cs.cos - x2 * cs.sin;
  float y2 = x2 * cs.cos + x1 * cs.sin;
  x1 = y1;
  x2 = y2;
}

}  // namespace rope
}  // namespace longctx
