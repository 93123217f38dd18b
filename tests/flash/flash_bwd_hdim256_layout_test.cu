// Host-only checks of the head-dim-256 backward kernel's index arithmetic (no GPU needed; the
// layouts are CuTe's, evaluated on the host with the kernel's own types):
//  1. dQ fragment order: dq_frag_offset over (half, consumer thread, register) is a bijection
//     onto the 64 x 256 floats of a tile, and dq_frag_coords maps the same registers
//     bijectively onto the (D, query) positions: the postprocess inverts the layout the atomics
//     write.
//  2. P / dS stores: the transposing stmatrix of the S accumulator (make_tiled_copy_C of
//     SM90_U16x4_STSM_T), emulated per the PTX definition of stmatrix .x2 .trans from CuTe's
//     partitions, puts every accumulator register's value at the smem position of its
//     (query, key) in the (keys, queries) tile, and fills the tile exactly once.
//  3. Mask: for small shapes with causal, windows, sq != sk and partial tiles, the kernel's
//     per-element rule (tile_fully_visible, tile_mask, then the per-row key offsets used in
//     the consumer loop) equals mask_visible on every (query, key) pair of every visited tile
//     pair, and bwd_query_tiles(n, 64, 80) visits every query tile with a visible pair.
//  4. dQ tiles: bwd_dq_tile_base / bwd_dq_tile_owner give disjoint tiles per sequence below
//     bwd_dq_tiles and invert each other, and the lse2/D pads hold whole query tiles (batched
//     and varlen, empty sequences included; query tiles of 64 and of 128 rows).
// Exit code 0 iff all pass.
#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <vector>
#include "longctx/flash/flash_bwd_sm90_hdim256.cuh"
#include "host_check.h"

using namespace cute;
using namespace longctx::flash;
using Traits = FlashBwdSm90Hdim256Traits<cutlass::bfloat16_t>;
using Element = Traits::Element;

static void check_dq_order() {
  constexpr int kTile = Traits::kDqTileFloats;
  std::vector<int> off_seen(kTile, 0), pos_seen(kTile, 0);
  for (int tidx = 0; tidx < Traits::kNumMmaThreads; ++tidx) {
    auto coords = bwd_sm90::dq_frag_coords<Traits>(tidx);
    CHECK(int(size(coords)) == Traits::kDqFrag, "fragment size %d", int(size(coords)));
    for (int c = 0; c < 2; ++c)
      for (int i = 0; i < Traits::kDqFrag; ++i) {
        const int off = bwd_sm90::dq_frag_offset(c, tidx, i / 4) + i % 4;
        const int d = c * 128 + int(get<0>(coords(i))), q = int(get<1>(coords(i)));
        CHECK(off >= 0 && off < kTile, "offset %d", off);
        CHECK(d >= 0 && d < 256 && q >= 0 && q < 64, "coord (%d, %d)", d, q);
        if (off >= 0 && off < kTile) ++off_seen[off];
        if (d >= 0 && d < 256 && q >= 0 && q < 64) ++pos_seen[q * 256 + d];
        // A warp's float4 for register group g covers 512 contiguous bytes.
        if (i % 4 == 0) {
          const int lane = tidx % 32;
          const int base = bwd_sm90::dq_frag_offset(c, tidx - lane, i / 4);
          CHECK(off == base + 4 * lane, "warp contiguity tidx %d g %d", tidx, i / 4);
        }
      }
  }
  for (int k = 0; k < kTile; ++k) {
    CHECK(off_seen[k] == 1, "offset %d written %d times", k, off_seen[k]);
    CHECK(pos_seen[k] == 1, "position (q %d, d %d) held %d times", k / 256, k % 256, pos_seen[k]);
  }
}

