// Standalone CPU test of the decode's host-side decisions (decode_choice.h): which kernel serves
// which cache layout (every format, head dims 64/128/256 and the multiples of 8 between them on
// the next width up, page sizes, padded and misaligned pools, int8 scale layouts), the staged
// kernel's depth, the split count and the tile deal; and of the staged kernel's shared-memory
// tile layout (staged_swizzle.h): the copies land where the fragment reads look, and both are
// bank-conflict-free.
// Exit code 0 on success; prints every failed check.
#include <cstdint>
#include <cstdio>
#include "longctx/kvcache/decode_choice.h"
#include "longctx/kvcache/staged_swizzle.h"

using namespace longctx::kvcache;

namespace {

int g_failures = 0, g_checks = 0;

void check(bool ok, const char* what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("FAIL %s\n", what);
  }
}

const char* kind_name(DecodeKind k) {
  switch (k) {
    case DecodeKind::kStaged: return "staged";
    case DecodeKind::kStagedLineScales: return "staged-line-scales";
    case DecodeKind::kMma: return "register";
    default: return "cuda-cores";
  }
}

// A pool (num_blocks, bs, hk, d) with head rows of d + pad elements at `base` (a fake address:
// the decisions read only its alignment) and int8 scales head-major (or slot-major).
struct Pool {
  Format format = Format::kNative;
  int d = 128, bs = 16, hk = 8, pad = 0;
  int64_t num_blocks = 64;
  uintptr_t base = 4096;
  bool slot_major_scales = false;
  int64_t slot_stride = -1;  // elements; -1: hk x (d + pad)

  PagedKV make() const {
    PagedKV c;
    c.format = format;
    c.num_blocks = num_blocks;
    c.batch = 1, c.kv_heads = hk, c.head_dim = d, c.block_size = bs, c.max_blocks = 8;
    for (CacheView* v : {&c.k, &c.v}) {
      v->data = reinterpret_cast<void*>(base);
      v->head_stride = d + pad;
      v->slot_stride = slot_stride >= 0 ? slot_stride : int64_t(hk) * (d + pad);
      v->page_stride = int64_t(bs) * v->slot_stride;
      if (format == Format::kInt8) {
        v->token_scale = reinterpret_cast<float*>(uintptr_t(1) << 20);
        v->scale_page_stride = int64_t(bs) * hk;
        v->scale_slot_stride = slot_major_scales ? hk : 1;
        v->scale_head_stride = slot_major_scales ? 1 : bs;
      }
    }
    return c;
  }
};

void expect(const Pool& pool, DecodeKind want, const char* what) {
  const DecodeKind got = decode_kind(pool.make());
  char msg[256];
  std::snprintf(msg, sizeof msg, "%s: want %s, got %s", what, kind_name(want), kind_name(got));
  check(got == want, msg);
}

Pool with(Format f, int d, int bs) {
  Pool p;
  p.format = f;
  p.d = d;
  p.bs = bs;
  return p;
}

// Whether the 32 lanes' 16-byte accesses at byte offsets a[] are conflict-free: each phase of
// 8 lanes hits 8 distinct 16-byte bank groups.
bool conflict_free(const uint32_t (&a)[32]) {
  for (int ph = 0; ph < 32; ph += 8) {
    unsigned groups = 0;
    for (int l = ph; l < ph + 8; ++l) groups |= 1u << (a[l] / 16 % 8);
    if (groups != 0xffu) return false;
  }
  return true;
}

