// Flash attention on the CPU: the same tiled online-softmax algorithm as the GPU kernels, in plain
// C++ (framework-free; the caller parallelizes over the task functions below).
//
// Element type T (bf16, fp16, float, double) is converted with static_cast to the accumulator
// type Acc (float, or double for double inputs) on load and back on store; every product, sum and
// exponential runs in Acc. lse is fp32 in natural-log units: lse = log(sum_j exp(scale * q.k_j)).
//
// Tiling: query tiles of kBlockM = 64 rows, KV tiles of kBlockN = 64 keys. A tile's operands are
// copied to contiguous Acc buffers (K and V also transposed, so that every inner loop runs over a
// contiguous, unit-stride index the compiler vectorizes; no loop is a float reduction).
//
// Forward task (batch, head, query tile): for each KV tile in mask.h's fwd_key_tiles range,
//   S = (Q K^T) * scale*log2(e)    (with softcap c: c*log2(e) * tanh(Q K^T * scale / c);
//                                   masked elements -inf; interior tiles skip the mask)
//   m' = max(m, rowmax S); P = exp2(S - m'); l = l*exp2(m - m') + rowsum P;
//   O = O*exp2(m - m') + P V
// then out = O / l and lse = m*ln(2) + ln(l); a row that sees no key gets out 0 and lse -inf.
// A sink (logit_mods.h) starts the row as a key of value 0 already seen: m = sink*log2(e), l = 1.
// Running sums over tiles (O, dQ, dK, dV) add one finished tile product at a time (add_into), so
// an fp32 accumulator's rounding error grows with the number of tiles, not of rows.
//
// Backward, three task kinds (see flash_attn_cpu.cpp for the order and the parallel split):
//   bwd_dot_task    (batch, head, query tile): D = rowsum(dout * out) into dsoftmax_sum.
//   bwd_dkdv_task   (batch, kv head, KV tile): for each query head of the group and each query tile
//                   in bwd_query_tiles: P = exp2(S*scale*log2e - lse*log2e), dV += P^T dO,
//                   dP = dO V^T, dS = P (dP - D) (times 1 - tanh^2 with softcap),
//                   dK += dS^T Q; dK *= scale. The task is the only
//                   writer of its dK/dV rows, and writes them even when no query sees them (zeros).
//   bwd_dq_task     (batch, head, query tile): recomputes P and dS over fwd_key_tiles and
//                   accumulates dQ = scale * dS K; the only writer of its dQ rows.
// Every sum runs in a fixed order, so results are bitwise reproducible for any thread count.
//
// Offsets are int64: a row offset is row * row_stride with row and stride both widened first.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>
#include "longctx/flash/flash_params.h"
#include "longctx/flash/mask.h"
#include "longctx/logit_mods.h"
#include "longctx/max_keep_nan.h"

