// The host-side decisions of the split-KV decode, free of CUDA and torch (decode_launch.cuh
// launches what they decide; tests/kvcache/decode_choice_test.cpp checks them on the CPU): which
// kernel serves a cache layout, its pipeline depth, the rows per CTA, the split count and the
// staged kernel's tile deal.
//
// Head dims: every multiple of 8 in [8, 256] (decode_head_dim_ok). A kernel is compiled for the
// widths D = 64, 128 and 256; head_dim d runs the one of width decode_kernel_head_dim(d), the
// next of them up, with the columns past d as zeros (zero Q columns add nothing to q.k, zero V
// columns give output columns that are not stored): key rows are read as d elements, no more.
//
// Kernel choice (every decode kernel runs 128 threads on the grid (kv_heads x row tiles, splits,
// batch)), by D:
//   - a layout that allows 16-byte copies (staged_decode_ok: key rows of whole 16-byte pieces,
//     d x bytes a multiple of 16), any format and width: the cp.async-staged tensor-core kernel
//     (decode_staged.cuh), 2 CTAs per SM (1 for 16-bit caches at D = 256, whose 16 KiB tiles
//     fill an SM's shared memory at 3 stages of 4 warps); int8 scales slot-major with
//     kv_heads <= 8 (staged_line_scales_ok) take its line-copy variant;
//   - otherwise D = 128 with 16-byte-aligned key rows of whole 16-byte pieces
//     (rows_16b_aligned): the register tensor-core kernel (decode_mma.cuh), the fallback for
//     layouts the staged kernel cannot take with such rows: a page size that is not a multiple
//     of 16, a slot stride too large for the staged kernel's int32 copy offsets);
//   - the rest (D = 64 and 256 off the staged kernel's layouts; 8-bit rows aligned to 8 bytes
//     only, e.g. d an odd multiple of 8): the CUDA-core kernel (decode_cuda_cores.cuh), whose
//     loads are 8 elements.
#pragma once
#include <algorithm>
#include <cstdint>
#include "longctx/kvcache/kvcache_params.h"

