// Host side of the split-KV decode (kvcache_decode.cuh): split-count choice, scratch, launches of
// the decode and merge kernels for one (element type, cache format). Instantiated per format in
// kvcache_decode_{native,int8,fp8}.cu (nvcc compiles one file serially: three files build in
// parallel) and called by the op in kvcache_cuda.cu.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <utility>
#include "longctx/kvcache/kvcache_decode.cuh"
#include "longctx/kvcache/kvcache_decode_mma.cuh"
#include "longctx/kvcache/kvcache_decode_staged.cuh"

namespace longctx {
namespace kvcache_launch {

namespace kc = kvcache::cuda;
using kvcache::Format;

// err: the launch call's own result; a launch error also stays in cudaGetLastError (cleared here).
inline void check_launch(const char* op, const char* what, cudaError_t err = cudaSuccess) {
  const cudaError_t last = cudaGetLastError();
  if (err == cudaSuccess) err = last;
  TORCH_CHECK(err == cudaSuccess, "longctx.", op, ": ", what, " launch failed: ",
              cudaGetErrorString(err));
}

// Runs the decode path for element type T (__nv_bfloat16 / __half) and format F; head_dim must
// be 64, 128 or 256. num_splits = 0: automatic. out_accum / lse_accum receive the split scratch
// (kept alive by the caller until the kernels are enqueued).
template <typename T, Format F>
void run_decode(kvcache::AttnParams& p, const at::Tensor& q, int64_t num_splits,
                int64_t max_keys, at::Tensor& out_accum, at::Tensor& lse_accum,
                cudaStream_t stream);

#ifdef LONGCTX_KVCACHE_DECODE_IMPL

// The decode kernels, all 128 threads on the same (split, kv head x row tile, sequence) grid.
// Variant 0 (default): 8-bit caches at head_dim 64/128 whose layout allows 16-byte copies
// (staged_decode_ok): the cp.async-staged tensor-core kernel (kvcache_decode_staged.cuh, 6 stages,
// 2 CTAs per SM); other head_dim 128 cases: the register tensor-core kernel
// (kvcache_decode_mma.cuh); the rest: the CUDA-core kernel (kvcache_decode.cuh).
// Variant 1: the CUDA-core kernel everywhere (the first design, a second implementation for the
// tests). Variant 2: the register tensor-core kernel at head_dim 128 (the previous 8-bit default).
// Variant 3: the staged kernel with 4 stages and 3 CTAs per SM (depth against occupancy; it
// spills 64 bytes at int8 and measured 2-8% slower than 6 stages / 2 CTAs in the first run).
// int8 scales: kernel 0 copies this head's 16 K and 16 V scales of a tile 4 bytes per key; with
// the scales head-major within a page (as PagedKVCache and longctx.int8_scales store them) these
// are 2 x 64 contiguous bytes, one request each, the bytes the tile needs and no more. Kernel 4
// (the default where the scales are slot-major, contiguous per page with kv_heads <= 8,
// staged_line_scales_ok) copies the scales of all kv heads of a tile's slots as whole 16-byte
// pieces (5 stages to stay at 2 CTAs per SM) instead of one 4-byte scale per 32-byte sector;
// LONGCTX_KV_DECODE_VARIANT=4 selects kernel 0 whatever the layout (measurement). Measured
// (bench/NOTES.md, "Decode, session 10"): kernel 0 on head-major scales against kernel 4 on
// slot-major ones, 128K batch 1 -4.9 us (-4.7%), batch 16 -0.45%, 32K batch 1 even, batch 16
// +0.45%; a kernel copying this head's 64 bytes as 4 + 4 16-byte pieces (evict-first, 6 stages)
// was 0.6-3 us slower than kernel 0. The alternatives are measured beside the default in
// bench/kvcache.py.
template <typename T, Format F, int D, int GT, int Variant>
struct DecodeKernel {
  static constexpr bool k8bit = F != Format::kNative;
  static constexpr bool kLineScales = Variant == 4 && F == Format::kInt8;
  static constexpr bool kStaged =
      k8bit && (D == 64 || D == 128) && (Variant == 0 || Variant == 3 || Variant == 4);
  static constexpr bool kMma = !kStaged && D == 128 && Variant != 1;
  static constexpr int kU = (F == Format::kNative ? 4 : 8) / (GT == 8 ? 2 : 1);  // CUDA cores
  static constexpr int kNT = k8bit ? 2 : 1;
  static constexpr int kStages = Variant == 3 ? 4 : kLineScales ? 5 : 6;
  static constexpr int kStagedMinBlocks = Variant == 3 ? 3 : 2;
  static constexpr int smem_bytes() {
    if constexpr (kStaged) {
      return kc::StagedLayout<F, D, kStages, kLineScales>::kSmemBytes;
    } else {
      return 0;
    }
  }
  static constexpr auto fn() {
    if constexpr (kStaged) {
      return &kc::kvcache_decode_staged_kernel<T, F, D, GT, kStages, kStagedMinBlocks,
                                               kLineScales>;
    } else if constexpr (kMma) {
      return &kc::kvcache_decode_mma_kernel<T, F, D, GT, kNT, 1>;
    } else {
      return &kc::kvcache_decode_kernel<T, F, D, GT, kU, 1>;
    }
  }
  // Sets the dynamic shared memory limit on the current device (on every call: the attribute
  // belongs to a device, and one driver call is nothing next to a decode) and returns the CTAs
  // per SM (computed once per device).
  static int prepare() {
    // (also at <= 48 KiB: dynamic plus static shared memory may pass the default limit)
    if (smem_bytes() > 0) {
      const cudaError_t err = cudaFuncSetAttribute(
          fn(), cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes());
      TORCH_CHECK(err == cudaSuccess, "longctx.flash_attn_with_kvcache: cannot give the decode "
                  "kernel ", smem_bytes(), " bytes of shared memory: ", cudaGetErrorString(err));
    }
    static std::atomic<int> occ_by_device[64];  // 0: not computed yet
    int dev = 0;
    cudaGetDevice(&dev);
    const bool cached = dev >= 0 && dev < 64;
    if (cached && occ_by_device[dev].load() > 0) return occ_by_device[dev].load();
    int n = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, fn(), kc::kDecodeThreads, smem_bytes());
    n = std::max(1, n);
    if (cached) occ_by_device[dev].store(n);
    return n;
  }
};

// Whether the staged kernel can take this cache: every 16-byte piece of a key row must be a
// 16-byte aligned address (base pointers and page / slot / head strides; for 8-bit caches the
// element strides are bytes), a 16-key tile must lie in one page, and the offsets of a tile's
// 16 slots must fit in int32 (the kernel's per-lane copy offsets); the pool must hold a page
// (copies of invalid tiles point into page 0 with size 0).
inline bool staged_decode_ok(const kvcache::PagedKV& c) {
  auto a16 = [&](const kvcache::CacheView& v) {
    return reinterpret_cast<uintptr_t>(v.data) % 16 == 0 && v.page_stride % 16 == 0 &&
           v.slot_stride % 16 == 0 && v.head_stride % 16 == 0 && v.slot_stride >= 0 &&
           16 * v.slot_stride + c.head_dim < (int64_t(1) << 31);
  };
  return c.format != Format::kNative && c.block_size % 16 == 0 && c.num_blocks >= 1 &&
         a16(c.k) && a16(c.v);
}

// Whether kernel 4's scale copies apply: int8, scales (num_blocks, block_size, kv_heads)
// contiguous within a page, 16-byte aligned page starts, kv_heads <= 8.
inline bool staged_line_scales_ok(const kvcache::PagedKV& c) {
  auto ok = [&](const kvcache::CacheView& v) {
    return v.scale_head_stride == 1 && v.scale_slot_stride == c.kv_heads &&
           reinterpret_cast<uintptr_t>(v.token_scale) % 16 == 0 && v.scale_page_stride % 4 == 0;
  };
  return c.format == Format::kInt8 && c.kv_heads <= kc::kLineScaleHeads && ok(c.k) && ok(c.v);
}

// Measurement switches, read per call (the benchmark and the tests time or check several in one
// process): LONGCTX_KV_DECODE_GRID=splits launches the split-major grid (the first design),
// LONGCTX_KV_DECODE_L2HINT=0 drops the evict-first hint, LONGCTX_KV_DECODE_VARIANT=1 / 2 / 3
// selects that variant and 4 the per-key int8 scale copies (run_decode maps it to kernel 0),
// LONGCTX_KV_DECODE_TILES=contiguous gives the staged kernel's splits contiguous key ranges (the
// default deals 16-key tiles round-robin to all warps of a row tile).
inline bool env_is(const char* name, const char* value) {
  const char* e = std::getenv(name);
  return e != nullptr && std::string(e) == value;
}

// Programmatic dependent launch (grid_dependency.cuh) on sm_90+: the decode and merge kernels
// may be launched while the kernel before them runs, and wait for it before their first memory
// access (the same ordering, the launch latency hidden). LONGCTX_KV_DECODE_PDL=0 launches them
// plainly, =early lets the staged kernel release the merge kernel at its start instead of after
// its key loop (measurement).
inline bool use_pdl() {
  return at::cuda::getCurrentDeviceProperties()->major >= 9 &&
         !env_is("LONGCTX_KV_DECODE_PDL", "0");
}

// Launches kernel<<<grid, block, smem, stream>>>(args...), with the programmatic stream
// serialization attribute when pdl (the kernel must call grid_dependency_wait() first).
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, int block, int smem,
                          cudaStream_t stream, bool pdl, Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(static_cast<unsigned>(block));
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

inline int decode_variant() {
  const char* e = std::getenv("LONGCTX_KV_DECODE_VARIANT");
  return e == nullptr || e[0] < '1' || e[0] > '4' ? 0 : e[0] - '0';
}

// Split count for `base` CTAs of `occ` per SM. A call's time goes as waves / splits (each CTA
// does 1 / splits of its row tile's keys, ceil(base * splits / slots) waves), plus a small cost
// per split (partials to write and merge, per-CTA ramp): the count minimizes
// ceil(base * s / slots) / s * (1 + 0.002 s), with at least 256 keys per split and at most 256
// splits. The first rule (waves >= 95% full) took 32 splits where 33 fill the device at batch 1
// (measured 2% slower).
inline int choose_splits(int64_t base, int occ, int sms, int64_t max_keys) {
  const int64_t slots = int64_t(occ) * sms;
  if (base >= slots) return 1;
  const int max_s = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(256, max_keys / 256)));
  auto cost = [&](int s) {
    return double((base * s + slots - 1) / slots) / double(s) * (1.0 + 0.002 * s);
  };
  int best = 1;
  for (int s = 2; s <= max_s; ++s)
    if (cost(s) < cost(best)) best = s;
  return best;
}

