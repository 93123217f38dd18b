// Host-only checks of the hdim 64/128 backward kernel's dQ tile stores (no GPU needed; the
// layouts are CuTe's, evaluated on the host with the kernel's own types), for both head dims:
//  1. dq_store_offset(dq_store_base(tidx), i) is, for every consumer thread and every even
//     accumulator register i, the byte offset in SmemLayoutdQ of the (query, column) that the
//     dQ TiledMma's partition gives register i, and register i + 1 is the next float of the
//     same row: the float2 stores put each value where the TMA reduce reads it.
//  2. The 256 threads' registers cover the 64 x D tile exactly once.
//  3. Each warp's float2 store of a register pair touches every shared-memory bank exactly
//     twice (a row-major tile: 8 banks 8 times each).
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
    for (int i = 0; i < int(size(coords)); i += 2) {
      const int r = int(get<0>(coords(i))), c = int(get<1>(coords(i)));
      const int r1 = int(get<0>(coords(i + 1))), c1 = int(get<1>(coords(i + 1)));
      CHECK(r1 == r && c1 == c + 1, "hdim %d tidx %d reg %d: (%d, %d) then (%d, %d)", kD, tidx,
            i, r, c, r1, c1);
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
  }
  for (int f = 0; f < kM * kD; ++f)
    CHECK(seen[f] == 1, "hdim %d: float %d written %d times", kD, f, seen[f]);
  for (int warp = 0; warp < Traits::kNumMmaThreads / 32; ++warp)
    for (int i = 0; i < kD / 4; i += 2) {
      int bank[32] = {};
      for (int lane = 0; lane < 32; ++lane) {
        const uint32_t off =
            bwd_sm90::dq_store_offset(bwd_sm90::dq_store_base<kD>(32 * warp + lane), i);
        ++bank[(off / 4) % 32];
        ++bank[(off / 4 + 1) % 32];
      }
      for (int k = 0; k < 32; ++k)
        CHECK(bank[k] == 2, "hdim %d warp %d reg %d: bank %d hit %d times", kD, warp, i, k,
              bank[k]);
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
