// Host-only checks of the hdim 64/128 backward kernel (no GPU needed; the layouts are CuTe's,
// evaluated on the host with the kernel's own types), for each tile shape it is compiled with
// (hdim 64 with 64- and 128-row query tiles, the latter for deterministic launches; hdim 128
// with 64): its dQ tile stores
//  1. Store i of consumer thread tidx writes registers r = dq_store_reg(tidx, i) and r + 1 at
//     dq_store_offset(dq_store_base(tidx), i): the byte offset in SmemLayoutdQ of the (query,
//     column) that the dQ TiledMma's partition gives register r, r + 1 the next float of the
//     same row; every even register is stored once.
//  2. The 256 threads' registers cover the kBlockM x D tile exactly once (128-row tiles: the
//     warpgroups split the rows; 64-row tiles: the columns).
//  3. Each half-warp's 64-bit store (the unit a 64-bit shared store is served in) touches every
//     shared-memory bank exactly once: one wavefront per half-warp, no bank conflict.
// its dS^T stores (64-row tiles, stmatrix): each thread's copy sources hold the (key, query) of
// their destinations, and the 256 threads write every element of a buffer once;
// and its walk and mask for each tile shape (kBlockM x kBlockN):
//  4. bwd_query_tiles(n) visits every query tile with a visible pair, and the consumer loop's
//     per-element rule (keys as rows: tile_fully_visible, tile_mask, then the four compares)
//     equals mask_visible on every (key, query) pair of every visited tile pair (causal,
//     windows, sq != sk, partial tiles; rows and keys past the sequence masked).
//  5. Deterministic order: the KV tiles visiting a query tile are contiguous and kv_tile_rank
//     numbers them 0, 1, ... in KV-tile order.
// Exit code 0 iff all pass.
#include <cstdio>
#include <vector>
#include "longctx/flash/flash_bwd_sm90.cuh"
#include "host_check.h"

using namespace cute;
using namespace longctx::flash;

template <typename Traits>
static void check_dq_stores() {
  constexpr int kM = Traits::kBlockM, kD = Traits::kHeadDim, kRegs = Traits::kDqRegs;
  alignas(1024) static float buf[kM * kD];
  Tensor sdQ = make_tensor(make_smem_ptr(buf), typename Traits::SmemLayoutdQ{});
  typename Traits::TiledMmadQ mma;
  std::vector<int> seen(kM * kD, 0);
  for (int tidx = 0; tidx < Traits::kNumMmaThreads; ++tidx) {
    auto coords = mma.get_thread_slice(tidx).partition_C(
        make_identity_tensor(Shape<Int<kM>, Int<kD>>{}));
    CHECK(int(size(coords)) == kRegs, "hdim %d: %d registers", kD, int(size(coords)));
    const uint32_t base = bwd_sm90::dq_store_base<Traits>(tidx);
    std::vector<int> stored(kRegs, 0);
    for (int i = 0; i < int(size(coords)); i += 2) {
      const int reg = bwd_sm90::dq_store_reg(tidx, i);
      CHECK(reg % 2 == 0 && reg >= 0 && reg < kRegs, "hdim %d tidx %d store %d: register %d",
            kD, tidx, i, reg);
      if (reg % 2 != 0 || reg < 0 || reg >= kRegs) continue;
      ++stored[reg];
      const int r = int(get<0>(coords(reg))), c = int(get<1>(coords(reg)));
      const int r1 = int(get<0>(coords(reg + 1))), c1 = int(get<1>(coords(reg + 1)));
      CHECK(r1 == r && c1 == c + 1, "hdim %d tidx %d reg %d: (%d, %d) then (%d, %d)", kD, tidx,
            reg, r, c, r1, c1);
      const uint32_t off = bwd_sm90::dq_store_offset<Traits>(base, i);
      const int want = int(reinterpret_cast<char*>(&sdQ(r, c)) - reinterpret_cast<char*>(buf));
      const int want1 = int(reinterpret_cast<char*>(&sdQ(r, c + 1)) - reinterpret_cast<char*>(buf));
      CHECK(int(off) == want && want1 == want + 4,
            "hdim %d tidx %d reg %d (%d, %d): offset %u, layout %d / %d", kD, tidx, i, r, c, off,
            want, want1);
      for (int e = 0; e < 2; ++e) {
        const int f = int(off) / 4 + e;
        CHECK(f >= 0 && f < kM * kD, "hdim %d: offset %d out of the tile", kD, f);
        if (f >= 0 && f < kM * kD) ++seen[f];
      }
    }
    for (int reg = 0; reg < kRegs; reg += 2)
      CHECK(stored[reg] == 1, "hdim %d tidx %d: register %d stored %d times", kD, tidx, reg,
            stored[reg]);
  }
  for (int f = 0; f < kM * kD; ++f)
    CHECK(seen[f] == 1, "hdim %d: float %d written %d times", kD, f, seen[f]);
  for (int half = 0; half < Traits::kNumMmaThreads / 16; ++half)
    for (int i = 0; i < kRegs; i += 2) {
      int bank[32] = {};
      for (int lane = 0; lane < 16; ++lane) {
        const uint32_t off = bwd_sm90::dq_store_offset<Traits>(
            bwd_sm90::dq_store_base<Traits>(16 * half + lane), i);
        ++bank[(off / 4) % 32];
        ++bank[(off / 4 + 1) % 32];
      }
      for (int k = 0; k < 32; ++k)
        CHECK(bank[k] == 1, "hdim %d half-warp %d store %d: bank %d hit %d times", kD, half, i,
              k, bank[k]);
    }
}