namespace longctx {
namespace flash {
namespace cpu {

constexpr int kBlockM = 64;
constexpr int kBlockN = 64;

// Element offset of (batch b, row `row` of the sequence, head h) for a tensor with these strides.
inline int64_t row_offset(const FwdParams& p, int b, int64_t start, int64_t row, int h,
                          int64_t batch_stride, int64_t row_stride, int64_t head_stride) {
  const int64_t bo = p.cu_seqlens_q != nullptr ? 0 : int64_t(b) * batch_stride;
  return bo + (start + row) * row_stride + int64_t(h) * head_stride;
}

// Offset of the first lse (or dsoftmax_sum) entry of (b, h); rows are contiguous after it.
inline int64_t lse_offset(const FwdParams& p, int b, int64_t q_start, int h, int64_t batch_stride,
                          int64_t head_stride) {
  const int64_t bo = p.cu_seqlens_q != nullptr ? 0 : int64_t(b) * batch_stride;
  return bo + int64_t(h) * head_stride + q_start;
}

// rows x d tile of a (.., rows, heads, d) tensor into dst[r * d + c] (row-major).
template <typename T, typename Acc>
inline void load_rows(const T* base, int64_t row_stride, int rows, int d, Acc* dst) {
  for (int r = 0; r < rows; ++r) {
    const T* src = base + int64_t(r) * row_stride;
    for (int c = 0; c < d; ++c) dst[int64_t(r) * d + c] = static_cast<Acc>(src[c]);
  }
}

// rows x d tile into dst[c * ld + r] (transposed, leading dimension ld >= rows).
template <typename T, typename Acc>
inline void load_rows_transposed(const T* base, int64_t row_stride, int rows, int d, int ld,
                                 Acc* dst) {
  for (int r = 0; r < rows; ++r) {
    const T* src = base + int64_t(r) * row_stride;
    for (int c = 0; c < d; ++c) dst[int64_t(c) * ld + r] = static_cast<Acc>(src[c]);
  }
}

template <typename T, typename Acc>
inline void store_rows(const Acc* src, int rows, int d, Acc scale, T* base, int64_t row_stride) {
  for (int r = 0; r < rows; ++r) {
    T* dst = base + int64_t(r) * row_stride;
    for (int c = 0; c < d; ++c) dst[c] = static_cast<T>(src[int64_t(r) * d + c] * scale);
  }
}

// C[r * ldc + c] = sum_k A[r * d + k] * BT[k * ldb + c] for r < m, c < n (overwrites C).
template <typename Acc>
inline void gemm_a_bt(const Acc* A, const Acc* BT, int m, int n, int d, int ldb, Acc* C,
                      int ldc) {
  for (int r = 0; r < m; ++r) {
    Acc* crow = C + int64_t(r) * ldc;
    for (int c = 0; c < n; ++c) crow[c] = Acc(0);
    const Acc* arow = A + int64_t(r) * d;
    for (int k = 0; k < d; ++k) {
      const Acc a = arow[k];
      const Acc* brow = BT + int64_t(k) * ldb;
      for (int c = 0; c < n; ++c) crow[c] += a * brow[c];
    }
  }
}

// Two-level accumulation: each tile product is summed into the zeroed scratch tmp (at most 64
// terms per element) and then added to the running accumulator O, so an fp32 accumulator sums
// 64 + (number of tiles) terms in a chain instead of 64 * (number of tiles): the error of long
// sequences and large GQA groups grows like the tile count, not like the row count.
template <typename Acc>
inline void add_into(Acc* O, Acc* tmp, int rows, int d) {
  for (int64_t i = 0, n = int64_t(rows) * d; i < n; ++i) O[i] += tmp[i];
}

// O[r * d + :] += sum_c P[r * ldp + c] * V[c * d + :] for r < m, c < n (through tmp).
template <typename Acc>
inline void gemm_p_v_acc(const Acc* P, int ldp, const Acc* V, int m, int n, int d, Acc* O,
                         Acc* tmp) {
  std::fill(tmp, tmp + int64_t(m) * d, Acc(0));
  for (int r = 0; r < m; ++r) {
    Acc* orow = tmp + int64_t(r) * d;
    const Acc* prow = P + int64_t(r) * ldp;
    for (int c = 0; c < n; ++c) {
      const Acc pc = prow[c];
      if (pc == Acc(0)) continue;
      const Acc* vrow = V + int64_t(c) * d;
      for (int k = 0; k < d; ++k) orow[k] += pc * vrow[k];
    }
  }
  add_into(O, tmp, m, d);
}

// O[c * d + :] += sum_r P[r * ldp + c] * X[r * d + :] for c < n, r < m (O += P^T X), through
// tmp.
template <typename Acc>
inline void gemm_pt_x_acc(const Acc* P, int ldp, const Acc* X, int m, int n, int d, Acc* O,
                          Acc* tmp) {
  std::fill(tmp, tmp + int64_t(n) * d, Acc(0));
  for (int c = 0; c < n; ++c) {
    Acc* orow = tmp + int64_t(c) * d;
    for (int r = 0; r < m; ++r) {
      const Acc pc = P[int64_t(r) * ldp + c];
      if (pc == Acc(0)) continue;
      const Acc* xrow = X + int64_t(r) * d;
      for (int k = 0; k < d; ++k) orow[k] += pc * xrow[k];
    }
  }
  add_into(O, tmp, n, d);
}

// Turns the raw products Q K^T of a tile into scores in log2 units, in place: S *= scale*log2(e),
// or with a softcap c, S = c*log2(e) * tanh(S * scale / c); dtanh (when given) then receives
// 1 - tanh^2, the cap's derivative, for the backward.
template <typename Acc>
inline void scale_scores(Acc* S, int ld, int rows, int cols, Acc scale, Acc softcap, Acc* dtanh) {
  if (softcap == Acc(0)) {
    const Acc scale_log2 = scale * Acc(M_LOG2E);
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) S[int64_t(r) * ld + c] *= scale_log2;
    return;
  }
  const Acc pre = scale / softcap, post = softcap * Acc(M_LOG2E);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) {
      const int64_t i = int64_t(r) * ld + c;
      const Acc t = std::tanh(S[i] * pre);
      S[i] = post * t;
      if (dtanh != nullptr) dtanh[i] = Acc(1) - t * t;
    }
  }
}

