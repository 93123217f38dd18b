// Host side of the split-KV decode (framework-free): which kernel serves a call, its split count,
// and the launches of the decode and merge kernels for one (query element type, cache format).
// The generated kvcache_decode_<format>_<dtype>.cu files instantiate decode_fns<T, F>() and
// register it in DecodeTable; the torch launcher (csrc/kvcache/kvcache_cuda.cu) checks the
// arguments, allocates the split scratch and calls plan, decode and merge.
//
// Kernel choice (decode_choice.h, CUDA-free so that a CPU test checks it; every kernel runs 128
// threads on the grid (kv_heads x row tiles, splits, batch), GT = 1, 4 or 8 packed query rows per
// CTA). head_dim d (a multiple of 8 up to 256) runs the kernels of width D =
// decode_kernel_head_dim(d), 64, 128 or 256, the next compiled width up: the copies and loads
// read d columns of a key row, the columns past d are zeros in the math, and d columns are
// stored (outputs, split partials, merge).
//   - caches of any format and width whose layout allows 16-byte copies (staged_decode_ok:
//     every 16-bit pool whose page size is a multiple of 16; 8-bit pools need d a multiple of
//     16): the cp.async-staged tensor-core kernel (decode_staged.cuh), 2 CTAs per SM (1 for
//     16-bit at D = 256), staged_stages() deep (6 stages of 4 KiB; 3 of 8 KiB for 16-bit at
//     D = 128 and 8-bit at D = 256; 3 of 16 KiB for 16-bit at D = 256);
//     int8 scales copied per key (16 K and 16 V scales of a tile, two 64-byte requests where the
//     scales are head-major, as PagedKVCache stores them), or, where the scales are slot-major
//     with kv_heads <= 8 (staged_line_scales_ok), as whole 16-byte line copies of all kv heads'
//     scales of the tile's slots (5 stages, to stay at 2 CTAs per SM);
//   - the fallback for D = 128 layouts the staged kernel cannot take (page size not a
//     multiple of 16) whose key rows are 16-byte aligned whole pieces (rows_16b_aligned): the
//     register tensor-core kernel (decode_mma.cuh), whose loads are 16 bytes;
//   - the rest (D = 64 and 256 off the staged layouts; 8-bit rows aligned to 8 bytes only):
//     the CUDA-core kernel (decode_cuda_cores.cuh), whose 8-bit loads are 8 bytes.
// Then, with more than one split, the merge kernel (decode_merge.cuh). Both launches are
// programmatic dependent on sm_90 (grid_dependency.cuh): the same ordering, the launch latency
// hidden. Measurements behind these choices: docs/kernels/kvcache.md.
#pragma once
#include <cuda_runtime.h>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <utility>
#include "longctx/kvcache/decode_choice.h"
#include "longctx/kvcache/decode_cuda_cores.cuh"
#include "longctx/kvcache/decode_merge.cuh"
#include "longctx/kvcache/decode_mma.cuh"
#include "longctx/kvcache/decode_staged.cuh"
#include "longctx/kvcache/kvcache_params.h"
#include "longctx/registry.h"

