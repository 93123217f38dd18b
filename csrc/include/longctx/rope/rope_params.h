// Plain-data description of one RoPE launch: raw pointers and element strides, no torch types.
//
// q and k are viewed as (batch, seqlen, heads, head_dim) with the last dimension contiguous; the
// packed (tokens, heads, head_dim) layout is batch = 1. Positions are (batch, seqlen) with a
// batch stride of 0 when one position vector is shared by the whole batch. The first
// rotary_dim = 2 * n_freq channels of each head are rotated; for an out-of-place launch the
// rest are copied through, in place they are left untouched.
#pragma once
#include <cstdint>

namespace longctx {
namespace rope {

struct HeadsView {
  const void* in = nullptr;
  void* out = nullptr;  // == in for an in-place launch
  int64_t in_stride_b = 0, in_stride_s = 0, in_stride_h = 0;
  int64_t out_stride_b = 0, out_stride_s = 0, out_stride_h = 0;
  int heads = 0;
};

struct Params {
  HeadsView q, k;
  const void* positions = nullptr;
  bool positions_int64 = true;
  int64_t pos_stride_b = 0, pos_stride_s = 0;
  const float* inv_freq = nullptr;
  int n_freq = 0;    // rotary_dim / 2
  int head_dim = 0;
  int64_t batch = 0, seqlen = 0;
  float scale = 1.f;  // attention factor applied to the rotated channels
  bool interleaved = false;  // pairs (2i, 2i+1); otherwise NeoX pairs (i, i + rotary_dim/2)
  bool inverse = false;      // rotate by -angle (the backward)
  bool inplace = true;       // out == in; channels past rotary_dim are then left alone
};

}  // namespace rope
}  // namespace longctx
