// Standalone correctness test of the Hopper flash-attention forward kernel (no torch).
//
// For a grid of shapes and masks (head dims 64/128/256, bf16/fp16, causal, windows, GQA/MQA,
// seqlen_q != seqlen_k, lengths that are not multiples of the tiles, rows that see no key,
// strided (packed qkv) inputs, varlen with a zero-length sequence, logit softcap) it runs the
// kernel on random inputs and compares with a CPU float64 reference computed from the same
// 16-bit inputs (with softcap c the scores are c tanh(s / c)).
// Tolerance (FlashAttention-3 rule): max |out - ref| <= 2 * max |emu - ref| + atol, where emu is
// the same computation done on the CPU at the kernel's precision (fp32 scores, P rounded to the
// 16-bit type before P V, output rounded). lse (fp32, natural log) must match within 1e-3 (plus
// tanh.approx's bound with softcap) and be -inf exactly where the reference is. Outputs are
// poisoned with NaN first (every element must be written), and the kernel is run twice, with
// the dynamic and then the static tile schedule: results must be bitwise identical.
// Built by CMake (ctest runs it; exit 77, skipped, without a Hopper GPU). Usage: flash_fwd_test
// [seed] [quick]; quick runs only the small cases (for compute-sanitizer). Exit code 0 iff every
// case passes; (head_dim, dtype) pairs the build did not compile are skipped.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <algorithm>
#include <atomic>
#include <functional>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>
#include "longctx/flash/flash_fwd_dispatch.cuh"
#include "../support/cuda_test_util.cuh"
#include "flash_test_case.h"

using longctx::flash::FwdParams;