// The online softmax's state before the first key of a row of head h: nothing seen (max -inf,
// sum 0) or, with sinks, the sink seen as a key whose value is 0 (max = sink*log2(e), sum = 1);
// a sink of -inf is no sink, a NaN sink makes the row NaN.
template <typename Acc>
inline void init_softmax_row(const LogitMods& mods, int h, Acc& mx, Acc& l) {
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  mx = neg_inf;
  l = Acc(0);
  if (mods.sinks == nullptr) return;
  const Acc s = static_cast<Acc>(mods.sinks[h]) * Acc(M_LOG2E);
  if (s == neg_inf) return;
  mx = s;
  l = Acc(1);
}

// One step of the online softmax over a tile of scores S (log2 units, masked entries -inf):
// updates the running row max mx and row sum l, rescales the output accumulator O (rows x d) when
// a row's max grows, and turns S into P = exp2(S - max) (0 for rows that see nothing yet).
template <typename Acc>
inline void online_softmax_step(Acc* S, int ld, int rows, int cols, int d, Acc* mx, Acc* l,
                                Acc* O) {
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  for (int r = 0; r < rows; ++r) {
    Acc* srow = S + int64_t(r) * ld;
    Acc tile_max = neg_inf;
    for (int c = 0; c < cols; ++c) tile_max = max_keep_nan(tile_max, srow[c]);
    const Acc m_new = max_keep_nan(mx[r], tile_max);  // NaN (from q, k) stays: the row gets NaN
    if (m_new == neg_inf) {  // nothing visible to this row yet: P row is 0
      for (int c = 0; c < cols; ++c) srow[c] = Acc(0);
      continue;
    }
    const Acc alpha = std::exp2(mx[r] - m_new);  // 0 when mx was -inf
    Acc sum = 0;
    for (int c = 0; c < cols; ++c) {
      const Acc e = std::exp2(srow[c] - m_new);
      srow[c] = e;
      sum += e;
    }
    l[r] = l[r] * alpha + sum;
    mx[r] = m_new;
    if (alpha != Acc(1)) {
      Acc* orow = O + int64_t(r) * d;
      for (int k = 0; k < d; ++k) orow[k] *= alpha;
    }
  }
}

template <typename Acc>
inline void mask_tile(Acc* S, int ld, int m_block, int n_block, int rows, int cols, int sq, int sk,
                      int wl, int wr) {
  if (tile_fully_visible(m_block, n_block, kBlockM, kBlockN, sq, sk, wl, wr)) return;
  const int64_t r0 = int64_t(m_block) * kBlockM, c0 = int64_t(n_block) * kBlockN;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c)
      if (!mask_visible(r0 + r, c0 + c, sq, sk, wl, wr))
        S[int64_t(r) * ld + c] = -std::numeric_limits<Acc>::infinity();
}

