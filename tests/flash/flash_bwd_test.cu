// Standalone correctness test of the flash-attention backward (no torch).
//
// For a grid of shapes and masks (head dims 64/128/256 and, on the next of those kernels up,
// 80/96/192; bf16/fp16, causal, windows, GQA/MQA, sq != sk, odd lengths, rows that see no key,
// varlen with empty sequences; logit softcap at 64/128/256, batched and varlen) it draws random
// q, k, v, dout, computes out and lse on the CPU in float64 (rounded to the kernel's input
// types, as the forward would hand them over), runs the backward (preprocess, main,
// postprocess) and compares dq, dk, dv with a float64 reference.
// Tolerance (FlashAttention-3 rule, as tests/support/attention_reference.py's assert_fa3_close
// applies it): max|X - ref| <= 2 * max|X_emu - ref| + atol, with X_emu the same computation done on
// the CPU at the kernel's precision (fp32 scores and dP, P and dS rounded to the 16-bit type before
// the products, outputs rounded) and atol = 2 * max|fl(ref + 0.3) - 0.3 - ref| + 1e-6. Outputs are
// NaN-poisoned first (every element must be written). Each case also runs twice with deterministic
// = true: both runs must pass and be bitwise equal.
// Built by CMake (ctest runs it; exit 77, skipped, without a Hopper GPU). Usage: flash_bwd_test
// [seed] [quick]. Exit code 0 iff every case passes; (head_dim, dtype) pairs the build did not
// compile are skipped.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>
#include "longctx/flash/flash_bwd_dispatch.cuh"
#include "../support/cuda_test_util.cuh"
#include "flash_test_case.h"

using longctx::flash::BwdParams;
using longctx::flash::FlashBwdFn;

