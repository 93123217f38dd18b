// One instantiation of the flash-attention backward for the standalone test and benchmark
// (tests/cpp/flash_bwd_test.cu, bench/cpp/flash_bwd_bench.cu), compiled once per
// -DLCX_HD=<64|128|256> -DLCX_BF16=<0|1> [-DV1=1] by bench/cpp/run_flash_bwd.sh.
// Default: the kernel the extension registers for that head dim (TMA + wgmma for 64/128, the
// first version for 256) goes into the dispatch table. V1=1 (hdim 64/128) defines
// flash_bwd_v1 = the first-version (mma.sync) kernel instead, as a cross-check and baseline.
#include "longctx/flash/flash_bwd_launch.cuh"
#ifndef V1
#define V1 0
#endif
using Elem = std::conditional_t<LCX_BF16, cutlass::bfloat16_t, cutlass::half_t>;
#if V1
longctx::flash::FlashBwdFn flash_bwd_v1 = &longctx::flash::run_flash_bwd_sm90<Elem, LCX_HD, 128, true>;
#elif LCX_HD == 256
namespace {
const longctx::flash::FlashBwdRegistration reg(LCX_HD, LCX_BF16, &longctx::flash::run_flash_bwd_sm90<Elem, LCX_HD>);
}
#else
namespace {
const longctx::flash::FlashBwdRegistration reg(LCX_HD, LCX_BF16, &longctx::flash::run_flash_bwd_sm90_wgmma<Elem, LCX_HD>);
}
#endif