// dS^T stores of 64-row tiles (stmatrix, Traits::SmemCopydS, which exchanges values between
// the lanes of a warp): for every consumer thread the dS^T accumulator's registers, retiled for
// the copy, hold the (key, query) that the copy's source partition assigns them; its
// destination partition covers every element of a buffer exactly once over the 256 threads, at
// the layout's offsets.
template <typename Traits>
static void check_ds_stores() {
  constexpr int kM = Traits::kBlockM, kN = Traits::kBlockN, kD = Traits::kHeadDim;
  typename Traits::TiledMmaSdP mma;
  auto s2s = make_tiled_copy_C(typename Traits::SmemCopydS{}, mma);
  alignas(1024) static cutlass::bfloat16_t buf[2 * kN * kM];
  Tensor sdS = make_tensor(make_smem_ptr(buf), typename Traits::SmemLayoutdS{});
  Tensor ident = make_identity_tensor(Shape<Int<kN>, Int<kM>>{});
  std::vector<int> seen(kN * kM, 0);
  for (int tidx = 0; tidx < Traits::kNumMmaThreads; ++tidx) {
    auto thr = s2s.get_thread_slice(tidx);
    Tensor reg = thr.retile_S(mma.get_thread_slice(tidx).partition_C(ident));
    Tensor src = thr.partition_S(ident);
    Tensor dst_coord = thr.partition_D(ident);
    Tensor dst = thr.partition_D(sdS(_, _, 0));
    CHECK(size(reg) == size(src) && size(src) == size(dst), "hdim %d tidx %d: %d / %d / %d values",
          kD, tidx, int(size(reg)), int(size(src)), int(size(dst)));
    for (int i = 0; i < int(size(src)); ++i)
      CHECK(get<0>(reg(i)) == get<0>(src(i)) && get<1>(reg(i)) == get<1>(src(i)),
            "hdim %d tidx %d value %d: register (%d, %d), copy source (%d, %d)", kD, tidx, i,
            int(get<0>(reg(i))), int(get<1>(reg(i))), int(get<0>(src(i))), int(get<1>(src(i))));
    for (int i = 0; i < int(size(dst)); ++i) {
      const int key = int(get<0>(dst_coord(i))), q = int(get<1>(dst_coord(i)));
      const int off = int(&dst(i) - buf), want = int(&sdS(key, q, 0) - buf);
      CHECK(off == want, "hdim %d tidx %d value %d: offset %d, layout %d", kD, tidx, i, off, want);
      if (off >= 0 && off < kN * kM) ++seen[off];
    }
  }
  for (int f = 0; f < kN * kM; ++f)
    CHECK(seen[f] == 1, "hdim %d: dS^T element %d written %d times", kD, f, seen[f]);
}

