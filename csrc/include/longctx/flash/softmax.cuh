// Online softmax over the rows of S tiles held in wgmma accumulator registers (fp32, exp2).
//
// Each consumer thread holds kNRows = 2 rows of its warpgroup's 64-row slice; the values of a
// row are spread over the 4 threads of a quad (lanes 4r..4r+3), so row reductions are a
// per-thread loop plus two shfl_xor (1, 2). For each new tile: m_new = max(m_old, rowmax(S)),
// P = exp2(S * scale_log2 - m_new * scale_log2) (one FFMA + ex2 per element), the O rescale
// factor exp2((m_old - m_new) * scale_log2) is returned for the caller to apply, and the
// thread-partial row sum is rescaled and accumulated (quad-reduced only in finalize).
// Invariants: fully masked rows keep m = -inf; their P is exactly 0 (the max used in the
// exponent is replaced by 0), their sum stays 0, finalize gives inv_sum = 0 (out = 0) and
// lse = -inf. A NaN score (from q or k) makes P and the row sum NaN (fmaxf leaves it out of the
// max, the exponent keeps it), and finalize keeps it: out and lse are NaN in that row, not the
// empty row's 0 and -inf. lse is natural-log: m * softmax_scale + log(sum).
// Sinks (logit_mods.h) join at finalize only, as one more key of value 0 with logit `sink`
// (natural-log units, like m * softmax_scale): with M = max(m, sink) the denominator is
// sum * e^(m - M) + e^(sink - M), lse = M + log(that) and inv_sum = e^(m - M) / (that); an empty
// row gets out = 0 and lse = sink exactly. A sink of -inf takes the sink-free code (bitwise no
// sink); a NaN sink enters the denominator explicitly, so every row of its head is NaN.
// With softcap the scores the softmax sees are tanh values and softmax_scale is the cap c.
// Also the register-fragment helpers the forward and backward kernels share: acc_layout_rowcol,
// acc_layout_to_A_regs, convert_fragment (fp32 accumulators to 16-bit operands).
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>
#include <math_constants.h>

namespace longctx {
namespace flash {

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

// SM90 accumulator layout ((2, 2, V), MMA_M, MMA_N) -> (rows (2, MMA_M), cols (2, V, MMA_N)).
template <typename Layout>
__device__ __forceinline__ auto acc_layout_rowcol(Layout l) {
  using namespace cute;
  static_assert(decltype(rank<0>(l))::value == 3);
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)),
                     make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// SM90 accumulator layout ((2, 2, N/8), MMA_M, MMA_N) -> A-operand register layout of an RS
// wgmma with K = N: ((2, 2, 2), MMA_M, (N/16, MMA_N)). 16-bit types only.
template <typename Layout>
__device__ __forceinline__ auto acc_layout_to_A_regs(Layout acc) {
  using namespace cute;
  using X = Underscore;
  auto l = logical_divide(get<0>(acc), Shape<X, X, _2>{});
  return make_layout(make_layout(get<0>(l), get<1>(l), get<2, 0>(l)), get<1>(acc),
                     make_layout(get<2, 1>(l), get<2>(acc)));
}

// The fp32 register fragment src converted element by element into the register fragment dst
// (16-bit; same size, register order kept: dst may view the accumulator layout as an A operand).
template <typename TensorD, typename TensorS>
__device__ __forceinline__ void convert_fragment(TensorD& dst, const TensorS& src) {
  using To = typename TensorD::value_type;
  constexpr int N = decltype(cute::size(src))::value;
  static_assert(decltype(cute::size(dst))::value == N, "fragment sizes differ");
  cutlass::NumericArrayConverter<To, float, N> cvt;
  *reinterpret_cast<cutlass::Array<To, N>*>(dst.data()) =
      cvt(*reinterpret_cast<const cutlass::Array<float, N>*>(src.data()));
}

template <int kNRows>
struct OnlineSoftmax {
  float row_max[kNRows];
  float row_sum[kNRows];
  float scale_log2;

  __device__ __forceinline__ explicit OnlineSoftmax(float scale_log2_) : scale_log2(scale_log2_) {
    #pragma unroll
    for (int r = 0; r < kNRows; ++r) { row_max[r] = -CUDART_INF_F; row_sum[r] = 0.f; }
  }

  // S (rows x cols view) is overwritten with P; scale_o[r] is the factor to apply to O's row r.
  template <typename TensorRC>
  __device__ __forceinline__ void step(TensorRC& S, float (&scale_o)[kNRows]) {
    static_assert(decltype(cute::size<0>(S))::value == kNRows);
    #pragma unroll
    for (int r = 0; r < kNRows; ++r) {
      float m = row_max[r];
      #pragma unroll
      for (int c = 0; c < cute::size<1>(S); ++c) m = fmaxf(m, S(r, c));
      m = quad_max(m);
      const float m_scaled = (m == -CUDART_INF_F) ? 0.f : m * scale_log2;
      scale_o[r] = fast_exp2(row_max[r] * scale_log2 - m_scaled);
      row_max[r] = m;
      float s = 0.f;
      #pragma unroll
      for (int c = 0; c < cute::size<1>(S); ++c) {
        const float p = fast_exp2(S(r, c) * scale_log2 - m_scaled);
        S(r, c) = p;
        s += p;
      }
      row_sum[r] = row_sum[r] * scale_o[r] + s;
    }
  }

  // First tile: O is zero, no rescale factor needed.
  template <typename TensorRC>
  __device__ __forceinline__ void first_step(TensorRC& S) {
    float dummy[kNRows];
    step(S, dummy);
  }

  // inv_sum[r] multiplies O's row r; lse[r] is the natural-log LSE (valid in every quad lane).
  // sink: the head's sink logit, -inf for none.
  __device__ __forceinline__ void finalize(float softmax_scale, float sink,
                                           float (&inv_sum)[kNRows], float (&lse)[kNRows]) {
    #pragma unroll
    for (int r = 0; r < kNRows; ++r) {
      const float s = quad_sum(row_sum[r]);
      if (sink == -CUDART_INF_F) {
        const bool empty = s == 0.f;  // no key seen; a NaN sum is not empty (NaN out and lse)
        inv_sum[r] = empty ? 0.f : 1.f / s;
        lse[r] = empty ? -CUDART_INF_F : row_max[r] * softmax_scale + logf(s);
      } else {
        // Empty row: m = -inf, total = 1, lse = sink, inv_sum = 0. fmaxf drops a NaN sink from
        // M, but its own term e^(sink - M) is NaN and reaches total.
        const float m = row_max[r] * softmax_scale;
        const float M = fmaxf(m, sink);
        const float wm = expf(m - M);
        const float total = s * wm + expf(sink - M);
        inv_sum[r] = wm / total;
        lse[r] = M + logf(total);
      }
    }
  }
};

template <typename TensorRC, int kNRows>
__device__ __forceinline__ void rescale_rows(TensorRC& O, const float (&scale)[kNRows]) {
  #pragma unroll
  for (int r = 0; r < kNRows; ++r) {
    #pragma unroll
    for (int c = 0; c < cute::size<1>(O); ++c) O(r, c) *= scale[r];
  }
}

}  // namespace flash
}  // namespace longctx