namespace longctx {
namespace kvcache {

constexpr int kDecodeWarps = 4;     // warps per decode CTA (the tensor-core kernels' kMmaWarps)
constexpr int kLineScaleHeads = 8;  // staged line copies of int8 scales: at most 8 kv heads

// The decode kernels (see the header).
enum class DecodeKind { kStaged, kStagedLineScales, kMma, kCudaCores };

// Packed query rows (seqlen_q * heads / kv_heads) per CTA: 1, 4 or 8.
inline int decode_rows_per_cta(const AttnParams& p) {
  const int64_t rows = int64_t(p.seqlen_q) * (p.heads / p.cache.kv_heads);
  return rows <= 1 ? 1 : rows <= 4 ? 4 : 8;
}
// Row tiles per kv head (grid.x = kv_heads x row tiles).
inline int decode_row_tiles(const AttnParams& p) {
  const int64_t rows = int64_t(p.seqlen_q) * (p.heads / p.cache.kv_heads);
  const int gt = decode_rows_per_cta(p);
  return static_cast<int>((rows + gt - 1) / gt);
}

// Bytes per stored element: 2 for 16-bit caches, 1 for 8-bit ones.
inline int64_t cache_elem_bytes(const PagedKV& c) { return c.format == Format::kNative ? 2 : 1; }

// The head dims the CUDA decode takes: multiples of 8 (the CUDA-core kernel's 8-element loads and
// the launcher's 8-element strides) in [8, 256].
constexpr bool decode_head_dim_ok(int d) { return d % 8 == 0 && d >= 8 && d <= 256; }

// The compiled width D (64, 128 or 256) whose kernels run head_dim d: the next one up.
constexpr int decode_kernel_head_dim(int d) { return d <= 64 ? 64 : d <= 128 ? 128 : 256; }

// Whether a key row of d elements is whole 16-byte pieces (the tensor-core kernels' copies).
inline bool rows_whole_pieces(const PagedKV& c) {
  return c.head_dim * cache_elem_bytes(c) % 16 == 0;
}

// Whether the staged kernel can take this cache: a key row must be whole 16-byte pieces
// (rows_whole_pieces), each at a 16-byte aligned address (base pointers and page / slot / head
// strides in bytes), a 16-key tile must lie in one page, and the byte offsets of a tile's 16
// slots must fit in int32 (the kernel's per-lane copy offsets); the pool must hold a page (copies
// of invalid tiles point into page 0 with size 0). The launcher accepts 16-bit pools only with
// 8-element (16-byte) strides and head dims and 16-byte aligned pointers, so a 16-bit cache
// leaves the staged kernel only for its page size.
inline bool staged_decode_ok(const PagedKV& c) {
  const int64_t eb = cache_elem_bytes(c);
  auto a16 = [&](const CacheView& v) {
    return reinterpret_cast<uintptr_t>(v.data) % 16 == 0 && v.page_stride * eb % 16 == 0 &&
           v.slot_stride * eb % 16 == 0 && v.head_stride * eb % 16 == 0 && v.slot_stride >= 0 &&
           (16 * v.slot_stride + c.head_dim) * eb < (int64_t(1) << 31);
  };
  return c.block_size % 16 == 0 && c.num_blocks >= 1 && rows_whole_pieces(c) && a16(c.k) &&
         a16(c.v);
}

// Whether every key row of both pools starts 16-byte aligned (base pointers and page / slot /
// head strides in bytes) and is whole 16-byte pieces: what the register tensor-core kernel's
// 16-byte loads need. The launcher guarantees 8-element strides and head dims, so 16-bit caches
// always qualify.
inline bool rows_16b_aligned(const PagedKV& c) {
  const int64_t eb = cache_elem_bytes(c);
  auto ok = [&](const CacheView& v) {
    return reinterpret_cast<uintptr_t>(v.data) % 16 == 0 && v.page_stride * eb % 16 == 0 &&
           v.slot_stride * eb % 16 == 0 && v.head_stride * eb % 16 == 0;
  };
  return rows_whole_pieces(c) && ok(c.k) && ok(c.v);
}

// Whether the staged kernel's line copies of the int8 scales apply: int8, scales
// (num_blocks, block_size, kv_heads) contiguous within a page (slot-major), 16-byte aligned
// page starts, kv_heads <= 8.
inline bool staged_line_scales_ok(const PagedKV& c) {
  auto ok = [&](const CacheView& v) {
    return v.scale_head_stride == 1 && v.scale_slot_stride == c.kv_heads &&
           reinterpret_cast<uintptr_t>(v.token_scale) % 16 == 0 && v.scale_page_stride % 4 == 0;
  };
  return c.format == Format::kInt8 && c.kv_heads <= kLineScaleHeads && ok(c.k) && ok(c.v);
}

// The kernel that serves this cache (see the header).
inline DecodeKind decode_kind(const PagedKV& c) {
  const int D = decode_kernel_head_dim(c.head_dim);
  if (staged_decode_ok(c))
    return staged_line_scales_ok(c) ? DecodeKind::kStagedLineScales : DecodeKind::kStaged;
  if (D == 128 && rows_16b_aligned(c)) return DecodeKind::kMma;
  return DecodeKind::kCudaCores;
}

// Stages of the staged kernel's per-warp ring. A warp refills the stage it has just read before
// computing on it, so S tiles per warp are in flight during its math: 192 KiB per SM. At 2 CTAs
// (8 warps) per SM, 24 KiB per warp, with K and V of a 16-key tile at 4 KiB (8-bit codes at
// D = 128, 16-bit at D = 64: 6 stages) or 8 KiB (16-bit at D = 128, 8-bit at D = 256: 3 stages,
// 96 KiB of ring per CTA; 4 would not fit 2 CTAs in 228 KiB). 8-bit at D = 64 keeps 6 stages of
// 2 KiB. The int8 line-scale stage holds 1 KiB more scales: 5 stages, so 2 CTAs still fit (3 at
// D = 256: 9 KiB stages). 16-bit at D = 256 (16 KiB tiles): 3 stages, 192 KiB for the one CTA
// per SM (staged_ctas_per_sm).
constexpr int staged_stages(Format f, int head_dim, bool line_scales) {
  if (head_dim == 256) return 3;
  return line_scales ? 5 : (f == Format::kNative && head_dim == 128) ? 3 : 6;
}

// CTAs per SM the staged kernel is built for (its __launch_bounds__ minimum): 1 where a CTA's
// ring is 192 KiB (16-bit at D = 256), else 2.
constexpr int staged_ctas_per_sm(Format f, int head_dim) {
  return f == Format::kNative && head_dim == 256 ? 1 : 2;
}

// Split count for `base` CTAs of `occ` per SM. A call's time goes as waves / splits (each CTA
// does 1 / splits of its row tile's keys, ceil(base * splits / slots) waves), plus a small cost
// per split (partials to write and merge, per-CTA ramp): the count minimizes
// ceil(base * s / slots) / s * (1 + 0.002 s), with at least 256 keys per split and at most 256
// splits (at batch 1 this takes 33 splits where 33 fill the device; a rule that stopped at 95%
// full waves took 32, 2% slower).
inline int choose_splits(int64_t base, int occ, int sms, int64_t max_keys) {
  const int64_t slots = int64_t(occ) * sms;
  if (base >= slots) return 1;
  const int max_s = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(256, max_keys / 256)));
  auto cost = [&](int s) {
    return double((base * s + slots - 1) / slots) / double(s) * (1.0 + 0.002 * s);
  };
  int best = 1;
  for (int s = 2; s <= max_s; ++s)
    if (cost(s) < cost(best)) best = s;
  return best;
}

// Staged kernel: adjacent 16-key tiles a warp takes per round-robin step, as a log2: pairs
// where a warp has at least 48 tiles (max_keys, the block table's capacity, over the row tile's
// splits x 4 warps; faster at 128K, slower at 16K-64K batch 1 on 8-bit caches, where single
// tiles stay). The order is fixed before the key counts are read (the first page ids are loaded
// while cache_seqlens is in flight), hence the capacity rather than the lengths.
inline int tile_run_log2(int64_t max_keys, int splits) {
  const int64_t tiles_per_warp = (max_keys + 15) / 16 / (int64_t(splits) * kDecodeWarps);
  return tiles_per_warp >= 48 ? 1 : 0;
}

}  // namespace kvcache
}  // namespace longctx