// 128-row tiles store dS^T in two 64-query halves (TiledMmaSdPHalf, local_tile of sdS): half h
// must put the accumulator element (key, q) of its 64 x 64 tile at sdS(key, 64 h + q), and the
// two halves together write every element of the buffer once.
template <typename Traits>
static void check_ds_store_halves() {
  constexpr int kM = Traits::kBlockM, kN = Traits::kBlockN, kD = Traits::kHeadDim;
  static_assert(kM == 128, "halves of 128-row tiles");
  typename Traits::TiledMmaSdPHalf mma;
  auto s2s = make_tiled_copy_C(typename Traits::SmemCopydS{}, mma);
  alignas(1024) static cutlass::bfloat16_t buf[2 * kN * kM];
  Tensor sdS = make_tensor(make_smem_ptr(buf), typename Traits::SmemLayoutdS{});
  auto dsh = Shape<Int<kN>, _64, Int<Traits::kDsBufs>>{};
  Tensor ident = make_identity_tensor(Shape<Int<kN>, _64>{});
  std::vector<int> seen(kN * kM, 0);
  for (int h = 0; h < 2; ++h) {
    Tensor half = h == 0 ? local_tile(sdS, dsh, make_coord(_0{}, _0{}, _0{}))
                         : local_tile(sdS, dsh, make_coord(_0{}, _1{}, _0{}));
    for (int tidx = 0; tidx < Traits::kNumMmaThreads; ++tidx) {
      auto thr = s2s.get_thread_slice(tidx);
      Tensor reg = thr.retile_S(mma.get_thread_slice(tidx).partition_C(ident));
      Tensor src = thr.partition_S(ident);
      Tensor dst_coord = thr.partition_D(ident);
      Tensor dst = thr.partition_D(half)(_, _, _, 0);
      for (int i = 0; i < int(size(src)); ++i)
        CHECK(get<0>(reg(i)) == get<0>(src(i)) && get<1>(reg(i)) == get<1>(src(i)),
              "halves, tidx %d value %d: register and copy source differ", tidx, i);
      for (int i = 0; i < int(size(dst)); ++i) {
        const int key = int(get<0>(dst_coord(i))), q = int(get<1>(dst_coord(i)));
        const int off = int(&dst(i) - buf), want = int(&sdS(key, 64 * h + q, 0) - buf);
        CHECK(off == want, "hdim %d half %d tidx %d value %d: offset %d, layout %d", kD, h, tidx,
              i, off, want);
        if (off >= 0 && off < kN * kM) ++seen[off];
      }
    }
  }
  for (int f = 0; f < kN * kM; ++f)
    CHECK(seen[f] == 1, "hdim %d halves: dS^T element %d written %d times", kD, f, seen[f]);
  // The half views of the Q / dO stages (S^T, dP^T B operands) and of their (D, rows) views
  // (dV, dK B operands) address rows [64 h, 64 h + 64) of the full tiles.
  alignas(1024) static cutlass::bfloat16_t qbuf[cute::cosize_v<typename Traits::SmemLayoutQ>];
  Tensor sQ = make_tensor(make_smem_ptr(qbuf), typename Traits::SmemLayoutQ{});
  Tensor sQt = make_tensor(make_smem_ptr(qbuf), typename Traits::SmemLayoutQt{});
  auto qh = Shape<_64, Int<kD>, Int<Traits::kStages>>{};
  auto qth = Shape<Int<kD>, _64, Int<Traits::kStages>>{};
  for (int h = 0; h < 2; ++h) {
    Tensor q = h == 0 ? local_tile(sQ, qh, make_coord(_0{}, _0{}, _0{}))
                      : local_tile(sQ, qh, make_coord(_1{}, _0{}, _0{}));
    Tensor qt = h == 0 ? local_tile(sQt, qth, make_coord(_0{}, _0{}, _0{}))
                       : local_tile(sQt, qth, make_coord(_0{}, _1{}, _0{}));
    for (int st = 0; st < Traits::kStages; ++st)
      for (int r = 0; r < 64; ++r)
        for (int c = 0; c < kD; ++c) {
          CHECK(&q(r, c, st) == &sQ(64 * h + r, c, st), "Q half %d (%d, %d, %d)", h, r, c, st);
          CHECK(&qt(c, r, st) == &sQ(64 * h + r, c, st), "Q^T half %d (%d, %d, %d)", h, c, r, st);
        }
  }
}

