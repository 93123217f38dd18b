// Where one new token of kvcache_append goes, for host and device code: its sequence, its index
// among that sequence's new tokens, its cache position, the offsets of its K and V rows, and the
// position RoPE rotates it by. The CUDA append kernel (append.cuh) and the CPU twin
// (kvcache_cpu.h) both take a token's geometry from here, so they write the same slot from the
// same source row.
//
// Rows: packed (cu_new != nullptr) row r of k/v belongs to the sequence b with
// cu_new[b] <= r < cu_new[b + 1]; batched row r is (b, i) = (r / seqlen_new, r % seqlen_new).
#pragma once
#include <cstdint>
#include "longctx/config.h"
#include "longctx/kvcache/kvcache_params.h"

namespace longctx {
namespace kvcache {

struct AppendToken {
  int b = 0;          // its sequence
  int64_t i = 0;      // its index among the sequence's new tokens
  int64_t t = 0;      // its cache position: cache_seqlens[b] + i
  int64_t k_off = 0;  // element offsets of its K and V rows in p.k / p.v
  int64_t v_off = 0;
};

// The sequence of new-token row `row`: the last b with cu_new[b] <= row (sequences without new
// tokens share their cu_new entry with the next one and never own a row).
LONGCTX_HOST_DEVICE int append_row_seq(const AppendParams& p, int64_t row) {
  if (p.cu_new == nullptr) return static_cast<int>(row / p.seqlen_new);
  int lo = 0, hi = p.cache.batch;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.cu_new[mid] <= row) lo = mid; else hi = mid - 1;
  }
  return lo;
}

LONGCTX_HOST_DEVICE AppendToken append_token_at(const AppendParams& p, int64_t row) {
  AppendToken a;
  a.b = append_row_seq(p, row);
  const bool packed = p.cu_new != nullptr;
  a.i = packed ? row - p.cu_new[a.b] : row - int64_t(a.b) * p.seqlen_new;
  a.t = int64_t(p.cache.cache_seqlens[a.b]) + a.i;
  const int64_t r = packed ? row : a.i;  // row within the batch entry
  a.k_off = (packed ? 0 : int64_t(a.b) * p.k_batch_stride) + r * p.k_row_stride;
  a.v_off = (packed ? 0 : int64_t(a.b) * p.v_batch_stride) + r * p.v_row_stride;
  return a;
}

// The position RoPE rotates the token's K by: positions[...] when given, else its cache position.
LONGCTX_HOST_DEVICE float append_rope_position(const AppendParams& p, const AppendToken& a,
                                               int64_t row) {
  if (p.positions == nullptr) return static_cast<float>(a.t);
  const int64_t off = p.cu_new != nullptr
                          ? row * p.pos_row_stride
                          : int64_t(a.b) * p.pos_batch_stride + a.i * p.pos_row_stride;
  return p.positions_int64 ? static_cast<float>(static_cast<const int64_t*>(p.positions)[off])
                           : static_cast<float>(static_cast<const int32_t*>(p.positions)[off]);
}

}  // namespace kvcache
}  // namespace longctx
