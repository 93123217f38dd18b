// Per-element mask of one S = Q K^T tile held in wgmma accumulator registers.
//
// Sets S(i, j) = -inf where key j is invisible to query i: j >= sk, or outside the window
// [i + sk - sq - left, i + sk - sq + right] (bounds with a negative size are unbounded). i and j
// are positions inside the sequence: i = m_block*kBlockM + row, j = n_block*kBlockN + col, where
// (row, col) come from an identity tensor partitioned like the accumulator (tScS).
// Only called on tiles that kv_tile_needs_mask flags; interior tiles skip it.
#pragma once
#include <cute/tensor.hpp>
#include <math_constants.h>

namespace longctx {
namespace flash {

template <typename TensorS, typename TensorC>
__device__ __forceinline__ void apply_mask(TensorS& tSrS, const TensorC& tScS, int m0, int n0,
                                           int sq, int sk, int window_left, int window_right) {
  const int diag = sk - sq;
  #pragma unroll
  for (int i = 0; i < cute::size(tSrS); ++i) {
    const int row = m0 + int(cute::get<0>(tScS(i)));
    const int col = n0 + int(cute::get<1>(tScS(i)));
    bool vis = col < sk;
    if (window_right >= 0) vis = vis && (col <= row + diag + window_right);
    if (window_left >= 0) vis = vis && (col >= row + diag - window_left);
    if (!vis) tSrS(i) = -CUDART_INF_F;
  }
}

}  // namespace flash
}  // namespace longctx
