// The paged KV cache on the CPU: append (RoPE on K, quantize on write) and attention over the
// cache with dequantization on load. Framework-free; the caller parallelizes over the task
// functions (csrc/kvcache/kvcache_cpu.cpp). T is the element type of the new tokens, q and out
// (float, c10::BFloat16, c10::Half: anything static_cast to and from float); F the cache format.
//
// Append, one task per new token (it is the only writer of its slot): for K and then V, each kv
// head is loaded to fp32; K is rotated (rope_math.h's cos_sin / rotate, pairs NeoX or
// interleaved as in rope_host.h) and rounded to T, so the stored value equals apply_rope + append;
// then it is stored as T, as int8 with its (token, head) scale, or as fp8 with the head's scale.
//
// Attention, one task per (sequence, kv head, tile of 64 packed query rows, split): the rows of
// the group's heads/kv_heads query heads are packed as r = i * group + g (query i, head
// hk * group + g, FlashAttention-3's PackGQA), so each key tile is gathered from its pages and
// dequantized once for the whole group. The key tiles a task visits are the union of mask.h's
// fwd_key_tiles of its query rows (tiles of 64 keys from key 0, whatever the page size); each
// tile is processed exactly as flash_cpu.h's fwd_task does it (S = Q K^T * scale * log2 e,
// mask, online softmax with exp2, O += P V through the two-level accumulator), so:
//  - a native cache gives bitwise the result of flash_attn_varlen_func on the gathered K/V;
//  - every row's arithmetic depends only on its own query and the keys, never on which other
//    rows share its tile, so chunked prefill equals a single pass bitwise (num_splits == 1).
// Softcap and sinks (logit_mods.h) as in flash_cpu.h; a row's sink joins its split 0 only.
// A key whose page id is invalid (only possible with validate=False) is masked.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include "longctx/flash/flash_cpu.h"
#include "longctx/flash/mask.h"
#include "longctx/kvcache/append_token.h"
#include "longctx/kvcache/kvcache_params.h"
#include "longctx/kvcache/paged.h"
#include "longctx/kvcache/quant.h"
#include "longctx/rope/rope_math.h"