// Staged 8-bit kernel: adjacent 16-key tiles a warp takes per round-robin step, as a log2.
// Pairs where a warp has at least 48 tiles (max_keys, the block table's capacity, over the
// row tile's splits x 4 warps): measured 0-2.3 us faster at 128K batch 1 (three H100s) and
// 0.6-0.9% at batch 16 (one), 0.2-0.6 us slower at 16K-64K batch 1, where single tiles stay
// (bench/NOTES.md, "Decode, session 9"). The order is fixed before the key counts are read
// (the first page ids are loaded while cache_seqlens is in flight), hence the capacity rather
// than the lengths.
// LONGCTX_KV_DECODE_TILES=single|pairs|quads overrides (measurement).
inline int tile_run_log2(int64_t max_keys, int splits) {
  if (env_is("LONGCTX_KV_DECODE_TILES", "single")) return 0;
  if (env_is("LONGCTX_KV_DECODE_TILES", "pairs")) return 1;
  if (env_is("LONGCTX_KV_DECODE_TILES", "quads")) return 2;
  const int64_t tiles_per_warp = (max_keys + 15) / 16 / (int64_t(splits) * kc::kMmaWarps);
  return tiles_per_warp >= 48 ? 1 : 0;
}

template <typename T, Format F, int D, int GT, int Variant>
void launch_decode(kvcache::AttnParams& p, const at::Tensor& q, int64_t num_splits,
                   int64_t max_keys, at::Tensor& out_accum, at::Tensor& lse_accum,
                   cudaStream_t stream) {
  using K = DecodeKernel<T, F, D, GT, Variant>;
  const int group = p.heads / p.cache.kv_heads;
  const int64_t rows = int64_t(p.seqlen_q) * group;
  const int m_tiles = static_cast<int>((rows + GT - 1) / GT);
  const int64_t base = int64_t(p.cache.batch) * p.cache.kv_heads * m_tiles;
  TORCH_CHECK(int64_t(p.cache.kv_heads) * m_tiles <= 65535 && p.cache.batch <= 65535,
              "longctx.flash_attn_with_kvcache: batch (", p.cache.batch, ") and kv_heads x query "
              "tiles (", int64_t(p.cache.kv_heads) * m_tiles, ") must be <= 65535 on CUDA");
  const int occ = K::prepare();  // shared memory limit set on this device, CTAs per SM
  int splits = static_cast<int>(num_splits);
  if (splits == 0) {
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    splits = choose_splits(base, occ, sms, max_keys);
  }
  p.num_splits = splits;
  if (splits > 1) {
    out_accum = at::empty({splits, p.total_q, p.heads, p.cache.head_dim},
                          q.options().dtype(at::kFloat));
    lse_accum = at::empty({splits, p.heads, p.total_q}, q.options().dtype(at::kFloat));
    p.out_accum = out_accum.data_ptr<float>();
    p.lse_accum = lse_accum.data_ptr<float>();
  }
  p.decode_heads_fastest = !env_is("LONGCTX_KV_DECODE_GRID", "splits");
  p.decode_l2_hint = !env_is("LONGCTX_KV_DECODE_L2HINT", "0");
  p.decode_pdl_early = env_is("LONGCTX_KV_DECODE_PDL", "early");
  p.decode_contiguous_splits = env_is("LONGCTX_KV_DECODE_TILES", "contiguous");
  p.decode_tile_run_log2 = tile_run_log2(max_keys, splits);
  const unsigned hy = static_cast<unsigned>(p.cache.kv_heads * m_tiles);
  const dim3 grid = p.decode_heads_fastest ? dim3(hy, splits, p.cache.batch)
                                           : dim3(splits, hy, p.cache.batch);
  const bool pdl = use_pdl();
  const kvcache::AttnParams& cp = p;
  check_launch("flash_attn_with_kvcache", "decode kernel",
               launch_kernel(K::fn(), grid, kc::kDecodeThreads, K::smem_bytes(), stream, pdl, cp,
                             m_tiles));
  if (splits > 1) {
    TORCH_CHECK(p.heads <= 65535, "longctx.flash_attn_with_kvcache: heads must be <= 65535");
    check_launch("flash_attn_with_kvcache", "merge kernel",
                 launch_kernel(&kc::kvcache_merge_kernel<T, D>,
                               dim3(static_cast<unsigned>(p.total_q),
                                    static_cast<unsigned>(p.heads)),
                               kc::kMergeThreads, 0, stream, pdl, cp));
  }
}

