// The global-memory view the flash kernels build their TMA descriptors on: a q/k/v-like tensor
// as (rows, D, heads, batch) with element strides (row, 1, head, batch). Varlen passes the packed
// tensor as batch 1 with rows = its total rows; a batch stride must be valid for the TMA even
// where the batch extent is 1, so there it is rows x row stride (rows at least 1).
#pragma once
#include <cstdint>
#include <cute/tensor.hpp>

namespace longctx {
namespace flash {

template <typename Element, typename Shape>
auto tma_view(const void* ptr, const Shape& shape, int64_t row_stride, int64_t head_stride,
              int64_t batch_stride, bool one_batch, int rows) {
  using namespace cute;
  const int64_t bs = one_batch ? int64_t(row_stride) * (rows > 0 ? rows : 1) : batch_stride;
  return make_tensor(make_gmem_ptr(static_cast<const Element*>(ptr)), shape,
                     make_stride(row_stride, _1{}, head_stride, bs));
}

}  // namespace flash
}  // namespace longctx
