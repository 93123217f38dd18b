// Zeroing the tail rows of a shared-memory operand tile, shared by the forward (V rows of the
// next packed sequence, mainloop_fwd_sm90.cuh) and the backward (K/V and Q/dO rows,
// flash_bwd_cta.cuh): rows [row0, rows) of a (rows, D) tile, kThreads threads (tid in
// [0, kThreads)), then the proxy fence the wgmma reads of the tile need. 16-byte stores: the
// tiles' swizzles permute 16-byte chunks, so 8 elements from a multiple of 8 columns are
// contiguous. The caller orders the writes before the readers (a barrier).
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

namespace longctx {
namespace flash {

template <int kThreads, typename TensorT>
__device__ __forceinline__ void zero_tail_rows(TensorT&& t, int row0, int tid) {
  using namespace cute;
  constexpr int kRows = decltype(size<0>(t))::value, kChunks = decltype(size<1>(t))::value / 8;
  for (int i = tid; i < (kRows - row0) * kChunks; i += kThreads)
    *reinterpret_cast<uint4*>(&t(row0 + i / kChunks, (i % kChunks) * 8)) = make_uint4(0, 0, 0, 0);
  cutlass::arch::fence_view_async_shared();  // generic-proxy writes before the wgmma reads
}

}  // namespace flash
}  // namespace longctx