template <typename T, Format F, int D, int Variant>
void launch_decode_gt(kvcache::AttnParams& p, const at::Tensor& q, int64_t num_splits,
                      int64_t max_keys, at::Tensor& oa, at::Tensor& la, cudaStream_t stream) {
  const int64_t rows = int64_t(p.seqlen_q) * (p.heads / p.cache.kv_heads);
  if (rows <= 1) {
    launch_decode<T, F, D, 1, Variant>(p, q, num_splits, max_keys, oa, la, stream);
  } else if (rows <= 4) {
    launch_decode<T, F, D, 4, Variant>(p, q, num_splits, max_keys, oa, la, stream);
  } else {
    launch_decode<T, F, D, 8, Variant>(p, q, num_splits, max_keys, oa, la, stream);
  }
}

template <typename T, Format F>
void run_decode(kvcache::AttnParams& p, const at::Tensor& q, int64_t num_splits,
                int64_t max_keys, at::Tensor& oa, at::Tensor& la, cudaStream_t stream) {
  // The staged kernels run only where staged_decode_ok holds, else variant 2's kernel.
  // Kernel configuration (DecodeKernel's Variant) from the env variant: 4 -> 0 (per-key int8
  // scale copies); the default takes 4 (line scales) where staged_line_scales_ok holds.
  const int env_v = decode_variant();
  int v = env_v == 4 ? 0 : env_v;
  if (env_v == 0 && staged_line_scales_ok(p.cache)) v = 4;
  if ((v == 0 || v == 3 || v == 4) && F != Format::kNative && !staged_decode_ok(p.cache)) v = 2;
  switch (p.cache.head_dim) {
    case 64:
      if (v == 4) {  // int8 only (staged_line_scales_ok)
        if constexpr (F == Format::kInt8)
          launch_decode_gt<T, F, 64, 4>(p, q, num_splits, max_keys, oa, la, stream);
      } else if (v == 0) {
        launch_decode_gt<T, F, 64, 0>(p, q, num_splits, max_keys, oa, la, stream);
      } else {
        launch_decode_gt<T, F, 64, 1>(p, q, num_splits, max_keys, oa, la, stream);
      }
      break;
    case 128:
      if (v == 1) {
        launch_decode_gt<T, F, 128, 1>(p, q, num_splits, max_keys, oa, la, stream);
      } else if (v == 2) {
        launch_decode_gt<T, F, 128, 2>(p, q, num_splits, max_keys, oa, la, stream);
      } else if (v == 3) {
        launch_decode_gt<T, F, 128, 3>(p, q, num_splits, max_keys, oa, la, stream);
      } else if (v == 4) {  // int8 only (staged_line_scales_ok)
        if constexpr (F == Format::kInt8)
          launch_decode_gt<T, F, 128, 4>(p, q, num_splits, max_keys, oa, la, stream);
      } else {
        launch_decode_gt<T, F, 128, 0>(p, q, num_splits, max_keys, oa, la, stream);
      }
      break;
    default: launch_decode_gt<T, F, 256, 1>(p, q, num_splits, max_keys, oa, la, stream); break;
  }
}

#define LONGCTX_INSTANTIATE_KV_DECODE(F)                                                       \
  template void run_decode<__nv_bfloat16, F>(kvcache::AttnParams&, const at::Tensor&, int64_t, \
                                             int64_t, at::Tensor&, at::Tensor&, cudaStream_t); \
  template void run_decode<__half, F>(kvcache::AttnParams&, const at::Tensor&, int64_t,        \
                                      int64_t, at::Tensor&, at::Tensor&, cudaStream_t);
#endif  // LONGCTX_KVCACHE_DECODE_IMPL

}  // namespace kvcache_launch
}  // namespace longctx
