// One instantiation of the flash-attention backward for the standalone test and benchmark
// (tests/cpp/flash_bwd_test.cu, bench/cpp/flash_bwd_bench.cu), compiled once per
// -DHD=<64|128|256> -DBF16=<0|1> [-DLDSM=0] [-DBLOCKN=<64|128>] by bench/cpp/run_flash_bwd.sh.
// LDSM=1 (default) registers into the dispatch table; LDSM=0 (element-wise smem operand loads,
// a slower cross-check of the ldmatrix path) defines flash_bwd_fallback instead.
#include "longctx/flash/flash_bwd_launch.cuh"
#ifndef LDSM
#define LDSM 1
#endif
#ifndef BLOCKN
#define BLOCKN 64
#endif
using Elem = std::conditional_t<LCX_BF16, cutlass::bfloat16_t, cutlass::half_t>;
#if LDSM && BLOCKN == 64
namespace {
const longctx::flash::FlashBwdRegistration reg(LCX_HD, LCX_BF16, &longctx::flash::run_flash_bwd_sm90<Elem, LCX_HD, BLOCKN, true>);
}
#elif LDSM
longctx::flash::FlashBwdFn flash_bwd_blockn128 = &longctx::flash::run_flash_bwd_sm90<Elem, LCX_HD, BLOCKN, true>;
#else
longctx::flash::FlashBwdFn flash_bwd_fallback = &longctx::flash::run_flash_bwd_sm90<Elem, LCX_HD, BLOCKN, false>;
#endif
