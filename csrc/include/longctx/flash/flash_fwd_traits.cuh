// Compile-time configuration of the Hopper (sm_90a) flash-attention forward kernel.
//
// What it fixes: tile sizes (kBlockM query rows x kBlockN keys per iteration), the number of
// K/V pipeline stages, the warpgroup roles and register budgets, the shared-memory layouts and
// the two wgmma tiled MMAs:
//   GEMM0  S(kBlockM x kBlockN) = Q(kBlockM x D) K^T      SS: both operands from smem, K-major
//   GEMM1  O(kBlockM x D)      += P(kBlockM x kBlockN) V   RS: P from registers, V (= B) MN-major
// Tiling: warpgroup 0 is the producer (one thread issues TMA), the kBlockM / 64 others are
// consumers; each consumer owns 64 of the kBlockM query rows (one wgmma atom of M = 64 each,
// AtomLayout kBlockM/64 x 1 x 1): 2 consumers (384 threads) with 128-row tiles, 3 (512
// threads) with hdim 64's 192-row tiles.
// Invariants: kHeadDim is a multiple of 64 (128-byte swizzle atoms of 64 16-bit elements),
// kBlockN a multiple of 16 (GEMM1 K step) and <= 256 (wgmma N); smem use <= 227 KB.
#pragma once

// wgmma N = 80 (hdim 256) and other non-multiple-of-64 N are behind this switch in CuTe; it must
// be seen before the first CuTe include of the translation unit (the instantiation files define
// it first thing too). The static_assert below catches a TU where it came too late.
#ifndef CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#endif

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

namespace longctx {
namespace flash {

// Tile shape per head dim and query tile height (bf16/fp16). Every head dim has 128-row tiles;
// hdim 64 also has FA3's 192-row tiles for long query sequences (fwd_tall_tiles in
// flash_fwd_launch.cuh). hdim 256 needs a narrow kBlockN to fit smem (2 stages).
template <int kHeadDim, int kBlockM = 128> struct FwdTileSize;
// Register split (setmaxnreg) producer / consumer: 128 * P + (kBlockM / 64) * 128 * C must not
// exceed the registers the CTA launches with (168 * 384 = 64512 with 2 consumers, 128 * 512 =
// 65536 with 3). 40/232 keeps the producer's scheduler loop spill-free; hdim 256 needs 240 in
// the consumers (232 spills there), so its producer gets 24 and spills 448 bytes in the
// persistent scheduler loop (docs/kernels/flash_fwd.md). hdim 64's three consumers of 192-row
// tiles get 160, as in FA3; 112-key tiles keep them spill-free (S 56, P 28 and O 32 registers
// per thread in the overlapped loop; with 128 keys the loop spills).
template <> struct FwdTileSize<64, 128>  { static constexpr int kBlockN = 128, kStages = 2, kProducerRegs = 40, kConsumerRegs = 232; };
template <> struct FwdTileSize<64, 192>  { static constexpr int kBlockN = 112, kStages = 2, kProducerRegs = 32, kConsumerRegs = 160; };
template <> struct FwdTileSize<128, 128> { static constexpr int kBlockN = 128, kStages = 2, kProducerRegs = 40, kConsumerRegs = 232; };
template <> struct FwdTileSize<256, 128> { static constexpr int kBlockN = 80,  kStages = 2, kProducerRegs = 24, kConsumerRegs = 240; };

template <typename Element_, int kHeadDim_, int kBlockM_ = 128,
          int kBlockN_ = FwdTileSize<kHeadDim_, kBlockM_>::kBlockN,
          int kStages_ = FwdTileSize<kHeadDim_, kBlockM_>::kStages>
struct FlashFwdTraits {
  using Element = Element_;      // cutlass::bfloat16_t or cutlass::half_t
  using ElementAccum = float;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;
  static constexpr int kNumMmaWarpGroups = kBlockM / 64;  // consumers
  static constexpr int kNumThreads = 128 * (kNumMmaWarpGroups + 1);
  static constexpr int kNumMmaThreads = 128 * kNumMmaWarpGroups;
  static constexpr int kProducerRegs = FwdTileSize<kHeadDim_, kBlockM_>::kProducerRegs;
  static constexpr int kConsumerRegs = FwdTileSize<kHeadDim_, kBlockM_>::kConsumerRegs;
  static_assert(kBlockM % 64 == 0 && kNumMmaWarpGroups >= 2 && kNumMmaWarpGroups <= 3,
                "2 or 3 consumer warpgroups");
  // Registers per thread at launch (__launch_bounds__(kNumThreads, 1)), a multiple of 8.
  static constexpr int kLaunchRegs = (65536 / kNumThreads) / 8 * 8;
  static_assert(128 * kProducerRegs + kNumMmaThreads * kConsumerRegs <= kLaunchRegs * kNumThreads,
                "setmaxnreg pool");
  // The consumers' main-loop steps take turns on the tensor cores (ConsumerPingPong) at head
  // dims up to 128, as in FA3; at 256 a step is long enough that the turns would only stall.
  static constexpr bool kPingPong = kHeadDim <= 128;

  static_assert(kHeadDim % 64 == 0, "head dim must be a multiple of 64");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "kBlockN");

  using TileShape_MNK = cute::Shape<cute::Int<kBlockM>, cute::Int<kBlockN>, cute::Int<kHeadDim>>;
  using AtomLayoutMNK = cute::Layout<cute::Shape<cute::Int<kNumMmaWarpGroups>, cute::_1, cute::_1>>;