static void check_pds_store() {
  typename Traits::TiledMmaSdP mma;
  auto s2s = make_tiled_copy_C(typename Traits::SmemCopyPdS{}, mma);
  // A 1024-byte-aligned host buffer: the swizzle acts on address bits, as in shared memory.
  constexpr int kElems = int(cosize_v<typename Traits::SmemLayoutPdS>);
  alignas(1024) static Element buf[kElems];
  Tensor sPt = make_tensor(make_smem_ptr(buf), typename Traits::SmemLayoutPdSt{});
  auto elem_off = [&](const Element* ptr) { return int(ptr - buf); };
  // Expected offset of every (query, key) of buffer 0; every offset of buffer 0 used once.
  std::vector<int> expect(64 * 80), hits(kElems, 0);
  for (int q = 0; q < 64; ++q)
    for (int k = 0; k < 80; ++k) {
      expect[q * 80 + k] = elem_off(&sPt(q, k, 0));
      if (expect[q * 80 + k] < 0 || expect[q * 80 + k] >= kElems) {
        std::printf("FAIL: P/dS view offset %d out of range\n", expect[q * 80 + k]);
        std::exit(1);
      }
    }
  {
    std::vector<int> once(kElems, 0);
    for (int x : expect) ++once[x];
    int used = 0;
    for (int x : once) {
      used += x == 1;
      CHECK(x <= 1, "P/dS view is not injective");
    }
    CHECK(used == 64 * 80, "P/dS view covers %d elements", used);
  }
  // memory[offset] = (query * 80 + key) of the register stored there.
  std::vector<int> memory(kElems, -1);
  for (int warp = 0; warp < 8; ++warp) {
    // Per lane: the register tensor (holding each register's accumulator index) and the
    // destination tensor, as the kernel partitions them.
    std::vector<std::vector<int>> src_q(32), src_k(32);
    std::vector<std::vector<int>> row_addr(32);
    int n_calls = -1, n_vals = -1;
    for (int lane = 0; lane < 32; ++lane) {
      const int tidx = warp * 32 + lane;
      auto thr_mma = mma.get_thread_slice(tidx);
      Tensor cS = thr_mma.partition_C(make_identity_tensor(Shape<_64, _80>{}));
      Tensor acc = partition_fragment_C(mma, Shape<_64, _80>{});
      Tensor idx = make_tensor<int>(acc.layout());
      for (int i = 0; i < size(idx); ++i) idx(i) = i;
      auto thr = s2s.get_thread_slice(tidx);
      Tensor r = thr.retile_S(idx);          // ((atom values, atoms), CPY_M, CPY_N)
      Tensor d = thr.partition_D(sPt);       // ((atom row, atoms), CPY_M, CPY_N, BUF)
      const int atoms = int(size<1>(get<0>(r.shape())));
      n_vals = int(size<0>(get<0>(r.shape())));
      n_calls = atoms * int(size<1>(r) * size<2>(r));
      CHECK(n_vals == 4, "U16x4 atom: %d values per call", n_vals);
      CHECK(int(size<0>(get<0>(d.shape()))) == 8, "one 16-byte row per call");
      CHECK(int(size<1>(get<0>(d.shape()))) == atoms, "atoms of source and destination");
      for (int cm = 0; cm < int(size<1>(r)); ++cm)
        for (int cn = 0; cn < int(size<2>(r)); ++cn)
          for (int at = 0; at < atoms; ++at) {
            for (int v = 0; v < n_vals; ++v) {
              const int i = r(make_coord(v, at), cm, cn);
              src_q[lane].push_back(int(get<0>(cS(i))));
              src_k[lane].push_back(int(get<1>(cS(i))));
            }
            const int a = elem_off(&d(make_coord(0, at), cm, cn, 0));
            for (int e = 1; e < 8; ++e)
              CHECK(elem_off(&d(make_coord(e, at), cm, cn, 0)) == a + e, "row not contiguous");
            CHECK(a % 8 == 0, "row not 16-byte aligned");
            row_addr[lane].push_back(a);
          }
    }
    // stmatrix.sync.aligned.x2.trans.m8n8.b16 (PTX ISA): lanes 8j .. 8j + 7 give the addresses of
    // rows 0..7 of matrix j; register j of lane l holds matrix j's elements (l / 4, 2 (l % 4))
    // and (l / 4, 2 (l % 4) + 1); with .trans element (r, c) is stored at row c, column r.
    for (int call = 0; call < n_calls; ++call)
      for (int lane = 0; lane < 32; ++lane)
        for (int v = 0; v < n_vals; ++v) {
          const int j = v / 2, h = v % 2;
          const int r = lane / 4, c = 2 * (lane % 4) + h;
          const int addr = row_addr[8 * j + c][call] + r;
          const int id = src_q[lane][call * n_vals + v] * 80 + src_k[lane][call * n_vals + v];
          CHECK(addr >= 0 && addr < kElems, "smem element %d out of the tile", addr);
          if (addr < 0 || addr >= kElems) continue;
          CHECK(memory[addr] == -1, "smem element %d written twice", addr);
          memory[addr] = id;
        }
  }
  int placed = 0;
  for (int q = 0; q < 64; ++q)
    for (int k = 0; k < 80; ++k) {
      const int got = memory[expect[q * 80 + k]];
      placed += got >= 0;
      CHECK(got == q * 80 + k, "P(q %d, key %d) holds (%d, %d)", q, k, got / 80, got % 80);
    }
  CHECK(placed == 64 * 80, "%d of 5120 P elements placed", placed);
}