namespace longctx {
namespace kvcache {

static_assert(kDecodeWarps == cuda::kMmaWarps, "decode_choice.h counts the kernels' warps");

// What plan() decides for one call.
struct DecodeLaunch {
  int splits = 1;         // CTAs per row tile (num_splits); > 1 needs the split scratch and merge
  int tile_run_log2 = 0;  // staged kernel: adjacent 16-key tiles per warp and round-robin step
  int smem_bytes = 0;     // dynamic shared memory of the decode kernel
};

// The entry points of one (element type, format) instantiation. Each returns the CUDA error of
// its runtime calls (cudaSuccess when all went well).
struct DecodeFns {
  // The kernel's shared-memory limit set on the current device, and the split count for
  // num_splits (0: automatic) over sms multiprocessors; max_keys: the block table's capacity.
  cudaError_t (*plan)(const AttnParams& p, int num_splits, int64_t max_keys, int sms,
                      DecodeLaunch* out) = nullptr;
  // The decode kernel; p.num_splits = l.splits and, with more than one split, p.out_accum /
  // p.lse_accum point to the scratch (kvcache_params.h).
  cudaError_t (*decode)(const AttnParams& p, const DecodeLaunch& l, bool pdl,
                        cudaStream_t stream) = nullptr;
  // The merge of p.num_splits > 1 partials into out and lse.
  cudaError_t (*merge)(const AttnParams& p, bool pdl, cudaStream_t stream) = nullptr;
};

struct DecodeTag {};
// Keyed by (int(Format), dtype of q).
using DecodeTable = KernelTable<DecodeTag, DecodeFns>;

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

// One decode kernel configuration: kernel(p, m_tiles) and its dynamic shared memory.
template <typename T, Format F, int D, int GT, DecodeKind kKind>
struct DecodeKernel {
  static constexpr bool kStaged = kKind == DecodeKind::kStaged ||
                                  kKind == DecodeKind::kStagedLineScales;
  static constexpr bool kLineScales = kKind == DecodeKind::kStagedLineScales;
  static constexpr bool kMma = kKind == DecodeKind::kMma;
  static constexpr int kStages = staged_stages(F, D, kLineScales);
  static constexpr int kStagedCtas = staged_ctas_per_sm(F, D);
  static constexpr int smem_bytes() {
    if constexpr (kStaged) {
      return cuda::StagedLayout<F, D, kStages, kLineScales>::kSmemBytes;
    } else {
      return 0;
    }
  }
  static constexpr auto fn() {
    if constexpr (kStaged) {
      return &cuda::kvcache_decode_staged_kernel<T, F, D, GT, kStages, kStagedCtas, kLineScales>;
    } else if constexpr (kMma) {
      return &cuda::kvcache_decode_mma_kernel<T, F, D, GT, F == Format::kNative ? 1 : 2, 1>;
    } else {
      constexpr int kU = (F == Format::kNative ? 4 : 8) / (GT == 8 ? 2 : 1);
      return &cuda::kvcache_decode_kernel<T, F, D, GT, kU, 1>;
    }
  }
  // CTAs per SM, computed once per device.
  static int occupancy() {
    static std::atomic<int> occ_by_device[64];  // 0: not computed yet
    int dev = 0;
    cudaGetDevice(&dev);
    const bool cached = dev >= 0 && dev < 64;
    if (cached && occ_by_device[dev].load() > 0) return occ_by_device[dev].load();
    int n = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, fn(), cuda::kDecodeThreads, smem_bytes());
    n = std::max(1, n);
    if (cached) occ_by_device[dev].store(n);
    return n;
  }
};

// Calls f(DecodeKernel<...>{}) for the configuration that serves p (decode_kind).
template <typename T, Format F, int D, int GT, typename Fn>
decltype(auto) with_decode_kernel_gt(const AttnParams& p, Fn&& f) {
  using Kind = DecodeKind;
  const Kind kind = decode_kind(p.cache);
  if constexpr (F == Format::kInt8) {
    if (kind == Kind::kStagedLineScales)
      return f(DecodeKernel<T, F, D, GT, Kind::kStagedLineScales>{});
  }
  if (kind == Kind::kStaged) return f(DecodeKernel<T, F, D, GT, Kind::kStaged>{});
  if constexpr (D == 128) {
    if (kind == Kind::kMma) return f(DecodeKernel<T, F, D, GT, Kind::kMma>{});
  }
  return f(DecodeKernel<T, F, D, GT, Kind::kCudaCores>{});
}

template <typename T, Format F, typename Fn>
decltype(auto) with_decode_kernel(const AttnParams& p, Fn&& f) {
  auto by_gt = [&](auto d) -> decltype(auto) {
    constexpr int D = decltype(d)::value;
    switch (decode_rows_per_cta(p)) {
      case 1: return with_decode_kernel_gt<T, F, D, 1>(p, f);
      case 4: return with_decode_kernel_gt<T, F, D, 4>(p, f);
      default: return with_decode_kernel_gt<T, F, D, 8>(p, f);
    }
  };
  switch (decode_kernel_head_dim(p.cache.head_dim)) {
    case 64: return by_gt(std::integral_constant<int, 64>{});
    case 128: return by_gt(std::integral_constant<int, 128>{});
    default: return by_gt(std::integral_constant<int, 256>{});
  }
}

template <typename T, Format F>
cudaError_t decode_plan(const AttnParams& p, int num_splits, int64_t max_keys, int sms,
                        DecodeLaunch* out) {
  return with_decode_kernel<T, F>(p, [&](auto k) -> cudaError_t {
    using K = decltype(k);
    out->smem_bytes = K::smem_bytes();
    // The dynamic shared memory limit belongs to a device: set on every call (one driver call
    // is nothing next to a decode; also at <= 48 KiB, where dynamic plus static shared memory
    // may pass the default limit).
    if (K::smem_bytes() > 0) {
      const cudaError_t err = cudaFuncSetAttribute(
          K::fn(), cudaFuncAttributeMaxDynamicSharedMemorySize, K::smem_bytes());
      if (err != cudaSuccess) return err;
    }
    const int64_t base = int64_t(p.cache.batch) * p.cache.kv_heads * decode_row_tiles(p);
    out->splits = num_splits > 0 ? num_splits : choose_splits(base, K::occupancy(), sms, max_keys);
    out->tile_run_log2 = tile_run_log2(max_keys, out->splits);
    return cudaSuccess;
  });
}

template <typename T, Format F>
cudaError_t decode_launch(const AttnParams& p, const DecodeLaunch& l, bool pdl,
                          cudaStream_t stream) {
  AttnParams kp = p;
  kp.decode_tile_run_log2 = l.tile_run_log2;
  const int m_tiles = decode_row_tiles(p);
  const dim3 grid(static_cast<unsigned>(p.cache.kv_heads * m_tiles),
                  static_cast<unsigned>(l.splits), static_cast<unsigned>(p.cache.batch));
  return with_decode_kernel<T, F>(p, [&](auto k) -> cudaError_t {
    using K = decltype(k);
    const AttnParams& cp = kp;
    return launch_kernel(K::fn(), grid, cuda::kDecodeThreads, K::smem_bytes(), stream, pdl, cp,
                         m_tiles);
  });
}

template <typename T, Format F>
cudaError_t decode_merge(const AttnParams& p, bool pdl, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.total_q), static_cast<unsigned>(p.heads));
  switch (decode_kernel_head_dim(p.cache.head_dim)) {
    case 64:
      return launch_kernel(&cuda::kvcache_merge_kernel<T, 64>, grid, cuda::kMergeThreads, 0,
                           stream, pdl, p);
    case 128:
      return launch_kernel(&cuda::kvcache_merge_kernel<T, 128>, grid, cuda::kMergeThreads, 0,
                           stream, pdl, p);
    default:
      return launch_kernel(&cuda::kvcache_merge_kernel<T, 256>, grid, cuda::kMergeThreads, 0,
                           stream, pdl, p);
  }
}

// The entry points of one instantiation (what the generated files register).
template <typename T, Format F>
DecodeFns decode_fns() {
  DecodeFns f;
  f.plan = &decode_plan<T, F>;
  f.decode = &decode_launch<T, F>;
  f.merge = &decode_merge<T, F>;
  return f;
}

}  // namespace kvcache
}  // namespace longctx