  using TiledMma0 = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, ElementAccum, TileShape_MNK>(), AtomLayoutMNK{}));
  using TiledMma1 = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, ElementAccum,
                                 decltype(cute::select<0, 2, 1>(TileShape_MNK{})),
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>(),
      AtomLayoutMNK{}));

  static_assert(cute::size<1>(typename TiledMma0::AtomShape_MNK{}) == kBlockN,
                "GEMM0 must be one wgmma of N = kBlockN (CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED)");

  using SmemLayoutAtom = cute::GMMA::Layout_K_SW128_Atom<Element>;  // 8 x 64 elements
  using SmemLayoutQ = decltype(cute::tile_to_shape(
      SmemLayoutAtom{}, cute::make_shape(cute::Int<kBlockM>{}, cute::Int<kHeadDim>{})));
  using SmemLayoutK = decltype(cute::tile_to_shape(
      SmemLayoutAtom{},
      cute::make_shape(cute::Int<kBlockN>{}, cute::Int<kHeadDim>{}, cute::Int<kStages>{})));
  using SmemLayoutV = SmemLayoutK;
  // V viewed as the B operand of GEMM1: (D, kBlockN, stage), D contiguous (MN-major).
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutV{},
      cute::make_ordered_layout(
          cute::make_shape(cute::Int<kHeadDim>{}, cute::Int<kBlockN>{}, cute::Int<kStages>{}),
          cute::Step<cute::_2, cute::_1, cute::_3>{})));

  // Epilogue: at head dims up to 128 each consumer warpgroup writes its 64 rows of O to shared
  // memory by stmatrix and one thread stores them with a TMA store (epilogue_fwd.cuh); at 256
  // the K/V stages leave no room and O goes out from registers.
  static constexpr bool kTmaStoreO = kHeadDim <= 128;
  using SmemLayoutOWg = decltype(cute::tile_to_shape(
      SmemLayoutAtom{}, cute::make_shape(cute::_64{}, cute::Int<kHeadDim>{})));
  static constexpr int kSmemOElems =
      kTmaStoreO ? int(cute::cosize_v<SmemLayoutOWg>) * kNumMmaWarpGroups : 8;
  // A warpgroup's share of the O tile as one wgmma atom (the same per-thread accumulator layout
  // as its slice of TiledMma1), for the stmatrix partition of its 64 rows.
  using TiledMmaOWg = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, ElementAccum,
                                 cute::Shape<cute::_64, cute::Int<kHeadDim>, cute::Int<kBlockN>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>()));

  using MainloopPipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename cutlass::PipelineState<kStages>;

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>> smem_q;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>> smem_k;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutV>> smem_v;
    alignas(kTmaStoreO ? 1024 : 16) cute::array_aligned<Element, kSmemOElems> smem_o;
    alignas(16) cutlass::arch::ClusterTransactionBarrier barrier_q;  // Q tile landed
    alignas(16) cutlass::arch::ClusterBarrier barrier_q_empty;       // consumers done with Q
    // Tile-id hand-off from the producer (which asks the scheduler) to the consumers: 2 slots.
    alignas(16) cutlass::arch::ClusterBarrier tile_full[2];   // id written (1 arrival)
    alignas(16) cutlass::arch::ClusterBarrier tile_empty[2];  // id read (kNumMmaThreads arrivals)
    int tile_ids[2];
    alignas(16) typename MainloopPipeline::SharedStorage pipeline_k;
    alignas(16) typename MainloopPipeline::SharedStorage pipeline_v;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "shared memory");

  static constexpr uint32_t kTmaBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kTmaBytesK = kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kTmaBytesV = kTmaBytesK;

  // Global tensors as the TMA sees them: (rows, D, heads, batch), element strides, D contiguous.
  using ShapeQKV = cute::Shape<int32_t, int32_t, int32_t, int32_t>;
  using StrideQKV = cute::Stride<int64_t, cute::_1, int64_t, int64_t>;
  using LayoutQKV = cute::Layout<ShapeQKV, StrideQKV>;
  using TMA_Q = decltype(cute::make_tma_copy(
      cute::SM90_TMA_LOAD{},
      cute::make_tensor(cute::make_gmem_ptr(static_cast<Element const*>(nullptr)), ShapeQKV{}, StrideQKV{}),
      SmemLayoutQ{}, cute::select<0, 2>(TileShape_MNK{}), cute::_1{}));
  using TMA_KV = decltype(cute::make_tma_copy(
      cute::SM90_TMA_LOAD{},
      cute::make_tensor(cute::make_gmem_ptr(static_cast<Element const*>(nullptr)), ShapeQKV{}, StrideQKV{}),
      cute::take<0, 2>(SmemLayoutK{}), cute::select<1, 2>(TileShape_MNK{}), cute::_1{}));
  // out as the TMA store sees it: batched launches only (varlen rows past a sequence belong to
  // the next one), box of one warpgroup's 64 rows.
  using TMA_O = decltype(cute::make_tma_copy(
      cute::SM90_TMA_STORE{},
      cute::make_tensor(cute::make_gmem_ptr(static_cast<Element*>(nullptr)), ShapeQKV{}, StrideQKV{}),
      SmemLayoutOWg{}, cute::make_shape(cute::_64{}, cute::Int<kHeadDim>{}), cute::_1{}));
};

}  // namespace flash
}  // namespace longctx