// The consumer loop's per-element rule for one (query tile m, KV tile n) pair.
static bool kernel_visible(int m, int n, int q, int key, int sq, int sk, int wl, int wr) {
  constexpr int kM = 64, kN = 80;
  const int m0 = m * kM, n0 = n * kN;
  const bool need_mask = n0 + kN > sk || m0 + kM > sq ||
                         !tile_fully_visible(m, n, kM, kN, sq, sk, wl, wr);
  const TileMask tm = tile_mask(need_mask, m0, n0, sq, sk, wl, wr);
  const int key0 = 0;  // the rule is applied relative to any per-thread first key
  const int hi = std::min(tm.d_hi + q, tm.key_lim - 1) - key0, lo = tm.d_lo + q - key0;
  const int kc = key - key0;
  return q < tm.q_lim && kc <= hi && kc >= lo;
}

static void check_mask() {
  const int lens[] = {1, 63, 64, 65, 79, 80, 81, 160, 200, 333};
  const int wins[][2] = {{-1, -1}, {-1, 0}, {50, 0}, {64, 32}, {0, 0}, {1500, -1}, {-1, 100}};
  for (int sq : lens)
    for (int sk : lens)
      for (auto& w : wins) {
        const int wl = w[0], wr = w[1];
        const int n_tiles = (sk + 79) / 80, m_tiles = (sq + 63) / 64;
        for (int n = 0; n < n_tiles; ++n) {
          const TileRange rg = bwd_query_tiles(n, 64, 80, sq, sk, wl, wr);
          for (int m = 0; m < m_tiles; ++m) {
            const bool visited = m >= rg.begin && m < rg.end;
            for (int q = 0; q < 64; ++q)
              for (int key = 0; key < 80; ++key) {
                const int i = m * 64 + q, j = n * 80 + key;
                const bool ref = i < sq && j < sk && mask_visible(i, j, sq, sk, wl, wr);
                if (!visited) {
                  CHECK(!ref, "tile (%d, %d) skipped but (%d, %d) visible", m, n, i, j);
                  continue;
                }
                const bool got = kernel_visible(m, n, q, key, sq, sk, wl, wr);
                // Rows/keys past the sequence must be masked too (garbage Q/K rows).
                CHECK(got == ref, "sq %d sk %d w (%d, %d): (%d, %d) kernel %d ref %d", sq, sk,
                      wl, wr, i, j, int(got), int(ref));
              }
          }
        }
      }
}

