// Host-only checks of the hdim 64/128 backward kernel's dQ tile stores (no GPU needed; the
// layouts are CuTe's, evaluated on the host with the kernel's own types), for both head dims:
//  1. Store i of consumer thread tidx writes registers r = dq_store_reg(tidx, i) and r + 1 at
//     dq_store_offset(dq_store_base(tidx), i): the byte offset in SmemLayoutdQ of the (query,
//     column) that the dQ TiledMma's partition gives register r, r + 1 the next float of the
//     same row; every even register is stored once.
//  2. The 256 threads' registers cover the 64 x D tile exactly once.
//  3. Each half-warp's 64-bit store (the unit a 64-bit shared store is served in) touches every
//     shared-memory bank exactly once: one wavefront per half-warp, no bank conflict.
// Exit code 0 iff all pass.
#include <cstdio>
#include <vector>
#include "longctx/flash/flash_bwd_sm90.cuh"
#include "host_check.h"

using namespace cute;
using namespace longctx::flash;

template <int kD>
static void check_dq_stores() {
  using Traits = FlashBwdSm90Traits<cutlass::bfloat16_t, kD>;
  constexpr int kM = Traits::kBlockM;
  alignas(1024) static float buf[kM * kD];
  Tensor sdQ = make_tensor(make_smem_ptr(buf), typename Traits::SmemLayoutdQ{});
  typename Traits::TiledMmadQ mma;
  std::vector<int> seen(kM * kD, 0);
  for (int tidx = 0; tidx < Traits::kNumMmaThreads; ++tidx) {
    auto coords = mma.get_thread_slice(tidx).partition_C(
        make_identity_tensor(Shape<Int<kM>, Int<kD>>{}));
    CHECK(int(size(coords)) == kD / 4, "hdim %d: %d registers", kD, int(size(coords)));
    const uint32_t base = bwd_sm90::dq_store_base<kD>(tidx);
    std::vector<int> stored(kD / 4, 0);
    for (int i = 0; i < int(size(coords)); i += 2) {
      const int reg = bwd_sm90::dq_store_reg(tidx, i);
      CHECK(reg % 2 == 0 && reg >= 0 && reg < kD / 4, "hdim %d tidx %d store %d: register %d",
            kD, tidx, i, reg);
      if (reg % 2 != 0 || reg < 0 || reg >= kD / 4) continue;
      ++stored[reg];
      const int r = int(get<0>(coords(reg))), c = int(get<1>(coords(reg)));
      const int r1 = int(get<0>(coords(reg + 1))), c1 = int(get<1>(coords(reg + 1)));
      CHECK(r1 == r && c1 == c + 1, "hdim %d tidx %d reg %d: (%d, %d) then (%d, %d)", kD, tidx,
            reg, r, c, r1, c1);
      const uint32_t off = bwd_sm90::dq_store_offset(base, i);
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
    for (int reg = 0; reg < kD / 4; reg += 2)
      CHECK(stored[reg] == 1, "hdim %d tidx %d: register %d stored %d times", kD, tidx, reg,
            stored[reg]);
  }
  for (int f = 0; f < kM * kD; ++f)
    CHECK(seen[f] == 1, "hdim %d: float %d written %d times", kD, f, seen[f]);
  for (int half = 0; half < Traits::kNumMmaThreads / 16; ++half)
    for (int i = 0; i < kD / 4; i += 2) {
      int bank[32] = {};
      for (int lane = 0; lane < 16; ++lane) {
        const uint32_t off =
            bwd_sm90::dq_store_offset(bwd_sm90::dq_store_base<kD>(16 * half + lane), i);
        ++bank[(off / 4) % 32];
        ++bank[(off / 4 + 1) % 32];
      }
      for (int k = 0; k < 32; ++k)
        CHECK(bank[k] == 1, "hdim %d half-warp %d store %d: bank %d hit %d times", kD, half, i,
              k, bank[k]);
    }
}

int main() {
  std::setvbuf(stdout, nullptr, _IONBF, 0);
  check_dq_stores<64>();
  check_dq_stores<128>();
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("all dQ tile store checks passed (hdim 64, 128)\n");
  return 0;
}