// Scratch of one worker, sized for head_dim d; reused across its tasks.
template <typename Acc>
struct Workspace {
  std::vector<Acc> q, kt, k, v, vt, s, dp, dtanh, o, dout, rowv, rowv2, tmp;
  explicit Workspace(int d)
      : q(size_t(kBlockM) * d), kt(size_t(d) * kBlockN), k(size_t(kBlockN) * d),
        v(size_t(kBlockN) * d), vt(size_t(d) * kBlockN), s(size_t(kBlockM) * kBlockN),
        dp(size_t(kBlockM) * kBlockN), dtanh(size_t(kBlockM) * kBlockN),
        o(size_t(kBlockM) * d), dout(size_t(kBlockM) * d),
        rowv(kBlockM), rowv2(kBlockM), tmp(size_t(std::max(kBlockM, kBlockN)) * d) {}
};

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
template <typename T, typename Acc>
void fwd_task(const FwdParams& p, int b, int h, int m_block, Workspace<Acc>& ws) {
  const SeqLen sb = sequence(p, b);
  const int64_t r0 = int64_t(m_block) * kBlockM;
  if (r0 >= sb.sq) return;  // varlen: this sequence is shorter than max_seqlen_q
  const int rows = static_cast<int>(std::min<int64_t>(kBlockM, sb.sq - r0));
  const int d = p.head_dim;
  const int hk = h / (p.heads / p.heads_kv);
  const Acc scale = static_cast<Acc>(p.softmax_scale);
  const Acc softcap = static_cast<Acc>(p.mods.softcap);

  const T* q = static_cast<const T*>(p.q) +
               row_offset(p, b, sb.q_start, r0, h, p.q_batch_stride, p.q_row_stride,
                          p.q_head_stride);
  load_rows(q, p.q_row_stride, rows, d, ws.q.data());
  Acc* O = ws.o.data();
  Acc* mx = ws.rowv.data();
  Acc* l = ws.rowv2.data();
  std::fill(O, O + int64_t(rows) * d, Acc(0));
  for (int r = 0; r < rows; ++r) init_softmax_row(p.mods, h, mx[r], l[r]);

  const TileRange tiles =
      fwd_key_tiles(m_block, kBlockM, kBlockN, sb.sq, sb.sk, p.window_left, p.window_right);
  for (int n = tiles.begin; n < tiles.end; ++n) {
    const int64_t c0 = int64_t(n) * kBlockN;
    const int cols = static_cast<int>(std::min<int64_t>(kBlockN, sb.sk - c0));
    const T* k = static_cast<const T*>(p.k) +
                 row_offset(p, b, sb.k_start, c0, hk, p.k_batch_stride, p.k_row_stride,
                            p.k_head_stride);
    const T* v = static_cast<const T*>(p.v) +
                 row_offset(p, b, sb.k_start, c0, hk, p.v_batch_stride, p.v_row_stride,
                            p.v_head_stride);
    load_rows_transposed(k, p.k_row_stride, cols, d, kBlockN, ws.kt.data());
    load_rows(v, p.v_row_stride, cols, d, ws.v.data());

    Acc* S = ws.s.data();
    gemm_a_bt(ws.q.data(), ws.kt.data(), rows, cols, d, kBlockN, S, kBlockN);
    scale_scores(S, kBlockN, rows, cols, scale, softcap, static_cast<Acc*>(nullptr));
    mask_tile(S, kBlockN, m_block, n, rows, cols, sb.sq, sb.sk, p.window_left, p.window_right);

    online_softmax_step(S, kBlockN, rows, cols, d, mx, l, O);
    gemm_p_v_acc(S, kBlockN, ws.v.data(), rows, cols, d, O, ws.tmp.data());
  }

  T* out = static_cast<T*>(p.out) +
           row_offset(p, b, sb.q_start, r0, h, p.out_batch_stride, p.out_row_stride,
                      p.out_head_stride);
  float* lse = p.lse + lse_offset(p, b, sb.q_start, h, p.lse_batch_stride, p.lse_head_stride) + r0;
  for (int r = 0; r < rows; ++r) {
    T* orow = out + int64_t(r) * p.out_row_stride;
    if (l[r] == Acc(0)) {  // the row sees no key
      for (int c = 0; c < d; ++c) orow[c] = static_cast<T>(Acc(0));
      lse[r] = -std::numeric_limits<float>::infinity();
      continue;
    }
    const Acc inv = std::isnan(mx[r]) ? mx[r] : Acc(1) / l[r];  // a NaN sink reaches out too
    for (int c = 0; c < d; ++c) orow[c] = static_cast<T>(O[int64_t(r) * d + c] * inv);
    lse[r] = static_cast<float>(mx[r] * Acc(M_LN2) + std::log(l[r]));
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// D = rowsum(dout * out) for one query tile, into dsoftmax_sum.
template <typename T, typename Acc>
void bwd_dot_task(const BwdParams& bp, int b, int h, int m_block) {
  const FwdParams& p = bp.fwd;
  const SeqLen sb = sequence(p, b);
  const int64_t r0 = int64_t(m_block) * kBlockM;
  if (r0 >= sb.sq) return;
  const int rows = static_cast<int>(std::min<int64_t>(kBlockM, sb.sq - r0));
  const T* o = static_cast<const T*>(p.out) +
               row_offset(p, b, sb.q_start, r0, h, p.out_batch_stride, p.out_row_stride,
                          p.out_head_stride);
  const T* dout = static_cast<const T*>(bp.dout) +
                  row_offset(p, b, sb.q_start, r0, h, bp.dout_batch_stride, bp.dout_row_stride,
                             bp.dout_head_stride);
  float* D = bp.dsoftmax_sum +
             lse_offset(p, b, sb.q_start, h, bp.dsoftmax_sum_batch_stride,
                        bp.dsoftmax_sum_head_stride) + r0;
  for (int r = 0; r < rows; ++r) {
    const T* orow = o + int64_t(r) * p.out_row_stride;
    const T* drow = dout + int64_t(r) * bp.dout_row_stride;
    Acc sum = 0;
    for (int c = 0; c < p.head_dim; ++c)
      sum += static_cast<Acc>(orow[c]) * static_cast<Acc>(drow[c]);
    D[r] = static_cast<float>(sum);
  }
}

// Loads Q and dO of one query tile, and the row constants lse*log2(e) and D, for head h.
// Returns the number of valid rows.
template <typename T, typename Acc>
int bwd_load_query_tile(const BwdParams& bp, const SeqLen& sb, int b, int h, int m_block,
                        Workspace<Acc>& ws) {
  const FwdParams& p = bp.fwd;
  const int64_t r0 = int64_t(m_block) * kBlockM;
  const int rows = static_cast<int>(std::min<int64_t>(kBlockM, sb.sq - r0));
  const T* q = static_cast<const T*>(p.q) +
               row_offset(p, b, sb.q_start, r0, h, p.q_batch_stride, p.q_row_stride,
                          p.q_head_stride);
  const T* dout = static_cast<const T*>(bp.dout) +
                  row_offset(p, b, sb.q_start, r0, h, bp.dout_batch_stride, bp.dout_row_stride,
                             bp.dout_head_stride);
  load_rows(q, p.q_row_stride, rows, p.head_dim, ws.q.data());
  load_rows(dout, bp.dout_row_stride, rows, p.head_dim, ws.dout.data());
  const float* lse =
      p.lse + lse_offset(p, b, sb.q_start, h, p.lse_batch_stride, p.lse_head_stride) + r0;
  const float* D = bp.dsoftmax_sum +
                   lse_offset(p, b, sb.q_start, h, bp.dsoftmax_sum_batch_stride,
                              bp.dsoftmax_sum_head_stride) + r0;
  for (int r = 0; r < rows; ++r) {
    ws.rowv[r] = static_cast<Acc>(lse[r]) * Acc(M_LOG2E);
    ws.rowv2[r] = static_cast<Acc>(D[r]);
  }
  return rows;
}

// With ws.q/dout/rowv/rowv2 (query tile) and ws.kt/vt (KV tile) loaded: P into ws.s and dS into
// ws.dp (dS with respect to the uncapped scaled score, i.e. including the softcap's derivative).
// Masked elements and rows that see nothing (lse = -inf) get P = dS = 0.
template <typename Acc>
void bwd_p_ds(const FwdParams& p, const SeqLen& sb, int m_block, int n_block, int rows,
              int cols, Workspace<Acc>& ws) {
  const int d = p.head_dim;
  const Acc softcap = static_cast<Acc>(p.mods.softcap);
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  Acc* S = ws.s.data();
  Acc* dP = ws.dp.data();
  Acc* dtanh = softcap != Acc(0) ? ws.dtanh.data() : nullptr;
  gemm_a_bt(ws.q.data(), ws.kt.data(), rows, cols, d, kBlockN, S, kBlockN);
  scale_scores(S, kBlockN, rows, cols, static_cast<Acc>(p.softmax_scale), softcap, dtanh);
  mask_tile(S, kBlockN, m_block, n_block, rows, cols, sb.sq, sb.sk, p.window_left,
            p.window_right);
  for (int r = 0; r < rows; ++r) {
    Acc* srow = S + int64_t(r) * kBlockN;
    const Acc lse2 = ws.rowv[r];
    if (lse2 == neg_inf) {
      for (int c = 0; c < cols; ++c) srow[c] = Acc(0);
    } else {
      for (int c = 0; c < cols; ++c) srow[c] = std::exp2(srow[c] - lse2);  // exp2(-inf) = 0
    }
  }
  gemm_a_bt(ws.dout.data(), ws.vt.data(), rows, cols, d, kBlockN, dP, kBlockN);
  for (int r = 0; r < rows; ++r) {
    const Acc Dr = ws.rowv2[r];
    for (int c = 0; c < cols; ++c) {
      const int64_t i = int64_t(r) * kBlockN + c;
      dP[i] = S[i] * (dP[i] - Dr);
    }
  }
  if (dtanh != nullptr) {
    for (int r = 0; r < rows; ++r) {
      for (int c = 0; c < cols; ++c) {
        const int64_t i = int64_t(r) * kBlockN + c;
        dP[i] *= dtanh[i];
      }
    }
  }
}

// Loads K (row-major and transposed) and V (transposed) of one KV tile. Returns the key count.
template <typename T, typename Acc>
int bwd_load_key_tile(const FwdParams& p, const SeqLen& sb, int b, int hk, int n_block,
                      Workspace<Acc>& ws) {
  const int64_t c0 = int64_t(n_block) * kBlockN;
  const int cols = static_cast<int>(std::min<int64_t>(kBlockN, sb.sk - c0));
  const T* k = static_cast<const T*>(p.k) +
               row_offset(p, b, sb.k_start, c0, hk, p.k_batch_stride, p.k_row_stride,
                          p.k_head_stride);
  const T* v = static_cast<const T*>(p.v) +
               row_offset(p, b, sb.k_start, c0, hk, p.v_batch_stride, p.v_row_stride,
                          p.v_head_stride);
  load_rows(k, p.k_row_stride, cols, p.head_dim, ws.k.data());
  load_rows_transposed(k, p.k_row_stride, cols, p.head_dim, kBlockN, ws.kt.data());
  load_rows_transposed(v, p.v_row_stride, cols, p.head_dim, kBlockN, ws.vt.data());
  return cols;
}

// dK and dV of one KV tile of kv head hk: sums over the query heads of its group.
// dacc must hold 2 * kBlockN * head_dim Acc values (dK then dV).
template <typename T, typename Acc>
void bwd_dkdv_task(const BwdParams& bp, int b, int hk, int n_block, Workspace<Acc>& ws,
                   Acc* dacc) {
  const FwdParams& p = bp.fwd;
  const SeqLen sb = sequence(p, b);
  const int64_t c0 = int64_t(n_block) * kBlockN;
  if (c0 >= sb.sk) return;
  const int d = p.head_dim;
  const int cols = bwd_load_key_tile<T, Acc>(p, sb, b, hk, n_block, ws);
  Acc* dK = dacc;
  Acc* dV = dacc + int64_t(kBlockN) * d;
  std::fill(dK, dK + int64_t(cols) * d, Acc(0));
  std::fill(dV, dV + int64_t(cols) * d, Acc(0));

  const TileRange tiles =
      bwd_query_tiles(n_block, kBlockM, kBlockN, sb.sq, sb.sk, p.window_left, p.window_right);
  const int group = p.heads / p.heads_kv;
  for (int g = 0; g < group; ++g) {
    const int h = hk * group + g;
    for (int m = tiles.begin; m < tiles.end; ++m) {
      const int rows = bwd_load_query_tile<T, Acc>(bp, sb, b, h, m, ws);
      bwd_p_ds(p, sb, m, n_block, rows, cols, ws);
      // dV += P^T dO; dK += dS^T Q
      gemm_pt_x_acc(ws.s.data(), kBlockN, ws.dout.data(), rows, cols, d, dV, ws.tmp.data());
      gemm_pt_x_acc(ws.dp.data(), kBlockN, ws.q.data(), rows, cols, d, dK, ws.tmp.data());
    }
  }
  const Acc scale = static_cast<Acc>(p.softmax_scale);
  T* dk = static_cast<T*>(bp.dk) +
          row_offset(p, b, sb.k_start, c0, hk, bp.dk_batch_stride, bp.dk_row_stride,
                     bp.dk_head_stride);
  T* dv = static_cast<T*>(bp.dv) +
          row_offset(p, b, sb.k_start, c0, hk, bp.dv_batch_stride, bp.dv_row_stride,
                     bp.dv_head_stride);
  store_rows(dK, cols, d, scale, dk, bp.dk_row_stride);
  store_rows(dV, cols, d, Acc(1), dv, bp.dv_row_stride);
}

// dQ of one query tile of head h: dQ = scale * sum over visible KV tiles of dS K.
template <typename T, typename Acc>
void bwd_dq_task(const BwdParams& bp, int b, int h, int m_block, Workspace<Acc>& ws) {
  const FwdParams& p = bp.fwd;
  const SeqLen sb = sequence(p, b);
  const int64_t r0 = int64_t(m_block) * kBlockM;
  if (r0 >= sb.sq) return;
  const int d = p.head_dim;
  const int hk = h / (p.heads / p.heads_kv);
  const int rows = bwd_load_query_tile<T, Acc>(bp, sb, b, h, m_block, ws);
  Acc* dQ = ws.o.data();
  std::fill(dQ, dQ + int64_t(rows) * d, Acc(0));
  const TileRange tiles =
      fwd_key_tiles(m_block, kBlockM, kBlockN, sb.sq, sb.sk, p.window_left, p.window_right);
  for (int n = tiles.begin; n < tiles.end; ++n) {
    const int cols = bwd_load_key_tile<T, Acc>(p, sb, b, hk, n, ws);
    bwd_p_ds(p, sb, m_block, n, rows, cols, ws);
    // dQ += dS K
    gemm_p_v_acc(ws.dp.data(), kBlockN, ws.k.data(), rows, cols, d, dQ, ws.tmp.data());
  }
  T* dq = static_cast<T*>(bp.dq) +
          row_offset(p, b, sb.q_start, r0, h, bp.dq_batch_stride, bp.dq_row_stride,
                     bp.dq_head_stride);
  store_rows(dQ, rows, d, static_cast<Acc>(p.softmax_scale), dq, bp.dq_row_stride);
}

}  // namespace cpu
}  // namespace flash
}  // namespace longctx
