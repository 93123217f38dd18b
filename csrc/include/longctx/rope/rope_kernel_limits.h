// Limits of the RoPE kernels that launchers check before calling them (no CUDA headers here).
#pragma once

namespace longctx {
namespace rope {
constexpr int kMaxFrequencies = 256;  // rotary_dim <= 512
}  // namespace rope
}  // namespace longctx