namespace longctx {
namespace kvcache {
namespace cpu {

constexpr int kBlockM = flash::cpu::kBlockM;  // packed query rows per task
constexpr int kBlockN = flash::cpu::kBlockN;  // keys per tile

// ---------------------------------------------------------------------------------------------
// Element store / load with the cache format
// ---------------------------------------------------------------------------------------------

// Stores head_dim fp32 values of one (page, slot, head) in format F.
template <typename T, Format F>
inline void store_head(const CacheView& cv, int64_t page, int slot, int head, const float* x,
                       int d) {
  const int64_t off = elem_offset(cv, page, slot, head);
  if constexpr (F == Format::kNative) {
    T* dst = static_cast<T*>(cv.data) + off;
    for (int c = 0; c < d; ++c) dst[c] = static_cast<T>(x[c]);
  } else if constexpr (F == Format::kInt8) {
    float amax = 0.f;
    for (int c = 0; c < d; ++c) amax = amax_step(amax, x[c]);
    const float scale = int8_scale(amax);
    int8_t* dst = static_cast<int8_t*>(cv.data) + off;
    for (int c = 0; c < d; ++c) dst[c] = quantize_int8(x[c], scale);
    cv.token_scale[scale_offset(cv, page, slot, head)] = scale;
  } else {
    const float scale = cv.head_scale[head];
    uint8_t* dst = static_cast<uint8_t*>(cv.data) + off;
    for (int c = 0; c < d; ++c) dst[c] = quantize_fp8(x[c], scale);
  }
}

// Loads one (page, slot, head) as fp32 into dst[c * ld] (ld = 1: a row; ld = kBlockN: a column
// of a transposed tile).
template <typename T, Format F>
inline void load_head(const CacheView& cv, int64_t page, int slot, int head, int d, float* dst,
                      int64_t ld) {
  const int64_t off = elem_offset(cv, page, slot, head);
  if constexpr (F == Format::kNative) {
    const T* src = static_cast<const T*>(cv.data) + off;
    for (int c = 0; c < d; ++c) dst[c * ld] = static_cast<float>(src[c]);
  } else if constexpr (F == Format::kInt8) {
    const float scale = cv.token_scale[scale_offset(cv, page, slot, head)];
    const int8_t* src = static_cast<const int8_t*>(cv.data) + off;
    for (int c = 0; c < d; ++c) dst[c * ld] = dequantize_int8(src[c], scale);
  } else {
    const float scale = cv.head_scale[head];
    const uint8_t* src = static_cast<const uint8_t*>(cv.data) + off;
    for (int c = 0; c < d; ++c) dst[c * ld] = dequantize_fp8(src[c], scale);
  }
}

// ---------------------------------------------------------------------------------------------
// Append
// ---------------------------------------------------------------------------------------------

// Writes new token `row` (packed row, or b * seqlen_new + i for the batched layout; its geometry:
// append_token.h). buf: head_dim floats of scratch; cs: n_freq entries of scratch.
template <typename T, Format F>
void append_token(const AppendParams& p, int64_t row, float* buf, rope::CosSin* cs) {
  const PagedKV& c = p.cache;
  const AppendToken tok = append_token_at(p, row);
  const Slot s = locate(c, tok.b, tok.t);
  if (!s.valid) return;  // only reachable with validate=False: never write outside the pool
  const int d = c.head_dim;
  const T* k = static_cast<const T*>(p.k) + tok.k_off;
  const T* v = static_cast<const T*>(p.v) + tok.v_off;

  if (p.inv_freq != nullptr) {
    const float pos = append_rope_position(p, tok, row);
    for (int f = 0; f < p.n_freq; ++f)
      cs[f] = rope::cos_sin(pos, p.inv_freq[f], p.rope_scale, /*inverse=*/false);
  }
  for (int h = 0; h < c.kv_heads; ++h) {
    const T* src = k + int64_t(h) * p.k_head_stride;
    for (int ch = 0; ch < d; ++ch) buf[ch] = static_cast<float>(src[ch]);
    if (p.inv_freq != nullptr) {
      for (int f = 0; f < p.n_freq; ++f) {
        const int i1 = p.rope_interleaved ? 2 * f : f;
        const int i2 = p.rope_interleaved ? 2 * f + 1 : f + p.n_freq;
        rope::rotate(buf[i1], buf[i2], cs[f]);
        buf[i1] = static_cast<float>(static_cast<T>(buf[i1]));  // as apply_rope stores it
        buf[i2] = static_cast<float>(static_cast<T>(buf[i2]));
      }
    }
    store_head<T, F>(c.k, s.page, s.slot, h, buf, d);
  }
  for (int h = 0; h < c.kv_heads; ++h) {
    const T* src = v + int64_t(h) * p.v_head_stride;
    for (int ch = 0; ch < d; ++ch) buf[ch] = static_cast<float>(src[ch]);
    store_head<T, F>(c.v, s.page, s.slot, h, buf, d);
  }
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------

// Key tiles [begin, end) of packed query rows [r0, r0 + rows): the union of the rows' ranges.
inline flash::TileRange packed_key_tiles(const AttnParams& p, const SeqLen& s, int group, int64_t r0,
                                         int rows) {
  flash::TileRange u;
  bool any = false;
  const int64_t i_first = r0 / group, i_last = (r0 + rows - 1) / group;
  for (int64_t i = i_first; i <= i_last; ++i) {
    const flash::TileRange t =
        flash::fwd_key_tiles(static_cast<int>(i), 1, kBlockN, s.sq, s.sk, p.window_left,
                             p.window_right);
    if (t.begin >= t.end) continue;
    u.begin = any ? std::min(u.begin, t.begin) : t.begin;
    u.end = any ? std::max(u.end, t.end) : t.end;
    any = true;
  }
  return u;
}

// Gathers key tile n (keys [n * kBlockN, + cols)) of kv head hk: K transposed into ws.kt, V into
// ws.v, valid[c] = whether key c's page may be read (invalid keys are zero-filled and masked).
template <typename T, Format F>
int load_kv_tile(const AttnParams& p, int b, int hk, int n, const SeqLen& s,
                 flash::cpu::Workspace<float>& ws, bool* valid) {
  const int64_t c0 = int64_t(n) * kBlockN;
  const int cols = static_cast<int>(std::min<int64_t>(kBlockN, int64_t(s.sk) - c0));
  const int d = p.cache.head_dim;
  for (int c = 0; c < cols; ++c) {
    const Slot sl = locate(p.cache, b, c0 + c);
    valid[c] = sl.valid;
    if (!sl.valid) {
      for (int k = 0; k < d; ++k) ws.kt[int64_t(k) * kBlockN + c] = 0.f;
      std::fill(ws.v.begin() + int64_t(c) * d, ws.v.begin() + int64_t(c + 1) * d, 0.f);
      continue;
    }
    load_head<T, F>(p.cache.k, sl.page, sl.slot, hk, d, ws.kt.data() + c, kBlockN);
    load_head<T, F>(p.cache.v, sl.page, sl.slot, hk, d, ws.v.data() + int64_t(c) * d, 1);
  }
  return cols;
}

// One (sequence b, kv head hk, packed query tile m_block, split) task.
template <typename T, Format F>
void attn_task(const AttnParams& p, int b, int hk, int m_block, int split,
               flash::cpu::Workspace<float>& ws) {
  const SeqLen s = sequence(p, b);
  const int group = p.heads / p.cache.kv_heads;
  const int64_t R = int64_t(s.sq) * group;
  const int64_t r0 = int64_t(m_block) * kBlockM;
  if (r0 >= R) return;
  const int rows = static_cast<int>(std::min<int64_t>(kBlockM, R - r0));
  const int d = p.cache.head_dim;
  const int sq = s.sq, sk = s.sk;
  const int wl = p.window_left, wr = p.window_right;
  const float neg_inf = -std::numeric_limits<float>::infinity();

  for (int r = 0; r < rows; ++r) {
    const int64_t i = (r0 + r) / group;
    const int h = hk * group + static_cast<int>((r0 + r) % group);
    const T* q = static_cast<const T*>(p.q) + s.q_offset(p.q_batch_stride, p.q_row_stride) +
                 i * p.q_row_stride +
                 int64_t(h) * p.q_head_stride;
    for (int c = 0; c < d; ++c) ws.q[int64_t(r) * d + c] = static_cast<float>(q[c]);
  }
  float* O = ws.o.data();
  float* mx = ws.rowv.data();
  float* l = ws.rowv2.data();
  std::fill(O, O + int64_t(rows) * d, 0.f);
  // The sinks join split 0 only: the merge then counts each once.
  const LogitMods no_sinks{nullptr, p.mods.softcap};
  const LogitMods& start = split == 0 ? p.mods : no_sinks;
  for (int r = 0; r < rows; ++r)
    flash::cpu::init_softmax_row(start, hk * group + static_cast<int>((r0 + r) % group), mx[r],
                                 l[r]);

  const flash::TileRange all = packed_key_tiles(p, s, group, r0, rows);
  const int64_t ntiles = std::max(0, all.end - all.begin);
  const int t_begin = all.begin + static_cast<int>(ntiles * split / p.num_splits);
  const int t_end = all.begin + static_cast<int>(ntiles * (split + 1) / p.num_splits);
  const int64_t i_first = r0 / group, i_last = (r0 + rows - 1) / group;
  bool valid[kBlockN];
  for (int n = t_begin; n < t_end; ++n) {
    const int64_t c0 = int64_t(n) * kBlockN;
    const int cols = load_kv_tile<T, F>(p, b, hk, n, s, ws, valid);
    float* S = ws.s.data();
    flash::cpu::gemm_a_bt(ws.q.data(), ws.kt.data(), rows, cols, d, kBlockN, S, kBlockN);
    flash::cpu::scale_scores(S, kBlockN, rows, cols, p.softmax_scale, p.mods.softcap,
                             static_cast<float*>(nullptr));
    bool all_valid = true;
    for (int c = 0; c < cols; ++c) all_valid = all_valid && valid[c];
    // Monotone bounds: the last row's lower bound and the first row's upper bound decide.
    const bool full = all_valid && flash::mask_visible(i_last, c0, sq, sk, wl, wr) &&
                      flash::mask_visible(i_first, c0 + cols - 1, sq, sk, wl, wr);
    if (!full) {
      for (int r = 0; r < rows; ++r) {
        const int64_t i = (r0 + r) / group;
        for (int c = 0; c < cols; ++c)
          if (!valid[c] || !flash::mask_visible(i, c0 + c, sq, sk, wl, wr))
            S[int64_t(r) * kBlockN + c] = neg_inf;
      }
    }
    flash::cpu::online_softmax_step(S, kBlockN, rows, cols, d, mx, l, O);
    flash::cpu::gemm_p_v_acc(S, kBlockN, ws.v.data(), rows, cols, d, O, ws.tmp.data());
  }

  for (int r = 0; r < rows; ++r) {
    const int64_t i = (r0 + r) / group;
    const int h = hk * group + static_cast<int>((r0 + r) % group);
    const bool empty = l[r] == 0.f;
    const float inv = empty ? 0.f : std::isnan(mx[r]) ? mx[r] : 1.f / l[r];
    const float lse = empty ? neg_inf : mx[r] * float(M_LN2) + std::log(l[r]);
    if (p.num_splits == 1) {
      T* orow = static_cast<T*>(p.out) + s.q_offset(p.out_batch_stride, p.out_row_stride) +
                i * p.out_row_stride +
                int64_t(h) * p.out_head_stride;
      for (int c = 0; c < d; ++c)
        orow[c] = static_cast<T>(empty ? 0.f : O[int64_t(r) * d + c] * inv);
      p.lse[s.lse_offset(p.lse_batch_stride) + int64_t(h) * p.lse_head_stride + i] = lse;
    } else {
      const int64_t grow = s.q_row0(p.seqlen_q) + i;
      float* orow = p.out_accum + ((int64_t(split) * p.total_q + grow) * p.heads + h) * d;
      for (int c = 0; c < d; ++c) orow[c] = empty ? 0.f : O[int64_t(r) * d + c] * inv;
      p.lse_accum[(int64_t(split) * p.heads + h) * p.total_q + grow] = lse;
    }
  }
}

// Merges the num_splits partials of sequence b, head h (all its query rows) into out and lse.
// w: num_splits floats of scratch.
template <typename T>
void merge_splits_task(const AttnParams& p, int b, int h, float* w) {
  const SeqLen s = sequence(p, b);
  const int d = p.cache.head_dim;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < s.sq; ++i) {
    const int64_t grow = s.q_row0(p.seqlen_q) + i;
    float m = neg_inf;
    for (int sp = 0; sp < p.num_splits; ++sp)
      m = max_keep_nan(m, p.lse_accum[(int64_t(sp) * p.heads + h) * p.total_q + grow]);
    T* orow = static_cast<T*>(p.out) + s.q_offset(p.out_batch_stride, p.out_row_stride) +
              i * p.out_row_stride + int64_t(h) * p.out_head_stride;
    float* lse = p.lse + s.lse_offset(p.lse_batch_stride) + int64_t(h) * p.lse_head_stride + i;
    if (m == neg_inf) {
      for (int c = 0; c < d; ++c) orow[c] = static_cast<T>(0.f);
      *lse = neg_inf;
      continue;
    }
    float sum = 0.f;
    for (int sp = 0; sp < p.num_splits; ++sp)
      sum += std::exp(p.lse_accum[(int64_t(sp) * p.heads + h) * p.total_q + grow] - m);
    const float total = m + std::log(sum);
    for (int sp = 0; sp < p.num_splits; ++sp)
      w[sp] = std::exp(p.lse_accum[(int64_t(sp) * p.heads + h) * p.total_q + grow] - total);
    for (int c = 0; c < d; ++c) {
      float acc = 0.f;
      for (int sp = 0; sp < p.num_splits; ++sp)
        acc += w[sp] * p.out_accum[((int64_t(sp) * p.total_q + grow) * p.heads + h) * d + c];
      orow[c] = static_cast<T>(acc);
    }
    *lse = total;
  }
}

}  // namespace cpu
}  // namespace kvcache
}  // namespace longctx