static bool run_case(const Case& c, std::mt19937& rng) {
  const bool varlen = c.varlen();
  const int B = c.batch();
  std::vector<int> cuq, cuk;
  c.row_offsets(cuq, cuk);
  const int64_t tq = cuq[B], tk = cuk[B];
  const int d = c.d, H = c.h, HK = c.hk;
  // Host layout: rows of (heads, d); q row r of all sequences at offset r*q_rs.
  const int64_t q_rs = c.packed_qkv ? 3LL * H * d : int64_t(H) * d;
  const int64_t k_rs = c.packed_qkv ? 3LL * H * d : int64_t(HK) * d;
  std::vector<uint16_t> hq, hk, hv;
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<uint16_t> hbuf;
  if (c.packed_qkv) {
    hbuf.resize(size_t(tq) * q_rs);
    for (auto& x : hbuf) x = float_to_bits(nd(rng), c.bf16);
  } else {
    hq.resize(size_t(tq) * q_rs); hk.resize(size_t(tk) * k_rs); hv.resize(size_t(tk) * k_rs);
    for (auto& x : hq) x = float_to_bits(nd(rng), c.bf16);
    for (auto& x : hk) x = float_to_bits(nd(rng), c.bf16);
    for (auto& x : hv) x = float_to_bits(nd(rng), c.bf16);
  }
  const uint16_t* Q = c.packed_qkv ? hbuf.data() : hq.data();
  const uint16_t* K = c.packed_qkv ? hbuf.data() + H * d : hk.data();
  const uint16_t* V = c.packed_qkv ? hbuf.data() + 2 * H * d : hv.data();

  uint16_t *dbuf = nullptr, *dq = nullptr, *dk = nullptr, *dv = nullptr, *dout = nullptr;
  float* dlse = nullptr;
  int *dcuq = nullptr, *dcuk = nullptr;
  if (c.packed_qkv) {
    CK(cudaMalloc(&dbuf, hbuf.size() * 2));
    CK(cudaMemcpy(dbuf, hbuf.data(), hbuf.size() * 2, cudaMemcpyHostToDevice));
    dq = dbuf; dk = dbuf + H * d; dv = dbuf + 2 * H * d;
  } else {
    CK(cudaMalloc(&dq, hq.size() * 2 + 16)); CK(cudaMalloc(&dk, hk.size() * 2 + 16));
    CK(cudaMalloc(&dv, hv.size() * 2 + 16));
    CK(cudaMemcpy(dq, hq.data(), hq.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dk, hk.data(), hk.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dv, hv.data(), hv.size() * 2, cudaMemcpyHostToDevice));
  }
  const size_t n_out = size_t(tq) * H * d, n_lse = size_t(tq) * H;
  CK(cudaMalloc(&dout, n_out * 2 + 16));
  CK(cudaMalloc(&dlse, n_lse * 4 + 16));
  if (varlen) {
    CK(cudaMalloc(&dcuq, (B + 1) * 4)); CK(cudaMalloc(&dcuk, (B + 1) * 4));
    CK(cudaMemcpy(dcuq, cuq.data(), (B + 1) * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dcuk, cuk.data(), (B + 1) * 4, cudaMemcpyHostToDevice));
  }

  FwdParams p;
  p.q = dq; p.k = dk; p.v = dv; p.out = dout; p.lse = dlse;
  p.q_row_stride = q_rs; p.q_head_stride = d; p.q_batch_stride = varlen ? 0 : int64_t(c.sq) * q_rs;
  p.k_row_stride = k_rs; p.k_head_stride = d; p.k_batch_stride = varlen ? 0 : int64_t(c.sk) * k_rs;
  p.v_row_stride = k_rs; p.v_head_stride = d; p.v_batch_stride = p.k_batch_stride;
  p.out_row_stride = int64_t(H) * d; p.out_head_stride = d;
  p.out_batch_stride = varlen ? 0 : int64_t(c.sq) * H * d;
  if (varlen) { p.lse_batch_stride = 0; p.lse_head_stride = tq; }
  else { p.lse_batch_stride = int64_t(H) * c.sq; p.lse_head_stride = c.sq; }
  p.cu_seqlens_q = dcuq; p.cu_seqlens_k = dcuk;
  p.batch = B; p.heads = H; p.heads_kv = HK; p.head_dim = d;
  int maxq = 0, maxk = 0;
  for (int i = 0; i < B; ++i) { maxq = std::max(maxq, cuq[i + 1] - cuq[i]); maxk = std::max(maxk, cuk[i + 1] - cuk[i]); }
  p.seqlen_q = maxq; p.seqlen_k = maxk;
  p.softmax_scale = 1.f / std::sqrt(float(d));
  p.softmax_scale_log2 = p.softmax_scale * float(M_LOG2E);
  p.causal = c.causal; p.window_left = c.wl; p.window_right = c.causal ? 0 : c.wr;
  p.is_bf16 = c.bf16;
  p.mods.softcap = c.softcap;

  auto fn = longctx::flash::FlashFwdTable::find(
      d, c.bf16 ? longctx::DType::kBF16 : longctx::DType::kFP16);
  if (!fn) { printf("SKIP %s (not compiled)\n", c.name().c_str()); return true; }
  std::vector<uint16_t> out1(n_out), out2(n_out);
  std::vector<float> lse1(n_lse), lse2(n_lse);
  static int* counter = nullptr;
  if (!counter) CK(cudaMalloc(&counter, sizeof(int)));
  for (int rep = 0; rep < 2; ++rep) {
    CK(cudaMemset(dout, 0xFF, n_out * 2));  // NaN poison
    CK(cudaMemset(dlse, 0xFF, n_lse * 4));
    CK(fn(p, tq, tk, rep == 0 ? counter : nullptr, 0));  // dynamic, then static schedule
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(rep ? out2.data() : out1.data(), dout, n_out * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(rep ? lse2.data() : lse1.data(), dlse, n_lse * 4, cudaMemcpyDeviceToHost));
  }
  const bool deterministic = memcmp(out1.data(), out2.data(), n_out * 2) == 0 &&
                             memcmp(lse1.data(), lse2.data(), n_lse * 4) == 0;

  // Reference per (sequence, head), parallel over heads x sequences.
  std::vector<double> err_ours(B * H, 0), err_emu(B * H, 0), err_lse(B * H, 0), ref_sq(B * H, 0),
      diff_sq(B * H, 0);
  std::vector<int> bad(B * H, 0);
  const double scale = p.softmax_scale;
  const double cap = c.softcap;
  const float capf = c.softcap, scale_cap = cap != 0 ? float(scale / cap) : 0.f;
  parallel_for(B * H, [&](int job) {
    const int bi = job / H, hi = job % H, hki = hi / (H / HK);
    const int sq = cuq[bi + 1] - cuq[bi], sk = cuk[bi + 1] - cuk[bi];
    std::vector<double> s(sk);
    std::vector<float> sf(sk);
    std::vector<float> kf(size_t(sk) * d), vf(size_t(sk) * d), qf(d);
    std::vector<double> od(d);
    std::vector<float> ofl(d);
    for (int j = 0; j < sk; ++j)
      for (int e = 0; e < d; ++e) {
        kf[size_t(j) * d + e] = bits_to_float(K[(cuk[bi] + j) * k_rs + hki * d + e], c.bf16);
        vf[size_t(j) * d + e] = bits_to_float(V[(cuk[bi] + j) * k_rs + hki * d + e], c.bf16);
      }
    for (int i = 0; i < sq; ++i) {
      for (int e = 0; e < d; ++e) qf[e] = bits_to_float(Q[(cuq[bi] + i) * q_rs + hi * d + e], c.bf16);
      double mx = -INFINITY; float mxf = -INFINITY;
      for (int j = 0; j < sk; ++j) {
        bool vis = true;
        if (p.window_right >= 0) vis = vis && j <= i + sk - sq + p.window_right;
        if (p.window_left >= 0) vis = vis && j >= i + sk - sq - p.window_left;
        double acc = 0; float accf = 0;
        if (vis) for (int e = 0; e < d; ++e) { acc += double(qf[e]) * kf[size_t(j) * d + e]; accf += qf[e] * kf[size_t(j) * d + e]; }
        if (cap != 0) {
          s[j] = vis ? cap * std::tanh(acc * scale / cap) : -INFINITY;
          sf[j] = vis ? capf * std::tanh(accf * scale_cap) : -INFINITY;
        } else {
          s[j] = vis ? acc * scale : -INFINITY;
          sf[j] = vis ? accf * float(scale) : -INFINITY;
        }
        mx = std::max(mx, s[j]); mxf = std::max(mxf, sf[j]);
      }
      double sum = 0; float sumf = 0;
      for (int j = 0; j < sk; ++j) {
        s[j] = (mx == -INFINITY) ? 0 : std::exp(s[j] - mx); sum += s[j];
        sf[j] = (mxf == -INFINITY) ? 0 : std::exp(sf[j] - mxf); sumf += sf[j];
      }
      const size_t orow = size_t(cuq[bi] + i) * H * d + size_t(hi) * d;
      const size_t lidx = varlen ? size_t(hi) * tq + cuq[bi] + i : (size_t(bi) * H + hi) * c.sq + i;
      // P V with the keys outermost (rows of V are contiguous); each output element still sums
      // its keys in ascending order. Keys with P = 0 in both (masked) add nothing.
      std::fill(od.begin(), od.end(), 0.0);
      std::fill(ofl.begin(), ofl.end(), 0.f);
      for (int j = 0; j < sk; ++j) {
        if (s[j] == 0 && sf[j] == 0) continue;
        const double pj = s[j];
        const float pjf = round16(sf[j], c.bf16);
        const float* vr = &vf[size_t(j) * d];
        for (int e = 0; e < d; ++e) { od[e] += pj * vr[e]; ofl[e] += pjf * vr[e]; }
      }
      for (int e = 0; e < d; ++e) {
        const double o = sum > 0 ? od[e] / sum : 0;
        const float of = sumf > 0 ? round16(ofl[e] / sumf, c.bf16) : 0;
        const double ours = bits_to_float(out1[orow + e], c.bf16);
        const double eo = std::fabs(ours - o);
        if (!(eo == eo)) bad[job] = 1;  // NaN: unwritten or broken
        err_ours[job] = std::max(err_ours[job], eo);
        err_emu[job] = std::max(err_emu[job], std::fabs(double(of) - o));
        ref_sq[job] += o * o; diff_sq[job] += (ours - o) * (ours - o);
      }
      const double lref = sum > 0 ? mx + std::log(sum) : -INFINITY;
      const double lours = lse1[lidx];
      if (lref == -INFINITY) { if (lours != -INFINITY) bad[job] = 1; }
      else {
        const double el = std::fabs(lours - lref);
        if (!(el == el)) bad[job] = 1;
        err_lse[job] = std::max(err_lse[job], el);
      }
    }
  });
  double eo = 0, ee = 0, el = 0, rs = 0, ds = 0; int nbad = 0;
  for (int j = 0; j < B * H; ++j) {
    eo = std::max(eo, err_ours[j]); ee = std::max(ee, err_emu[j]); el = std::max(el, err_lse[j]);
    rs += ref_sq[j]; ds += diff_sq[j]; nbad += bad[j];
  }
  const double atol = c.bf16 ? 2e-3 : 5e-4;
  // With softcap the kernel's scores carry tanh.approx's error (relative 2^-10.987, so up to
  // c * 4.9e-4 absolute), which the lse inherits; the emulation uses an exact tanh.
  const double lse_tol = 1e-3 + (c.softcap != 0.f ? c.softcap * 4.9e-4 : 0.0);
  const bool ok = nbad == 0 && deterministic && eo <= 2 * ee + atol && el <= lse_tol;
  printf("%s %-72s max_err=%.3e emu_err=%.3e rel_l2=%.2e lse_err=%.2e%s%s\n", ok ? "PASS" : "FAIL",
         c.name().c_str(), eo, ee, rs > 0 ? std::sqrt(ds / rs) : 0.0, el,
         deterministic ? "" : " NONDETERMINISTIC", nbad ? " NaN/-inf mismatch" : "");
  if (dbuf) cudaFree(dbuf); else { cudaFree(dq); cudaFree(dk); cudaFree(dv); }
  cudaFree(dout); cudaFree(dlse);
  if (dcuq) { cudaFree(dcuq); cudaFree(dcuk); }
  return ok;
}

