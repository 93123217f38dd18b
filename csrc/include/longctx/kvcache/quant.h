// Quantization of KV-cache elements, for host and device code (no framework headers).
//
// FP8 e4m3 (the "fn" variant: no infinities, 0x7f / 0xff are NaN, max finite 448):
//   float_to_fp8_e4m3  rounds to nearest, ties to even; |x| > 448 (after rounding) and +-inf
//                      saturate to +-448; NaN stays NaN. This is what CUDA's
//                      __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3) and torch's
//                      c10::Float8_e4m3fn conversion do; the bit manipulation follows c10's
//                      fp8e4m3fn_from_fp32_value so the two agree on every fp32 input (the
//                      tests compare them on all fp8 values, their midpoints and neighbours).
//   fp8_e4m3_to_float  exact decode.
// INT8, symmetric per (token, head): scale = amax / 127, q = clamp(rint(x / scale), -127, 127),
//   x ~= q * scale; a zero scale (all-zero head) stores q = 0. A NaN (or an infinity) among a
//   head's values makes amax, hence its scale, NaN (or inf): every channel of that (token, head)
//   then dequantizes to NaN, so attention over the key gives NaN where it reaches it instead of
//   silently dropping the element (amax_step keeps the NaN). Division (not multiplication by a
//   reciprocal) keeps host and device bitwise equal: both round x / scale once (IEEE div.rn).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include "longctx/config.h"
#include "longctx/max_keep_nan.h"

namespace longctx {
namespace kvcache {

constexpr float kFp8E4M3Max = 448.f;
constexpr float kInt8Max = 127.f;

// The bits of a float as uint32_t (To = uint32_t) or a float from its bits (To = float).
template <typename To, typename From>
LONGCTX_HOST_DEVICE To f32_bit_cast(From x) {
  static_assert(sizeof(To) == 4 && sizeof(From) == 4, "32-bit casts only");
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<To, float>) {
    return __uint_as_float(x);
  } else {
    return __float_as_uint(x);
  }
#else
  To y;
  std::memcpy(&y, &x, sizeof(y));
  return y;
#endif
}
LONGCTX_HOST_DEVICE uint32_t f32_bits(float f) { return f32_bit_cast<uint32_t>(f); }
LONGCTX_HOST_DEVICE float f32_from_bits(uint32_t u) { return f32_bit_cast<float>(u); }

LONGCTX_HOST_DEVICE uint8_t float_to_fp8_e4m3(float f) {
  constexpr uint32_t kFirstTooLarge = UINT32_C(1087) << 20;  // 480.0f: not representable
  constexpr uint32_t kDenormMagic = UINT32_C(141) << 23;     // 2^14: aligns bit 0 to 2^-9
  uint32_t bits = f32_bits(f);
  const uint32_t sign = bits & UINT32_C(0x80000000);
  bits ^= sign;
  uint8_t result;
  if (bits >= kFirstTooLarge) {
    result = bits > UINT32_C(0x7F800000) ? uint8_t(0x7f) : uint8_t(0x7e);  // NaN, else saturate
  } else if (bits < (UINT32_C(121) << 23)) {  // below 2^-6: subnormal (or zero)
    // Adding 2^14 rounds |f| to a multiple of 2^-9 (RNE, in the fp32 adder); the low bits are
    // then the subnormal code, 8 meaning the smallest normal 2^-6.
    bits = f32_bits(f32_from_bits(bits) + f32_from_bits(kDenormMagic));
    result = static_cast<uint8_t>(bits - kDenormMagic);
  } else {
    const uint32_t mant_odd = (bits >> 20) & 1;
    bits += ((uint32_t)(7 - 127) << 23) + 0x7FFFF;  // rebias exponent, round half down ...
    bits += mant_odd;                               // ... or half up when odd: RNE
    result = static_cast<uint8_t>(bits >> 20);
    if (result == 0x7f) result = 0x7e;  // rounded into the NaN code: saturate
  }
  return static_cast<uint8_t>(result | (sign >> 24));
}

LONGCTX_HOST_DEVICE float fp8_e4m3_to_float(uint8_t b) {
  const uint32_t sign = uint32_t(b & 0x80) << 24;
  const uint32_t exp = (b >> 3) & 0xF;
  const uint32_t mant = b & 0x7;
  if ((b & 0x7f) == 0x7f) return f32_from_bits(sign | UINT32_C(0x7FC00000));  // NaN
  if (exp == 0) {  // subnormal: mant * 2^-9 (exact)
    const float v = float(mant) * 0.001953125f;
    return sign ? -v : v;
  }
  return f32_from_bits(sign | ((exp + 127 - 7) << 23) | (mant << 20));
}

// fp8: the code stored for x with the per-head scale (> 0).
LONGCTX_HOST_DEVICE uint8_t quantize_fp8(float x, float scale) {
  return float_to_fp8_e4m3(x / scale);
}

LONGCTX_HOST_DEVICE float dequantize_fp8(uint8_t q, float scale) {
  return fp8_e4m3_to_float(q) * scale;
}

// int8: the running largest magnitude of a head's values (start from 0), keeping a NaN.
LONGCTX_HOST_DEVICE float amax_step(float amax, float x) { return max_keep_nan(amax, fabsf(x)); }

// int8: the scale of a (token, head) whose largest magnitude is amax.
LONGCTX_HOST_DEVICE float int8_scale(float amax) { return amax / kInt8Max; }

LONGCTX_HOST_DEVICE int8_t quantize_int8(float x, float scale) {
  if (!(scale > 0.f)) return 0;
  float r = rintf(x / scale);  // round half to even
  if (r != r) return 0;        // NaN input
  r = r > kInt8Max ? kInt8Max : (r < -kInt8Max ? -kInt8Max : r);
  return static_cast<int8_t>(r);
}

LONGCTX_HOST_DEVICE float dequantize_int8(int8_t q, float scale) { return float(q) * scale; }

}  // namespace kvcache
}  // namespace longctx
