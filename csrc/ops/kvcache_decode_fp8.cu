// Split-KV decode for fp8 caches: the kvcache_decode_launch.cuh instantiations of this format
// (bf16 and fp16 queries, head_dim 64/128/256, 1/4/8 packed rows per CTA).
#define LONGCTX_KVCACHE_DECODE_IMPL
#include "ops/kvcache_decode_launch.cuh"

namespace longctx {
namespace kvcache_launch {
LONGCTX_INSTANTIATE_KV_DECODE(Format::kFp8E4M3)
}  // namespace kvcache_launch
}  // namespace longctx