static bool run_case(const Case& c, std::mt19937& rng, FlashBwdFn fn) {
  const bool varlen = c.varlen();
  const int B = c.batch();
  std::vector<int> cuq, cuk;
  c.row_offsets(cuq, cuk);
  const int64_t tq = cuq[B], tk = cuk[B];
  const int d = c.d, H = c.h, HK = c.hk, G = H / HK;
  const bool bf = c.bf16;
  const int64_t q_rs = int64_t(H) * d, k_rs = int64_t(HK) * d;
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<uint16_t> hq(tq * q_rs), hk(tk * k_rs), hv(tk * k_rs), hdo(tq * q_rs), ho(tq * q_rs);
  for (auto& x : hq) x = float_to_bits(nd(rng), bf);
  for (auto& x : hk) x = float_to_bits(nd(rng), bf);
  for (auto& x : hv) x = float_to_bits(nd(rng), bf);
  for (auto& x : hdo) x = float_to_bits(nd(rng), bf);
  std::vector<float> hlse(size_t(tq) * H);
  int maxq = 0, maxk = 0;
  for (int i = 0; i < B; ++i) { maxq = std::max(maxq, cuq[i + 1] - cuq[i]); maxk = std::max(maxk, cuk[i + 1] - cuk[i]); }
  const double scale = 1.0 / std::sqrt(double(d));
  // Softcap c: the score x = scale * q.k becomes c tanh(x / c); its derivative 1 - tanh^2
  // multiplies dS (the kernels' scale stays outside, on dQ and dK).
  const double cap = c.softcap;
  auto capped = [&](double x) { return cap != 0 ? cap * std::tanh(x / cap) : x; };
  const int wr = c.causal ? 0 : c.wr, wl = c.wl;
  auto lse_idx = [&](int bi, int hi, int i) -> size_t {
    return varlen ? size_t(hi) * tq + cuq[bi] + i : (size_t(bi) * H + hi) * c.sq + i;
  };
  auto vis = [&](int i, int j, int sq, int sk) {
    return (wr < 0 || j <= i + sk - sq + wr) && (wl < 0 || j >= i + sk - sq - wl);
  };
  auto Q = [&](int bi, int i, int hi, int e) { return double(bits_to_float(hq[(cuq[bi] + i) * q_rs + hi * d + e], bf)); };
  auto K = [&](int bi, int j, int hki, int e) { return double(bits_to_float(hk[(cuk[bi] + j) * k_rs + hki * d + e], bf)); };
  auto V = [&](int bi, int j, int hki, int e) { return double(bits_to_float(hv[(cuk[bi] + j) * k_rs + hki * d + e], bf)); };
  auto DO = [&](int bi, int i, int hi, int e) { return double(bits_to_float(hdo[(cuq[bi] + i) * q_rs + hi * d + e], bf)); };

  // Forward in float64: out (rounded to 16 bits) and lse (fp32), as the forward kernel returns.
  std::vector<double> P64;  // not stored: recomputed in the backward reference
  parallel_for(B * H, [&](int job) {
    const int bi = job / H, hi = job % H, hki = hi / G;
    const int sq = cuq[bi + 1] - cuq[bi], sk = cuk[bi + 1] - cuk[bi];
    std::vector<double> s(sk);
    for (int i = 0; i < sq; ++i) {
      double mx = -INFINITY;
      for (int j = 0; j < sk; ++j) {
        double a = 0;
        if (vis(i, j, sq, sk)) {
          for (int e = 0; e < d; ++e) a += Q(bi, i, hi, e) * K(bi, j, hki, e);
          a = capped(a * scale);
        }
        else a = -INFINITY;
        s[j] = a; mx = std::max(mx, a);
      }
      double sum = 0;
      for (int j = 0; j < sk; ++j) { s[j] = mx == -INFINITY ? 0 : std::exp(s[j] - mx); sum += s[j]; }
      hlse[lse_idx(bi, hi, i)] = sum > 0 ? float(mx + std::log(sum)) : -INFINITY;
      for (int e = 0; e < d; ++e) {
        double o = 0;
        for (int j = 0; j < sk; ++j) if (s[j] != 0) o += s[j] * V(bi, j, hki, e);
        ho[(cuq[bi] + i) * q_rs + hi * d + e] = float_to_bits(sum > 0 ? float(o / sum) : 0.f, bf);
      }
    }
  });

  // Reference (float64, exact P from the float64 softmax) and emulation (kernel precision).
  std::vector<double> rdq(tq * q_rs, 0), rdk(tk * k_rs, 0), rdv(tk * k_rs, 0);
  std::vector<float> edq(tq * q_rs, 0), edk(tk * k_rs, 0), edv(tk * k_rs, 0);
  parallel_for(B * HK, [&](int job) {  // one kv head (and its whole group) per job: no races
    const int bi = job / HK, hki = job % HK;
    const int sq = cuq[bi + 1] - cuq[bi], sk = cuk[bi + 1] - cuk[bi];
    std::vector<double> p(sk), dp(sk), dcap(sk, 1.0);
    std::vector<float> dcapf(sk, 1.f);
    std::vector<float> pf(sk), dpf(sk);
    for (int hi = hki * G; hi < (hki + 1) * G; ++hi)
      for (int i = 0; i < sq; ++i) {
        const float lse = hlse[lse_idx(bi, hi, i)];
        // exact softmax row
        double mx = -INFINITY;
        for (int j = 0; j < sk; ++j) {
          double a = -INFINITY;
          if (vis(i, j, sq, sk)) {
            a = 0; for (int e = 0; e < d; ++e) a += Q(bi, i, hi, e) * K(bi, j, hki, e);
            a *= scale;
            if (cap != 0) { const double t = std::tanh(a / cap); dcap[j] = 1 - t * t; a = cap * t; }
          }
          p[j] = a; mx = std::max(mx, a);
        }
        double sum = 0;
        for (int j = 0; j < sk; ++j) { p[j] = mx == -INFINITY ? 0 : std::exp(p[j] - mx); sum += p[j]; }
        for (int j = 0; j < sk; ++j) if (sum > 0) p[j] /= sum;
        double D = 0; float Df = 0;
        for (int j = 0; j < sk; ++j) {
          double a = 0; float af = 0;
          for (int e = 0; e < d; ++e) { a += DO(bi, i, hi, e) * V(bi, j, hki, e); af += float(DO(bi, i, hi, e)) * float(V(bi, j, hki, e)); }
          dp[j] = a; dpf[j] = af; D += p[j] * a;
          float sf = 0;
          if (vis(i, j, sq, sk) && lse != -INFINITY) {
            for (int e = 0; e < d; ++e) sf += float(Q(bi, i, hi, e)) * float(K(bi, j, hki, e));
            if (cap != 0) {  // the kernels: t = tanh(s * scale / c), P = exp2(t c log2e - lse2)
              const float t = std::tanh(sf * float(scale / cap));
              dcapf[j] = 1.f - t * t;
              pf[j] = std::exp2(t * float(cap * M_LOG2E) - lse * float(M_LOG2E));
            } else {
              pf[j] = std::exp2(sf * float(scale * M_LOG2E) - lse * float(M_LOG2E));
            }
          } else pf[j] = 0.f;
        }
        for (int e = 0; e < d; ++e) Df += float(DO(bi, i, hi, e)) * bits_to_float(ho[(cuq[bi] + i) * q_rs + hi * d + e], bf);
        const size_t qrow = (cuq[bi] + i) * q_rs + hi * d;
        for (int j = 0; j < sk; ++j) {
          const double ds = p[j] * (dp[j] - D) * dcap[j];
          const float dsf = round16(pf[j] * (dpf[j] - Df) * dcapf[j], bf);
          const float p16 = round16(pf[j], bf);
          if (p[j] == 0 && pf[j] == 0) continue;
          const size_t krow = (cuk[bi] + j) * k_rs + hki * d;
          for (int e = 0; e < d; ++e) {
            rdq[qrow + e] += scale * ds * K(bi, j, hki, e);
            rdk[krow + e] += scale * ds * Q(bi, i, hi, e);
            rdv[krow + e] += p[j] * DO(bi, i, hi, e);
            edq[qrow + e] += dsf * float(K(bi, j, hki, e));
            edk[krow + e] += dsf * float(Q(bi, i, hi, e));
            edv[krow + e] += p16 * float(DO(bi, i, hi, e));
          }
        }
      }
  });
  for (auto& x : edq) x = round16(x * float(scale), bf);
  for (auto& x : edk) x = round16(x * float(scale), bf);
  for (auto& x : edv) x = round16(x, bf);

  // Device buffers.
  uint16_t *dq_, *dk_, *dv_, *do_, *o_, *gq, *gk, *gv;
  float *lse_, *dsum, *accum;
  int *sems, *dcuq = nullptr, *dcuk = nullptr;
  auto up = [&](uint16_t** ptr, const std::vector<uint16_t>& h) {
    CK(cudaMalloc(ptr, h.size() * 2 + 16));
    CK(cudaMemcpy(*ptr, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
  };
  up(&gq, hq); up(&gk, hk); up(&gv, hv); up(&do_, hdo); up(&o_, ho);
  CK(cudaMalloc(&dq_, hq.size() * 2 + 16)); CK(cudaMalloc(&dk_, hk.size() * 2 + 16)); CK(cudaMalloc(&dv_, hv.size() * 2 + 16));
  CK(cudaMalloc(&lse_, hlse.size() * 4 + 16));
  CK(cudaMemcpy(lse_, hlse.data(), hlse.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&dsum, hlse.size() * 4 + 16));
  if (varlen) {
    CK(cudaMalloc(&dcuq, (B + 1) * 4)); CK(cudaMalloc(&dcuk, (B + 1) * 4));
    CK(cudaMemcpy(dcuq, cuq.data(), (B + 1) * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dcuk, cuk.data(), (B + 1) * 4, cudaMemcpyHostToDevice));
  }
  BwdParams bp;
  auto& p = bp.fwd;
  p.q = gq; p.k = gk; p.v = gv; p.out = o_; p.lse = lse_;
  p.q_row_stride = q_rs; p.q_head_stride = d; p.q_batch_stride = varlen ? 0 : int64_t(c.sq) * q_rs;
  p.k_row_stride = k_rs; p.k_head_stride = d; p.k_batch_stride = varlen ? 0 : int64_t(c.sk) * k_rs;
  p.v_row_stride = k_rs; p.v_head_stride = d; p.v_batch_stride = p.k_batch_stride;
  p.out_row_stride = q_rs; p.out_head_stride = d; p.out_batch_stride = p.q_batch_stride;
  if (varlen) { p.lse_batch_stride = 0; p.lse_head_stride = tq; }
  else { p.lse_batch_stride = int64_t(H) * c.sq; p.lse_head_stride = c.sq; }
  p.cu_seqlens_q = dcuq; p.cu_seqlens_k = dcuk;
  p.batch = B; p.heads = H; p.heads_kv = HK; p.head_dim = d;
  p.seqlen_q = maxq; p.seqlen_k = maxk;
  p.softmax_scale = float(scale); p.softmax_scale_log2 = float(scale * M_LOG2E);
  p.mods.softcap = c.softcap;
  p.causal = c.causal; p.window_left = wl; p.window_right = wr; p.is_bf16 = bf;
  bp.dout = do_; bp.dq = dq_; bp.dk = dk_; bp.dv = dv_; bp.dsoftmax_sum = dsum;
  bp.dout_row_stride = q_rs; bp.dout_head_stride = d; bp.dout_batch_stride = p.q_batch_stride;
  bp.dq_row_stride = q_rs; bp.dq_head_stride = d; bp.dq_batch_stride = p.q_batch_stride;
  bp.dk_row_stride = k_rs; bp.dk_head_stride = d; bp.dk_batch_stride = p.k_batch_stride;
  bp.dv_row_stride = k_rs; bp.dv_head_stride = d; bp.dv_batch_stride = p.k_batch_stride;
  bp.dsoftmax_sum_batch_stride = p.lse_batch_stride; bp.dsoftmax_sum_head_stride = p.lse_head_stride;
  CK(cudaMalloc(&accum, longctx::flash::flash_bwd_accum_floats(bp, tq) * 4 + 16));
  CK(cudaMalloc(&sems, longctx::flash::flash_bwd_num_sems(bp) * 4 + 16));

  std::vector<uint16_t> gdq[3], gdk[3], gdv[3];
  bool all_ok = true;
  for (int rep = 0; rep < 3; ++rep) {  // atomic, deterministic, deterministic
    bp.deterministic = rep > 0;
    CK(cudaMemset(dq_, 0xFF, hq.size() * 2)); CK(cudaMemset(dk_, 0xFF, hk.size() * 2));
    CK(cudaMemset(dv_, 0xFF, hv.size() * 2));
    CK(fn(bp, tq, tk, accum, sems, 0));
    CK(cudaDeviceSynchronize());
    gdq[rep].resize(hq.size()); gdk[rep].resize(hk.size()); gdv[rep].resize(hv.size());
    CK(cudaMemcpy(gdq[rep].data(), dq_, hq.size() * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(gdk[rep].data(), dk_, hk.size() * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(gdv[rep].data(), dv_, hv.size() * 2, cudaMemcpyDeviceToHost));
    char line[512]; int pos = 0; bool ok = true;
    auto check = [&](const char* nm, const std::vector<uint16_t>& got, const std::vector<double>& ref, const std::vector<float>& emu) {
      double e = 0, ee = 0, at = 0, rs = 0, ds = 0; bool nan = false;
      for (size_t i = 0; i < got.size(); ++i) {
        const double g = bits_to_float(got[i], bf);
        if (!(g == g)) nan = true;
        e = std::max(e, std::fabs(g - ref[i])); ee = std::max(ee, std::fabs(double(emu[i]) - ref[i]));
        at = std::max(at, std::fabs(double(round16(float(ref[i] + 0.3), bf)) - 0.3 - ref[i]));
        rs += ref[i] * ref[i]; ds += (g - ref[i]) * (g - ref[i]);
      }
      const bool o = !nan && e <= 2 * ee + 2 * at + 1e-6;
      ok = ok && o;
      pos += snprintf(line + pos, sizeof line - pos, " %s err=%.2e emu=%.2e rel=%.1e%s", nm, e, ee,
                      rs > 0 ? std::sqrt(ds / rs) : 0.0, nan ? " NaN" : (o ? "" : " BAD"));
    };
    check("dq", gdq[rep], rdq, edq); check("dk", gdk[rep], rdk, edk); check("dv", gdv[rep], rdv, edv);
    bool same = true;
    if (rep == 2) same = gdq[1] == gdq[2] && gdk[1] == gdk[2] && gdv[1] == gdv[2];
    if (rep != 1 || !ok) {  // print the atomic run, the second deterministic run, and failures
      printf("%s%s %-64s%s%s\n", ok && same ? "PASS" : "FAIL", rep ? " det" : "",
             c.name().c_str(), line, same ? "" : " NONDETERMINISTIC");
    }
    all_ok = all_ok && ok && same;
  }
  cudaFree(gq); cudaFree(gk); cudaFree(gv); cudaFree(do_); cudaFree(o_); cudaFree(dq_);
  cudaFree(dk_); cudaFree(dv_); cudaFree(lse_); cudaFree(dsum); cudaFree(accum); cudaFree(sems);
  if (dcuq) { cudaFree(dcuq); cudaFree(dcuk); }
  return all_ok;
}

int main(int argc, char** argv) {
  skip_without_gpu(9);
  std::mt19937 rng(argc > 1 ? atoi(argv[1]) : 1234);
  const bool quick = argc > 2 && std::string(argv[2]) == "quick";
  std::vector<Case> cases;
  for (int d : {128, 64, 256})
    for (bool bf16 : {true, false}) {
      cases.push_back({d, bf16, 2, 2, 2, 256, 256, false, -1, -1, {}, {}});
      cases.push_back({d, bf16, 1, 2, 2, 256, 256, true, -1, -1, {}, {}});
      if (quick && d != 128) continue;
      cases.push_back({d, bf16, 1, 3, 3, 200, 333, true, -1, -1, {}, {}});    // sk > sq, odd
      cases.push_back({d, bf16, 1, 4, 1, 333, 200, true, -1, -1, {}, {}});    // sq > sk: empty rows, MQA
      cases.push_back({d, bf16, 1, 4, 2, 130, 300, false, 50, 0, {}, {}});    // sliding window, GQA
      cases.push_back({d, bf16, 1, 2, 1, 250, 250, false, 64, 32, {}, {}});   // two-sided window
      cases.push_back({d, bf16, 1, 2, 2, 300, 77, false, -1, -1, {}, {}});    // sk < one tile
      add_varlen_pair(cases, d, bf16, {17, 300, 0, 128, 1, 190}, {17, 260, 5, 128, 90, 200},
                      {33, 0, 5, 129, 1, 300});
    }
  cases.push_back({128, true, 1, 4, 1, 1024, 1024, true, -1, -1, {}, {}});   // more tiles, MQA
  cases.push_back({128, true, 2, 4, 4, 777, 1000, false, -1, -1, {}, {}});
  cases.push_back({128, false, 1, 4, 2, 1500, 1400, false, 300, 0, {}, {}});  // sliding window, GQA
  cases.push_back({64, true, 1, 8, 2, 1100, 1100, true, -1, -1, {}, {}});     // hdim 64, many tiles
  for (int d : {64, 128, 256}) {  // logit softcap (Gemma 2): the kernels' kSoftcap copies
    Case sc{d, true, 1, 4, 2, 200, 333, true, -1, -1, {}, {}};
    sc.softcap = 1.5f;  // small enough that tanh saturates on part of the scores
    cases.push_back(sc);
    sc = Case{d, false, 2, 2, 2, 177, 177, false, 64, 16, {}, {}};
    sc.softcap = 4.f;
    cases.push_back(sc);
  }
  Case scv{128, true, 0, 4, 2, 0, 0, true, -1, -1, {17, 0, 300, 1}, {17, 5, 400, 90}};
  scv.softcap = 2.f;  // varlen
  cases.push_back(scv);
  for (int d : {96, 80, 192}) {  // padded head dims: on the next kernel up
    cases.push_back({d, true, 2, 4, 2, 333, 201, false, -1, -1, {}, {}});
    cases.push_back({d, true, 1, 4, 1, 300, 300, true, -1, -1, {}, {}});
    add_varlen_pair(cases, d, true, {17, 0, 300, 1}, {17, 5, 400, 90}, {33, 5, 129, 0});
  }
  int fails = 0, ran = 0;
  for (const auto& c : cases) {
    FlashBwdFn fn = longctx::flash::FlashBwdTable::find(
        longctx::flash::fwd_kernel_head_dim(c.d),
        c.bf16 ? longctx::DType::kBF16 : longctx::DType::kFP16);
    if (!fn) { printf("SKIP %s (not compiled)\n", c.name().c_str()); continue; }
    fails += run_case(c, rng, fn) ? 0 : 1; ++ran;
  }
  printf("%s: %d / %d runs failed\n", fails ? "FAIL" : "PASS", fails, ran);
  return fails ? 1 : 0;
}
