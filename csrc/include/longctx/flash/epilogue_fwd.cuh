// Epilogue of the forward kernel: O (fp32 accumulators, already normalized) -> out (16-bit) and
// the fp32 LSE, written straight from registers with predicated stores.
//
// Each consumer thread holds 2 rows x (D/4) columns of O as pairs of adjacent columns; a pair
// goes out as one 32-bit store, so a quad writes 16 contiguous bytes per row and a warp covers
// 8 rows x 16 B per instruction (the L2 merges them; the output is O(sq*D), negligible next to
// the O(sq*sk*D) main loop). Rows >= sq (tile tail, or the next packed sequence in varlen) are
// not written, nor columns >= p.head_dim (a head dim run on a wider kernel, a multiple of 8).
// Lane 0 of each quad writes the LSE of its 2 rows. Offsets are 64-bit.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>
#include "longctx/flash/flash_params.h"

namespace longctx {
namespace flash {

template <typename Element, typename TensorO, typename TensorC>
__device__ __forceinline__ void store_o_lse(const FwdParams& p, const SeqLen& si, int h,
                                            int m0, const TensorO& tOrO, const TensorC& tOcO,
                                            const float (&lse)[2]) {
  using namespace cute;
  Element* out = static_cast<Element*>(p.out);
  const int64_t base = (si.packed_q ? 0 : int64_t(si.b) * p.out_batch_stride) +
                       int64_t(h) * p.out_head_stride;
  // tOrO: ((2, 2, D/8), 1, 1); mode (0,0) = adjacent columns, (0,1) = row +8.
  #pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int row = m0 + int(get<0>(tOcO(make_coord(0, rr, 0), 0, 0)));
    if (row < si.sq) {
      Element* orow = out + base + int64_t(si.q_start + row) * p.out_row_stride;
      #pragma unroll
      for (int v = 0; v < size<0, 2>(tOrO); ++v) {
        const int col = int(get<1>(tOcO(make_coord(0, rr, v), 0, 0)));
        if (col >= p.head_dim) continue;
        cutlass::Array<float, 2> f;
        f[0] = tOrO(make_coord(0, rr, v), 0, 0);
        f[1] = tOrO(make_coord(1, rr, v), 0, 0);
        cutlass::NumericArrayConverter<Element, float, 2> cvt;
        cutlass::Array<Element, 2> o = cvt(f);
        *reinterpret_cast<cutlass::Array<Element, 2>*>(orow + col) = o;
      }
    }
  }
  if ((threadIdx.x & 3) == 0) {
    float* lse_ptr = p.lse + si.lse_offset(p.lse_batch_stride) + int64_t(h) * p.lse_head_stride;
    #pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int row = m0 + int(get<0>(tOcO(make_coord(0, rr, 0), 0, 0)));
      if (row < si.sq) lse_ptr[row] = lse[rr];
    }
  }
}

}  // namespace flash
}  // namespace longctx