// The consumer loop's per-element rule for one (query tile m, KV tile n) pair: key r of the KV
// tile (the accumulator's row), query c of the query tile (its column).
template <int kM, int kN>
static bool kernel_visible(int m, int n, int key, int q, int sq, int sk, int wl, int wr) {
  const int m0 = m * kM, n0 = n * kN;
  const bool need_mask = n0 + kN > sk || m0 + kM > sq ||
                         !tile_fully_visible(m, n, kM, kN, sq, sk, wl, wr);
  const TileMask tm = tile_mask(need_mask, m0, n0, sq, sk, wl, wr);
  const int dlt = key - q;
  return key < tm.key_lim && q < tm.q_lim && dlt <= tm.d_hi && dlt >= tm.d_lo;
}

template <int kM, int kN>
static void check_walk() {
  const int lens[] = {1, 63, 64, 65, 127, 128, 129, 200, 333, 513};
  const int wins[][2] = {{-1, -1}, {-1, 0}, {50, 0}, {64, 32}, {0, 0}, {1500, -1}, {-1, 100},
                         {200, 130}};
  for (int sq : lens)
    for (int sk : lens)
      for (auto& w : wins) {
        const int wl = w[0], wr = w[1];
        const int n_tiles = (sk + kN - 1) / kN, m_tiles = (sq + kM - 1) / kM;
        std::vector<int> first(m_tiles, -1), count(m_tiles, 0);
        for (int n = 0; n < n_tiles; ++n) {
          const TileRange rg = bwd_query_tiles(n, kM, kN, sq, sk, wl, wr);
          for (int m = 0; m < m_tiles; ++m) {
            const bool visited = m >= rg.begin && m < rg.end;
            if (visited) {
              CHECK(first[m] < 0 || first[m] + count[m] == n,
                    "%dx%d sq %d sk %d w (%d, %d): KV tiles of query tile %d not contiguous", kM,
                    kN, sq, sk, wl, wr, m);
              if (first[m] < 0) first[m] = n;
              const int rank = bwd_sm90::kv_tile_rank(n, m, kM, kN, sq, sk, wl, wr);
              CHECK(rank == count[m], "%dx%d sq %d sk %d w (%d, %d): tile (%d, %d) rank %d not %d",
                    kM, kN, sq, sk, wl, wr, m, n, rank, count[m]);
              ++count[m];
            }
            for (int q = 0; q < kM; ++q)
              for (int key = 0; key < kN; ++key) {
                const int i = m * kM + q, j = n * kN + key;
                const bool ref = i < sq && j < sk && mask_visible(i, j, sq, sk, wl, wr);
                if (!visited) {
                  CHECK(!ref, "%dx%d: tile (%d, %d) skipped but (%d, %d) visible", kM, kN, m, n,
                        i, j);
                  continue;
                }
                const bool got = kernel_visible<kM, kN>(m, n, key, q, sq, sk, wl, wr);
                CHECK(got == ref, "%dx%d sq %d sk %d w (%d, %d): (%d, %d) kernel %d ref %d", kM,
                      kN, sq, sk, wl, wr, i, j, int(got), int(ref));
              }
          }
        }
      }
}

int main() {
  std::setvbuf(stdout, nullptr, _IONBF, 0);
  using T64 = FlashBwdSm90Traits<cutlass::bfloat16_t, 64>;    // 128-row tiles in halves
  using T128 = FlashBwdSm90Traits<cutlass::bfloat16_t, 128>;  // 64-row tiles
  check_dq_stores<T64>();
  check_dq_stores<T128>();
  check_ds_stores<T128>();
  check_ds_store_halves<T64>();
  check_walk<T64::kBlockM, T64::kBlockN>();
  check_walk<T128::kBlockM, T128::kBlockN>();
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("all dQ / dS^T store, walk and mask checks passed (hdim 64 128-row, hdim 128 64-row tiles)\n");
  return 0;
}
