// Instantiation of the Hopper flash-attention forward kernel for head_dim 256, bf16; registers
// itself in the (head_dim, dtype) dispatch table and in the build report.
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED  // before any CuTe header (wgmma N = 80)
#include "common/build_registry.h"
#include "longctx/flash/flash_fwd_dispatch.cuh"
#include "longctx/flash/flash_fwd_launch.cuh"

namespace longctx {
namespace flash {
namespace {
const FlashFwdRegistration registration(256, true, &run_flash_fwd_sm90<cutlass::bfloat16_t, 256>);
}  // namespace
}  // namespace flash

LONGCTX_REGISTER_KERNEL("flash_fwd", "cuda", "bf16", "hdim256,causal,window,gqa,varlen");

}  // namespace longctx
