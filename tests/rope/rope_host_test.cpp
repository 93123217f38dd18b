// Standalone test of the framework-free RoPE host loop (rope_host.h): random fp32 inputs, NeoX and
// interleaved, partial rotary, positions around 2^21, against a float64 reference.
// Exit code 0 on success; prints the worst error per case.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>
#include "longctx/rope/rope_host.h"

using longctx::rope::Params;

static double reference(const std::vector<float>& x, int64_t t, int h, int c, const Params& p,
                        const std::vector<int64_t>& pos, const std::vector<float>& inv) {
  const int64_t base = (t * p.q.heads + h) * p.head_dim;
  if (c >= 2 * p.n_freq) return x[base + c];
  int i, c1, c2;
  if (p.interleaved) { i = c / 2; c1 = 2 * i; c2 = c1 + 1; }
  else { i = c % p.n_freq; c1 = i; c2 = i + p.n_freq; }
  const double ang = static_cast<double>(pos[t]) * static_cast<double>(inv[i]);
  const double cs = std::cos(ang) * p.scale, sn = std::sin(ang) * p.scale;
  const double x1 = x[base + c1], x2 = x[base + c2];
  return c == c1 ? x1 * cs - x2 * sn : x2 * cs + x1 * sn;
}

static int run_case(bool interleaved, int head_dim, int rotary_dim, int64_t pos_center) {
  const int64_t T = 97;
  const int H = 3;
  std::mt19937_64 rng(1234 + head_dim + rotary_dim + interleaved);
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int64_t> upos(pos_center, pos_center + 5000);
  std::vector<float> x(T * H * head_dim), y(x.size());
  for (auto& v : x) v = normal(rng);
  std::vector<int64_t> pos(T);
  for (auto& v : pos) v = upos(rng);
  const int n = rotary_dim / 2;
  std::vector<float> inv(n);
  for (int i = 0; i < n; ++i) inv[i] = static_cast<float>(std::pow(10000.0, -2.0 * i / rotary_dim));

  Params p;
  p.q.in = x.data();
  p.q.out = y.data();
  p.q.heads = H;
  p.q.in_stride_s = p.q.out_stride_s = H * head_dim;
  p.q.in_stride_h = p.q.out_stride_h = head_dim;
  p.positions = pos.data();
  p.positions_int64 = true;
  p.pos_stride_s = 1;
  p.inv_freq = inv.data();
  p.n_freq = n;
  p.head_dim = head_dim;
  p.batch = 1;
  p.seqlen = T;
  p.scale = 1.25f;
  p.interleaved = interleaved;
  p.inplace = false;
  longctx::rope::rope_tokens_host<float>(p, 0, T);

  double worst = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int h = 0; h < H; ++h)
      for (int c = 0; c < head_dim; ++c)
        worst = std::fmax(worst, std::fabs(y[(t * H + h) * head_dim + c] -
                                           reference(x, t, h, c, p, pos, inv)));
  const bool ok = worst < 2e-5;
  std::printf("%s interleaved=%d head_dim=%d rotary=%d pos~%lld: max abs err %.3g\n",
              ok ? "PASS" : "FAIL", interleaved, head_dim, rotary_dim,
              static_cast<long long>(pos_center), worst);
  return ok ? 0 : 1;
}

int main() {
  int failures = 0;
  for (bool il : {false, true})
    for (int64_t center : {int64_t{0}, int64_t{1} << 20, int64_t{1} << 21})
      for (auto dims : {std::pair{128, 128}, std::pair{128, 64}, std::pair{64, 32}}) {
        failures += run_case(il, dims.first, dims.second, center);
      }
  std::printf("%d passed, %d failed\n", 18 - failures, failures);
  return failures == 0 ? 0 : 1;
}