// The tile layout of P pieces per key row (64- to 512-byte rows): copy destinations are the
// reads' offsets and a permutation of the tile; copies, K reads (pieces 4 u + c of key 8 h + r)
// and 16-byte V reads (pieces r P / 8 + i of key 2 c + e0 + 8 e1, rows of >= 128 bytes) are
// conflict-free (decode_mma_tile.cuh's fragment maps, lane = 4 r + c).
template <int P>
void check_layout(const char* name) {
  constexpr int kKeyStep = 32 / P;
  bool dest = true, perm = true, copies = true, kreads = true, vreads = true;
  bool seen[16 * P] = {};
  for (int u = 0; u < 16 / kKeyStep; ++u) {
    uint32_t a[32];
    for (int lane = 0; lane < 32; ++lane) {
      a[lane] = staged_copy_dest<P>(staged_piece_offset<P>(lane / P, lane % P), u);
      dest = dest && a[lane] == staged_piece_offset<P>(lane / P + kKeyStep * u, lane % P);
      perm = perm && a[lane] % 16 == 0 && a[lane] / 16 < 16 * P && !seen[a[lane] / 16];
      if (a[lane] / 16 < 16 * P) seen[a[lane] / 16] = true;
    }
    copies = copies && conflict_free(a);
  }
  for (int h = 0; h < 2; ++h)
    for (int u = 0; u < P / 4; ++u) {
      uint32_t a[32];
      for (int lane = 0; lane < 32; ++lane)
        a[lane] = staged_piece_offset<P>(8 * h + lane / 4, 4 * u + lane % 4);
      kreads = kreads && conflict_free(a);
    }
  for (int e = 0; e < 4 && P >= 8; ++e)
    for (int i = 0; i < P / 8; ++i) {
      uint32_t a[32];
      for (int lane = 0; lane < 32; ++lane)
        a[lane] = staged_piece_offset<P>(2 * (lane % 4) + (e & 1) + 8 * (e >> 1),
                                         lane / 4 * P / 8 + i);
      vreads = vreads && conflict_free(a);
    }
  const bool checks[] = {dest, perm, copies, kreads, vreads};
  const char* what[] = {"copy destinations", "permutation", "copies conflict-free",
                        "K reads conflict-free", "V reads conflict-free"};
  for (int k = 0; k < 5; ++k) {
    char msg[128];
    std::snprintf(msg, sizeof msg, "%s: %s", name, what[k]);
    check(checks[k], msg);
  }
}

}  // namespace

