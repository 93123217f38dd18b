// RoPE on the host: the same computation as rope_kernel.cuh, one token range at a time, so a
// caller can split tokens across threads. Element type T needs static_cast to and from float
// (float, c10::BFloat16, c10::Half). Framework-free.
#pragma once
#include <vector>
#include "longctx/rope/rope_math.h"
#include "longctx/rope/rope_params.h"

namespace longctx {
namespace rope {

template <typename T>
void rotate_head_host(const HeadsView& h, int64_t b, int64_t s, int head, const Params& p,
                      const CosSin* cs) {
  const T* in = static_cast<const T*>(h.in) + b * h.in_stride_b + s * h.in_stride_s +
                head * h.in_stride_h;
  T* out = static_cast<T*>(h.out) + b * h.out_stride_b + s * h.out_stride_s +
           head * h.out_stride_h;
  for (int i = 0; i < p.n_freq; ++i) {
    const int i1 = p.interleaved ? 2 * i : i;
    const int i2 = p.interleaved ? 2 * i + 1 : i + p.n_freq;
    float x1 = static_cast<float>(in[i1]);
    float x2 = static_cast<float>(in[i2]);
    rotate(x1, x2, cs[i]);
    out[i1] = static_cast<T>(x1);
    out[i2] = static_cast<T>(x2);
  }
  if (!p.inplace) {
    for (int c = 2 * p.n_freq; c < p.head_dim; ++c) out[c] = in[c];
  }
}

template <typename T>
void rope_tokens_host(const Params& p, int64_t t_begin, int64_t t_end) {
  std::vector<CosSin> cs(p.n_freq);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t b = t / p.seqlen, s = t % p.seqlen;
    const int64_t off = b * p.pos_stride_b + s * p.pos_stride_s;
    const float pos = p.positions_int64
                          ? static_cast<float>(static_cast<const int64_t*>(p.positions)[off])
                          : static_cast<float>(static_cast<const int32_t*>(p.positions)[off]);
    for (int f = 0; f < p.n_freq; ++f) cs[f] = cos_sin(pos, p.inv_freq[f], p.scale, p.inverse);
    for (int h = 0; h < p.q.heads; ++h) rotate_head_host<T>(p.q, b, s, h, p, cs.data());
    for (int h = 0; h < p.k.heads; ++h) rotate_head_host<T>(p.k, b, s, h, p, cs.data());
  }
}

}  // namespace rope
}  // namespace longctx
