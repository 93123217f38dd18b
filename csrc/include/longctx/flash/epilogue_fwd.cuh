// Epilogue of the forward kernel: O (fp32 accumulators, already normalized) -> out (16-bit) and
// the fp32 LSE.
//
// store_o_tma (batched launches at head dims up to 128): each consumer warpgroup converts its 64
// rows, writes them to its own 64 x D smem tile by stmatrix (the Q tile's 128-byte swizzle, no
// bank conflicts) and one of its threads issues a TMA store of the tile; the TMA clips rows
// >= sq and columns >= p.head_dim. The warpgroups never wait for each other. Invariant: a
// warpgroup's previous store has read its smem tile before the tile is rewritten (the issuing
// thread's bulk-group wait, then a warpgroup barrier), and every store has read its tile before
// the CTA exits (store_o_tma_drain). Where both apply it is the faster path: store_o takes 32
// 32-bit stores per thread at hdim 128, each touching 8 rows (docs/kernels/flash_fwd.md).
// store_o (varlen, hdim 256, an out batch stride the TMA cannot take): written straight from
// registers with predicated stores. Each consumer thread holds 2 rows x (D/4) columns of O as
// pairs of adjacent columns; a pair goes out as one 32-bit store, so a quad writes 16 contiguous
// bytes per row. Rows >= sq (tile tail, or the next packed sequence in varlen) are not written,
// nor columns >= p.head_dim (a head dim run on a wider kernel, a multiple of 8).
// store_lse: lane 0 of each quad writes the LSE of its 2 rows. Offsets are 64-bit.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_conversion.h>
#include "longctx/flash/flash_fwd_traits.cuh"
#include "longctx/flash/flash_params.h"
#include "longctx/flash/mainloop_fwd_sm90.cuh"  // kVTailBarrier
#include "longctx/flash/softmax.cuh"  // convert_fragment

namespace longctx {
namespace flash {

// Named barriers of the TMA-store epilogue: kEpilogueBarrier + warpgroup (128 threads each),
// after the main loop's ids (the ping-pong's, then the V tail's).
template <typename Traits>
constexpr uint32_t kEpilogueBarrier = kVTailBarrier<Traits> + 1;

template <typename Traits, typename TensorO>
__device__ __forceinline__ void store_o_tma(typename Traits::SharedStorage& ss,
                                            const typename Traits::TMA_O& tma_o,
                                            const typename Traits::ShapeQKV& shape_o, int mma_tidx,
                                            int m_block, int h, int b, const TensorO& tOrO) {
  using namespace cute;
  using Element = typename Traits::Element;
  const int wg = mma_tidx / 128, wt = mma_tidx % 128;
  using SmemLayoutOWg = typename Traits::SmemLayoutOWg;
  Tensor sO = make_tensor(make_smem_ptr(ss.smem_o.data() + wg * cosize_v<SmemLayoutOWg>),
                          SmemLayoutOWg{});
  Tensor rO = make_tensor<Element>(tOrO.layout());
  convert_fragment(rO, tOrO);
  if (wt == 0) tma_store_wait<0>();  // this warpgroup's previous store has read sO
  cutlass::arch::NamedBarrier::sync(128, kEpilogueBarrier<Traits> + wg);
  auto s2s = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Element>{},
                               typename Traits::TiledMmaOWg{});
  auto thr = s2s.get_thread_slice(wt);
  copy(s2s, thr.retile_S(rO), thr.partition_D(sO));
  cutlass::arch::fence_view_async_shared();
  cutlass::arch::NamedBarrier::sync(128, kEpilogueBarrier<Traits> + wg);
  if (wt == 0) {
    Tensor mO = tma_o.get_tma_tensor(shape_o);
    Tensor gO = local_tile(mO(_, _, h, b), make_shape(_64{}, Int<Traits::kHeadDim>{}),
                           make_coord(m_block * (Traits::kBlockM / 64) + wg, _0{}));
    auto cta = tma_o.get_slice(_0{});
    copy(tma_o, cta.partition_S(sO), cta.partition_D(gO));
    tma_store_arrive();
  }
}

// Before the CTA exits: every TMA store of this warpgroup has read its smem tile.
__device__ __forceinline__ void store_o_tma_drain(int mma_tidx) {
  if (mma_tidx % 128 == 0) cute::tma_store_wait<0>();
}

template <typename Element, typename TensorO, typename TensorC>
__device__ __forceinline__ void store_o(const FwdParams& p, const SeqLen& si, int h, int m0,
                                        const TensorO& tOrO, const TensorC& tOcO) {
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
}

template <typename TensorC>
__device__ __forceinline__ void store_lse(const FwdParams& p, const SeqLen& si, int h, int m0,
                                          const TensorC& tOcO, const float (&lse)[2]) {
  using namespace cute;
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