int main() {
  using K = DecodeKind;
  const Format kBf16 = Format::kNative, kInt8 = Format::kInt8, kFp8 = Format::kFp8E4M3;

  // 16-bit caches: the staged kernel wherever the page size is a multiple of 16
  expect(with(kBf16, 128, 16), K::kStaged, "16-bit d128 bs16");
  expect(with(kBf16, 128, 64), K::kStaged, "16-bit d128 bs64");
  expect(with(kBf16, 64, 16), K::kStaged, "16-bit d64 bs16");
  expect(with(kBf16, 64, 256), K::kStaged, "16-bit d64 bs256");
  Pool padded = with(kBf16, 128, 16);
  padded.pad = 8;  // 16-byte padded head rows: still 16-byte pieces
  expect(padded, K::kStaged, "16-bit d128 bs16, head rows padded by 8");
  Pool mha = with(kBf16, 128, 32);
  mha.hk = 32;
  expect(mha, K::kStaged, "16-bit d128 bs32, 32 kv heads");
  expect(with(kBf16, 256, 16), K::kStaged, "16-bit d256 bs16");
  expect(with(kBf16, 192, 16), K::kStaged, "16-bit d192 bs16 (width 256)");
  // ... and the fallbacks: register kernel at d128, CUDA cores at d64 / d256
  expect(with(kBf16, 128, 8), K::kMma, "16-bit d128 bs8");
  expect(with(kBf16, 128, 24), K::kMma, "16-bit d128 bs24");
  expect(with(kBf16, 128, 1), K::kMma, "16-bit d128 bs1");
  expect(with(kBf16, 64, 8), K::kCudaCores, "16-bit d64 bs8");
  expect(with(kBf16, 256, 8), K::kCudaCores, "16-bit d256 bs8");
  Pool huge = with(kBf16, 128, 16);
  huge.slot_stride = int64_t(1) << 26;  // 16 slots = 2^31 bytes: past the int32 copy offsets
  expect(huge, K::kMma, "16-bit d128 bs16, 2^26-element slot stride");
  huge.slot_stride = (int64_t(1) << 26) - 1024;
  expect(huge, K::kStaged, "16-bit d128 bs16, slot stride just under the int32 limit");
  Pool empty = with(kBf16, 128, 16);
  empty.num_blocks = 0;
  expect(empty, K::kMma, "16-bit d128, empty pool");

  // 8-bit caches: staged where 16-byte copies work
  for (Format f : {kInt8, kFp8}) {
    const bool i8 = f == kInt8;
    expect(with(f, 128, 16), K::kStaged, i8 ? "int8 d128 bs16" : "fp8 d128 bs16");
    expect(with(f, 64, 16), K::kStaged, i8 ? "int8 d64 bs16" : "fp8 d64 bs16");
    Pool p8 = with(f, 128, 16);
    p8.pad = 8;  // head rows 8 bytes off 16: no 16-byte loads for odd heads
    expect(p8, K::kCudaCores, i8 ? "int8 d128 rows padded by 8" : "fp8 d128 rows padded by 8");
    p8.d = 64;
    expect(p8, K::kCudaCores, i8 ? "int8 d64 rows padded by 8" : "fp8 d64 rows padded by 8");
    Pool mis = with(f, 128, 16);
    mis.base = 4096 + 8;
    expect(mis, K::kCudaCores, i8 ? "int8 d128 8-byte aligned pool" : "fp8 8-byte aligned pool");
    expect(with(f, 128, 8), K::kMma, i8 ? "int8 d128 bs8" : "fp8 d128 bs8");
    expect(with(f, 256, 16), K::kStaged, i8 ? "int8 d256" : "fp8 d256");
    expect(with(f, 256, 8), K::kCudaCores, i8 ? "int8 d256 bs8" : "fp8 d256 bs8");
  }
  Pool slot = with(kInt8, 128, 16);
  slot.slot_major_scales = true;
  expect(slot, K::kStagedLineScales, "int8 slot-major scales, 8 kv heads");
  slot.hk = 16;
  expect(slot, K::kStaged, "int8 slot-major scales, 16 kv heads");
  Pool fp8slot = with(kFp8, 128, 16);
  fp8slot.slot_major_scales = true;  // (no int8 scales: ignored)
  expect(fp8slot, K::kStaged, "fp8 never takes line scales");

  // head dims between the compiled widths: multiples of 8 up to 256, run by the next width
  check(decode_head_dim_ok(96) && decode_head_dim_ok(8) && decode_head_dim_ok(256) &&
            decode_head_dim_ok(72) && !decode_head_dim_ok(36) && !decode_head_dim_ok(0) &&
            !decode_head_dim_ok(264) && !decode_head_dim_ok(100),
        "head dims: multiples of 8 in [8, 256]");
  check(decode_kernel_head_dim(8) == 64 && decode_kernel_head_dim(64) == 64 &&
            decode_kernel_head_dim(72) == 128 && decode_kernel_head_dim(96) == 128 &&
            decode_kernel_head_dim(128) == 128 && decode_kernel_head_dim(136) == 256 &&
            decode_kernel_head_dim(192) == 256 && decode_kernel_head_dim(256) == 256,
        "kernel width: the next of 64, 128, 256");
  // 16-bit rows are whole 16-byte pieces at every multiple of 8: staged at every width (page size
  // a multiple of 16), else register at 72..128 and CUDA cores past 128. 8-bit rows are whole
  // pieces where d is a multiple of 16; 8-byte rows (d = 40, 72, 200) take the CUDA cores.
  struct Between {
    Format f;
    int d, bs;
    DecodeKind want;
  };
  const Between between[] = {
      {kBf16, 96, 16, K::kStaged},      {kBf16, 96, 64, K::kStaged},
      {kBf16, 72, 16, K::kStaged},      {kBf16, 40, 16, K::kStaged},
      {kBf16, 8, 16, K::kStaged},       {kBf16, 96, 8, K::kMma},
      {kBf16, 40, 8, K::kCudaCores},    {kBf16, 192, 16, K::kStaged},
      {kBf16, 200, 16, K::kStaged},     {kBf16, 192, 8, K::kCudaCores},
      {kInt8, 96, 16, K::kStaged},      {kFp8, 96, 16, K::kStaged},
      {kInt8, 80, 64, K::kStaged},      {kFp8, 80, 64, K::kStaged},
      {kInt8, 48, 16, K::kStaged},      {kFp8, 48, 16, K::kStaged},
      {kInt8, 96, 8, K::kMma},          {kFp8, 96, 8, K::kMma},
      {kInt8, 72, 16, K::kCudaCores},   {kFp8, 72, 16, K::kCudaCores},
      {kInt8, 40, 16, K::kCudaCores},   {kFp8, 40, 16, K::kCudaCores},
      {kInt8, 192, 16, K::kStaged},     {kFp8, 192, 16, K::kStaged},
      {kInt8, 200, 16, K::kCudaCores},  {kFp8, 200, 16, K::kCudaCores},
  };
  for (const Between& w : between) {
    char what[64];
    std::snprintf(what, sizeof what, "%s d%d bs%d",
                  w.f == kBf16 ? "16-bit" : w.f == kInt8 ? "int8" : "fp8", w.d, w.bs);
    expect(with(w.f, w.d, w.bs), w.want, what);
  }
  Pool pad96 = with(kBf16, 96, 16);
  pad96.pad = 32;  // rows of a 128-element pool viewed as 96
  expect(pad96, K::kStaged, "16-bit d96 in 128-element rows");
  for (Format f : {kInt8, kFp8}) {
    Pool p72 = with(f, 72, 16);
    p72.pad = 56;  // 16-byte strides, but a 72-byte row is not whole 16-byte pieces
    expect(p72, K::kCudaCores, f == kInt8 ? "int8 d72 in 128-byte rows" : "fp8 d72, 128 B rows");
    p72.bs = 8;
    expect(p72, K::kCudaCores, f == kInt8 ? "int8 d72 bs8, 128 B rows" : "fp8 d72 bs8, 128 B rows");
  }
  Pool slot96 = with(kInt8, 96, 16);
  slot96.slot_major_scales = true;
  expect(slot96, K::kStagedLineScales, "int8 d96 slot-major scales, 8 kv heads");

  // pipeline depth: 8 KiB stages (16-bit d128) 3 deep, 4 KiB and smaller 6, line scales 5;
  // width 256: 3 (16 KiB 16-bit stages at 1 CTA per SM, 8-bit at 2)
  check(staged_stages(kBf16, 128, false) == 3, "stages 16-bit d128 = 3");
  check(staged_stages(kBf16, 64, false) == 6, "stages 16-bit d64 = 6");
  check(staged_stages(kFp8, 128, false) == 6, "stages fp8 d128 = 6");
  check(staged_stages(kInt8, 64, false) == 6, "stages int8 d64 = 6");
  check(staged_stages(kInt8, 128, true) == 5, "stages int8 line scales = 5");
  check(staged_stages(kBf16, 256, false) == 3 && staged_ctas_per_sm(kBf16, 256) == 1,
        "16-bit d256: 3 stages, 1 CTA per SM");
  check(staged_stages(kFp8, 256, false) == 3 && staged_stages(kInt8, 256, true) == 3 &&
            staged_ctas_per_sm(kInt8, 256) == 2 && staged_ctas_per_sm(kBf16, 128) == 2,
        "8-bit d256: 3 stages, 2 CTAs per SM");

  check_layout<4>("64-byte rows (8-bit d64)");
  check_layout<8>("128-byte rows (8-bit d128, 16-bit d64)");
  check_layout<16>("256-byte rows (16-bit d128, 8-bit d256)");
  check_layout<32>("512-byte rows (16-bit d256)");

  // split count (GQA 32/8 batch 1: 8 row tiles; 2 CTAs x 132 SMs) and the tile deal
  check(choose_splits(8, 2, 132, 131072) == 33, "128K b1 on 2 x 132 slots: 33 splits");
  check(choose_splits(8 * 16, 2, 132, 131072) == 2, "128K b16: 2 splits");
  check(choose_splits(264, 2, 132, 131072) == 1, "a full wave: 1 split");
  check(choose_splits(8, 2, 132, 300) == 1, "300 keys: 1 split (256 keys per split)");
  check(tile_run_log2(131072, 33) == 1, "128K, 33 splits: pairs");
  check(tile_run_log2(32768, 33) == 0, "32K, 33 splits: single tiles");

  AttnParams p;
  p.cache.kv_heads = 8;
  p.heads = 32;
  p.seqlen_q = 1;
  check(decode_rows_per_cta(p) == 4 && decode_row_tiles(p) == 1, "GQA 32/8: 1 tile of 4 rows");
  p.seqlen_q = 3;
  check(decode_rows_per_cta(p) == 8 && decode_row_tiles(p) == 2, "GQA 4, 3 rows: 2 tiles of 8");

  std::printf("%d checks, %d failed\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