int main(int argc, char** argv) {
  skip_without_gpu(9);
  std::mt19937 rng(argc > 1 ? atoi(argv[1]) : 1234);
  std::vector<Case> cases;
  for (int d : {128, 64, 256})
    for (bool bf16 : {true, false}) {
      cases.push_back({d, bf16, 2, 4, 4, 256, 256, false, -1, -1});
      cases.push_back({d, bf16, 2, 4, 4, 256, 256, true, -1, -1});
      cases.push_back({d, bf16, 1, 3, 3, 200, 333, true, -1, -1});     // sk > sq, odd
      cases.push_back({d, bf16, 1, 4, 1, 333, 200, true, -1, -1});     // sq > sk: empty rows, MQA
      cases.push_back({d, bf16, 2, 8, 2, 1, 1000, true, -1, -1});      // decode, GQA
      cases.push_back({d, bf16, 1, 2, 2, 500, 517, false, 100, 0});    // sliding window causal
      cases.push_back({d, bf16, 1, 2, 1, 450, 450, false, 64, 32});    // two-sided window
      cases.push_back({d, bf16, 1, 2, 2, 300, 77, false, -1, -1});     // sk < one tile
      add_varlen_pair(cases, d, bf16, {17, 300, 0, 128, 1, 257}, {17, 400, 5, 128, 90, 200},
                      {33, 0, 5, 129, 1, 700});
    }
  cases.push_back({128, true, 2, 4, 4, 1100, 1100, true, -1, -1, {}, {}, true});   // packed qkv
  cases.push_back({128, true, 1, 2, 2, 2048, 2048, false, -1, -1});
  cases.push_back({128, true, 1, 2, 2, 2048, 2048, false, 300, 300});
  cases.push_back({64, true, 1, 2, 2, 1, 5000, false, -1, -1});
  cases.push_back({128, true, 1, 2, 1, 8192, 8192, true, -1, -1});  // long causal, GQA
  // More tiles than SMs: persistent CTAs run several query tiles each.
  cases.push_back({128, true, 4, 16, 4, 1024, 1024, true, -1, -1});
  cases.push_back({128, false, 4, 16, 16, 1024, 1024, false, -1, -1});
  cases.push_back({64, true, 2, 32, 8, 700, 900, true, -1, -1});
  cases.push_back({256, true, 2, 16, 16, 600, 600, false, 200, 0});
  {
    Case vl{128, true, 0, 32, 8, 0, 0, true, -1, -1};
    vl.lens_q = {17, 300, 0, 128, 1, 257, 640};
    vl.lens_k = {17, 400, 5, 128, 90, 200, 640};
    cases.push_back(vl);
  }
  // Logit softcap (Gemma 2): the main loop's kSoftcap copy.
  for (int d : {64, 128, 256}) {
    Case sc{d, true, 2, 4, 2, 300, 333, true, -1, -1};
    sc.softcap = 1.5f;  // small enough that tanh saturates on part of the scores
    cases.push_back(sc);
    sc = Case{d, false, 1, 2, 2, 450, 450, false, 64, 32};
    sc.softcap = 4.f;
    cases.push_back(sc);
  }
  {
    Case vl{128, true, 0, 4, 2, 0, 0, true, -1, -1};
    vl.lens_q = {17, 300, 0, 128, 1};
    vl.lens_k = {17, 400, 5, 128, 90};
    vl.softcap = 2.f;
    cases.push_back(vl);
  }
  // "quick": only the small cases (for compute-sanitizer runs).
  const bool quick = argc > 2 && std::string(argv[2]) == "quick";
  int fails = 0, ran = 0;
  for (const auto& c : cases) {
    if (quick && (int64_t(c.sq) * c.sk > 300000 || !c.lens_q.empty() && c.h > 8 || c.h * c.b > 16)) continue;
    fails += run_case(c, rng) ? 0 : 1;
    ++ran;
  }
  cases.resize(ran);
  printf("%s: %d / %zu cases failed\n", fails ? "FAIL" : "PASS", fails, cases.size());
  return fails ? 1 : 0;
}