// Every 64-row tile that a block_m-row reduce of sequence b touches (64-row tiles m <
// (block_m / 64) ceil(len / block_m)) lies below bwd_dq_tiles, belongs to b alone and maps back
// to (b, m); every block_m-row lse2/D tile of b stays below the next sequence's pad base and the
// head stride.
static void check_dq_tiles(int block_m) {
  const int per = block_m / 64;
  // Batched.
  for (int sq : {1, 64, 65, 128, 129, 200}) {
    const int B = 3;
    const int64_t tiles = bwd_dq_tiles(false, B, 0, sq, block_m);
    for (int b = 0; b < B; ++b) {
      for (int m = 0; m < per * ((sq + block_m - 1) / block_m); ++m) {
        const int64_t t = bwd_dq_tile_base(false, b, 0, sq, block_m) + m;
        CHECK(t < tiles, "block_m %d: batched tile %lld >= %lld", block_m, (long long)t,
              (long long)tiles);
        int bb;
        int64_t mm;
        bwd_dq_tile_owner(nullptr, B, sq, block_m, t, bb, mm);
        CHECK(bb == b && mm == m, "block_m %d: batched owner", block_m);
      }
      const int64_t end = bwd_pad_base(false, b, 0, sq, block_m) +
                          int64_t((sq + block_m - 1) / block_m) * block_m;
      CHECK(end <= bwd_pad_base(false, b + 1, 0, sq, block_m) &&
                end <= bwd_pad_head_stride(false, B, 0, sq, block_m),
            "block_m %d: batched pad of %d", block_m, b);
    }
  }
  // Varlen, including empty sequences and lengths at tile boundaries.
  const std::vector<std::vector<int>> lens = {
      {0}, {1}, {64}, {65, 0, 63, 128, 1}, {0, 0, 5}, {300, 64, 64, 0, 200, 7},
      {127, 129, 255, 256, 257, 1, 383}};
  for (const auto& L : lens) {
    const int B = int(L.size());
    std::vector<int32_t> cu(B + 1, 0);
    for (int b = 0; b < B; ++b) cu[b + 1] = cu[b] + L[b];
    const int maxq = 1;
    const int64_t tiles = bwd_dq_tiles(true, B, cu[B], maxq, block_m);
    std::vector<int> seen(tiles, 0);
    for (int b = 0; b < B; ++b) {
      for (int m = 0; m < per * ((L[b] + block_m - 1) / block_m); ++m) {
        const int64_t t = bwd_dq_tile_base(true, b, cu[b], maxq, block_m) + m;
        CHECK(t >= 0 && t < tiles, "block_m %d: varlen tile %lld of %lld", block_m,
              (long long)t, (long long)tiles);
        if (t < 0 || t >= tiles) continue;
        CHECK(seen[t]++ == 0, "block_m %d: varlen tile %lld shared", block_m, (long long)t);
        int bb;
        int64_t mm;
        bwd_dq_tile_owner(cu.data(), B, maxq, block_m, t, bb, mm);
        CHECK(bb == b && mm == m, "block_m %d: varlen owner of %lld: (%d, %lld) not (%d, %d)",
              block_m, (long long)t, bb, (long long)mm, b, m);
      }
      const int64_t end = bwd_pad_base(true, b, cu[b], maxq, block_m) +
                          int64_t((L[b] + block_m - 1) / block_m) * block_m;
      const int64_t next = b + 1 < B ? bwd_pad_base(true, b + 1, cu[b + 1], maxq, block_m)
                                     : bwd_pad_head_stride(true, B, cu[B], maxq, block_m);
      CHECK(end <= next, "block_m %d: varlen pad of %d ends at %lld past %lld", block_m, b,
            (long long)end, (long long)next);
    }
  }
}

int main() {
  std::setvbuf(stdout, nullptr, _IONBF, 0);
  std::printf("FlashBwdSm90Hdim256Traits: %d bytes of shared memory (limit %d)\n",
              Traits::kSmemBytes, 227 * 1024);
  check_dq_order();
  check_pds_store();
  check_mask();
  check_dq_tiles(64);
  check_dq_tiles(128);
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("all hdim-256 layout checks passed\n");
  return 0;
}
