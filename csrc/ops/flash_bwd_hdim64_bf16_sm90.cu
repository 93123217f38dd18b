// Instantiation of the flash-attention backward (TMA + wgmma kernel, flash_bwd_sm90.cuh)
// for head_dim 64, bf16; registers itself in the backward dispatch table and the build report.
#include "common/build_registry.h"
#include "longctx/flash/flash_bwd_launch.cuh"

namespace longctx {
namespace flash {
namespace {
const FlashBwdRegistration registration(64, true, &run_flash_bwd_sm90_wgmma<cutlass::bfloat16_t, 64>);
}  // namespace
}  // namespace flash

LONGCTX_REGISTER_KERNEL("flash_bwd", "cuda", "bf16", "hdim64,causal,window,gqa,varlen,deterministic");

}  // namespace longctx
