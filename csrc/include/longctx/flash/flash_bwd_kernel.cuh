// Flash-attention backward, step 2 of 3 (main kernel), the mma.sync kernel: SM80 16x8x16 atoms,
// ldmatrix operand loads, cp.async double-buffered query tiles; no TMA, no wgmma, no warp
// specialization. It serves head_dim 256 (flash_bwd_launch.cuh's run_flash_bwd), where the wgmma
// kernel's tiles do not fit shared memory; at about 0.3x cuDNN there it is the backward's weakest
// case (docs/kernels/flash_bwd.md).
//
// What it computes. One CTA per (KV tile n of kBlockN keys, kv head hk, batch b). K and V of the
// tile stay in smem; the CTA walks every query head h of hk's GQA group and, for each, every
// query tile m (kBlockM = 64 rows) in bwd_query_tiles(n) (tiles outside the mask are never
// loaded), with per tile:
//   S  = Q K^T                      (64 x kBlockN, fp32 registers)
//   P  = exp2(S * scale*log2e - lse*log2e)      (lse saved by the forward; -inf rows -> P = 0)
//   dP = dO V^T ;  dS = P * (dP - D)            (D = rowsum(dO * O), from the preprocess)
// or, with logit softcap c (logit_mods.h; the kernel's kSoftcap, chosen by the launcher):
//   t  = tanh(S * scale / c) ;  P = exp2(t * c*log2e - lse*log2e) ;  dS = P * (dP - D) * (1 - t^2)
//   dV += P^T dO ; dK += dS^T Q                  (kBlockN x D, fp32 registers, across all
//                                                 query tiles and all heads of the group)
//   dQ_accum[h] += dS K                          (fp32, global; red.global.add.v2.f32, or in
//                                                 deterministic mode a plain read-modify-write
//                                                 in ascending n order, see below)
// and finally dK = scale * dK, dV written in the input dtype. GQA is handled inside the CTA
// (the group's heads are summed in registers): no fp32 dK/dV scratch and no reduction pass, at
// the price of heads_kv (not heads) CTAs per KV tile.
// The per-element mask (causal / window / key >= sk) is evaluated only on tile pairs that
// tile_fully_visible() says need it, or whose keys run past sk. Rows past sq get lse = +inf
// (P = 0) and D = 0, and their dQ is not stored.
//
// Tiling: 8 warps (4 along M x 2 along N of each product, TiledMma tile 64 x 32 x 16). smem:
// Q and dO double-buffered (2 x 2 x 64 x D), K, V (kBlockN x D), P and dS (64 x kBlockN), all
// 16-bit with the Swizzle<3,3,3> 8x64 atom so ldmatrix (and its transposing form for P^T, dS^T,
// Q^T, dO^T, K^T) is conflict-free. Products that need a transposed operand read the same smem
// through a transposed layout view.
//
// Deterministic mode: semaphore sems[(b * heads + h) * num_m_tiles_max + m] counts the KV tiles
// that already added their dS K to query tile m of head h; the CTA of tile n waits until it
// equals n's rank among the KV tiles that visit m (those form one contiguous range of n, since
// bwd_query_tiles' bounds are monotone in n), adds, fences, and increments. CTAs are dispatched
// in blockIdx order (n fastest), so a waiting CTA only waits on CTAs already resident.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cutlass/numeric_types.h>
#include "longctx/flash/flash_params.h"
#include "longctx/flash/mask.h"
#include "longctx/tanh_approx.cuh"

namespace longctx {
namespace flash {

template <typename Element_, int kHeadDim_>
struct FlashBwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = 64;
  static constexpr int kNWarps = 8;
  static constexpr int kNThreads = kNWarps * 32;
  static_assert(kHeadDim % 64 == 0 && kBlockN % 64 == 0, "tiles are multiples of the 8x64 atom");

  using MmaOp = std::conditional_t<std::is_same_v<Element, cutlass::bfloat16_t>,
                                   cute::SM80_16x8x16_F32BF16BF16F32_TN,
                                   cute::SM80_16x8x16_F32F16F16F32_TN>;
  using TiledMma = decltype(cute::make_tiled_mma(
      cute::MMA_Atom<MmaOp>{}, cute::Layout<cute::Shape<cute::_4, cute::_2, cute::_1>>{},
      cute::Tile<cute::_64, cute::_32, cute::_16>{}));

  using SmemAtom = decltype(cute::composition(
      cute::Swizzle<3, 3, 3>{},
      cute::Layout<cute::Shape<cute::_8, cute::_64>, cute::Stride<cute::_64, cute::_1>>{}));
  using LayoutQ = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using LayoutK = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}));
  using LayoutP = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kBlockN>>{}));
  // Transposed views of the same smem.
  using LayoutQt = decltype(cute::composition(
      LayoutQ{}, cute::make_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockM>>{},
                                   cute::GenRowMajor{})));
  using LayoutKt = decltype(cute::composition(
      LayoutK{}, cute::make_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>>{},
                                   cute::GenRowMajor{})));
  using LayoutPt = decltype(cute::composition(
      LayoutP{}, cute::make_layout(cute::Shape<cute::Int<kBlockN>, cute::Int<kBlockM>>{},
                                   cute::GenRowMajor{})));

  using CopyN = cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, Element>;
  using CopyT = cute::Copy_Atom<cute::SM75_U16x8_LDSM_T, Element>;

  static constexpr int kSizeQ = kBlockM * kHeadDim, kSizeK = kBlockN * kHeadDim,
                       kSizeP = kBlockM * kBlockN;
  // Q x2, dO x2, K, V, P, dS (elements).
  static constexpr int kSmemElems = 4 * kSizeQ + 2 * kSizeK + 2 * kSizeP;
  static constexpr int kSmemBytes = kSmemElems * int(sizeof(Element));
};

namespace bwd_detail {

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;  // 0: zero-fill
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Rows [0, rows_valid) of a (R x D) gmem tile with row stride `stride` into smem tensor sT
// (R x D, swizzled); rows past rows_valid are zero-filled.
template <int kThreads, class STensor, typename Element>
__device__ __forceinline__ void load_tile(STensor sT, const Element* g, int64_t stride,
                                          int rows_valid, int tid) {
  using namespace cute;
  constexpr int R = decltype(size<0>(sT))::value, D = decltype(size<1>(sT))::value;
  constexpr int kCpr = D / 8;
#pragma unroll
  for (int idx = tid; idx < R * kCpr; idx += kThreads) {
    const int r = idx / kCpr, c = (idx % kCpr) * 8;
    const bool valid = r < rows_valid;
    cp_async_16(&sT(r, c), valid ? g + int64_t(r) * stride + c : g, valid);
  }
}

// acc += A * B^T with A (M x K) and B (N x K) smem tensors, operands via the given copy atoms.
template <class TiledMma, class CopyA, class CopyB, class Acc, class SA, class SB>
__device__ __forceinline__ void gemm_ss(Acc& acc, SA const& sA, SB const& sB, int tid) {
  using namespace cute;
  TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor rA = thr_mma.partition_fragment_A(sA);
  Tensor rB = thr_mma.partition_fragment_B(sB);
  auto copy_a = make_tiled_copy_A(CopyA{}, tiled_mma);
  auto copy_b = make_tiled_copy_B(CopyB{}, tiled_mma);
  auto thr_a = copy_a.get_thread_slice(tid);
  auto thr_b = copy_b.get_thread_slice(tid);
  Tensor tAs = thr_a.partition_S(sA);
  Tensor tAr = thr_a.retile_D(rA);
  Tensor tBs = thr_b.partition_S(sB);
  Tensor tBr = thr_b.retile_D(rB);
  copy(copy_a, tAs(_, _, 0), tAr(_, _, 0));
  copy(copy_b, tBs(_, _, 0), tBr(_, _, 0));
  constexpr int kK = decltype(size<2>(rA))::value;
#pragma unroll
  for (int k = 0; k < kK; ++k) {
    if (k + 1 < kK) {
      copy(copy_a, tAs(_, _, k + 1), tAr(_, _, k + 1));
      copy(copy_b, tBs(_, _, k + 1), tBr(_, _, k + 1));
    }
    cute::gemm(tiled_mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

__device__ __forceinline__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

}  // namespace bwd_detail

// kSoftcap: the launcher's choice from p.fwd.mods.softcap != 0 (uniform over the launch); a
// template parameter, so the kernel without the cap is the same code as before it existed.
template <class Traits, bool kSoftcap>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    flash_bwd_kernel(BwdParams bp, int64_t total_q_rows, float* __restrict__ dq_accum, int* sems,
                     int num_m_tiles_max) {
  using namespace cute;
  using namespace bwd_detail;
  using Element = typename Traits::Element;
  constexpr int kM = Traits::kBlockM, kN = Traits::kBlockN, kD = Traits::kHeadDim;
  constexpr int kThreads = Traits::kNThreads;
  using TiledMma = typename Traits::TiledMma;
  using CopyN = typename Traits::CopyN;
  using CopyT = typename Traits::CopyT;
  const FwdParams& p = bp.fwd;

  const int n_block = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const SeqLen si = sequence(p, b);
  const int sq = si.sq, sk = si.sk, q_off = si.q_start, k_off = si.k_start;
  const int n0 = n_block * kN;
  if (n0 >= sk) return;
  const int rows_k = min(kN, sk - n0);
  const int wl = p.window_left, wr = p.window_right;

  const Element* gK = reinterpret_cast<const Element*>(p.k) + int64_t(b) * p.k_batch_stride +
                      int64_t(k_off + n0) * p.k_row_stride + int64_t(hk) * p.k_head_stride;
  const Element* gV = reinterpret_cast<const Element*>(p.v) + int64_t(b) * p.v_batch_stride +
                      int64_t(k_off + n0) * p.v_row_stride + int64_t(hk) * p.v_head_stride;
  Element* gdK = reinterpret_cast<Element*>(bp.dk) + int64_t(b) * bp.dk_batch_stride +
                 int64_t(k_off + n0) * bp.dk_row_stride + int64_t(hk) * bp.dk_head_stride;
  Element* gdV = reinterpret_cast<Element*>(bp.dv) + int64_t(b) * bp.dv_batch_stride +
                 int64_t(k_off + n0) * bp.dv_row_stride + int64_t(hk) * bp.dv_head_stride;

  TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor acc_dk = partition_fragment_C(tiled_mma, Shape<Int<kN>, Int<kD>>{});
  Tensor acc_dv = partition_fragment_C(tiled_mma, Shape<Int<kN>, Int<kD>>{});
  clear(acc_dk);
  clear(acc_dv);
  Tensor cKD = thr_mma.partition_C(make_identity_tensor(Shape<Int<kN>, Int<kD>>{}));

  const TileRange range = bwd_query_tiles(n_block, kM, kN, sq, sk, wl, wr);
  const int group = p.heads / p.heads_kv;
  const int n_m = range.end > range.begin ? range.end - range.begin : 0;
  const int total_iters = n_m * group;

  if (total_iters > 0) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    Element* smem = reinterpret_cast<Element*>(smem_raw);
    using LQ = typename Traits::LayoutQ;
    using LK = typename Traits::LayoutK;
    using LP = typename Traits::LayoutP;
    Element* pQ = smem;
    Element* pdO = pQ + 2 * Traits::kSizeQ;
    Element* pK = pdO + 2 * Traits::kSizeQ;
    Element* pV = pK + Traits::kSizeK;
    Element* pP = pV + Traits::kSizeK;
    Element* pdS = pP + Traits::kSizeP;
    Tensor sK = make_tensor(make_smem_ptr(pK), LK{});
    Tensor sV = make_tensor(make_smem_ptr(pV), LK{});
    Tensor sKt = make_tensor(make_smem_ptr(pK), typename Traits::LayoutKt{});
    Tensor sP = make_tensor(make_smem_ptr(pP), LP{});
    Tensor sdS = make_tensor(make_smem_ptr(pdS), LP{});
    Tensor sPt = make_tensor(make_smem_ptr(pP), typename Traits::LayoutPt{});
    Tensor sdSt = make_tensor(make_smem_ptr(pdS), typename Traits::LayoutPt{});

    load_tile<kThreads>(sK, gK, p.k_row_stride, rows_k, tid);
    load_tile<kThreads>(sV, gV, p.v_row_stride, rows_k, tid);
    cp_async_commit();

    auto q_ptr = [&](int h, int m) {
      return reinterpret_cast<const Element*>(p.q) + int64_t(b) * p.q_batch_stride +
             int64_t(q_off + m * kM) * p.q_row_stride + int64_t(h) * p.q_head_stride;
    };
    auto do_ptr = [&](int h, int m) {
      return reinterpret_cast<const Element*>(bp.dout) + int64_t(b) * bp.dout_batch_stride +
             int64_t(q_off + m * kM) * bp.dout_row_stride + int64_t(h) * bp.dout_head_stride;
    };
    auto issue_q = [&](int it) {
      const int h = hk * group + it / n_m, m = range.begin + it % n_m;
      const int buf = it & 1;
      const int rows = min(kM, sq - m * kM);
      load_tile<kThreads>(make_tensor(make_smem_ptr(pQ + buf * Traits::kSizeQ), LQ{}), q_ptr(h, m),
                          p.q_row_stride, rows, tid);
      load_tile<kThreads>(make_tensor(make_smem_ptr(pdO + buf * Traits::kSizeQ), LQ{}),
                          do_ptr(h, m), bp.dout_row_stride, rows, tid);
      cp_async_commit();
    };
    issue_q(0);

    Tensor cMN = thr_mma.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kN>>{}));
    Tensor cMD = thr_mma.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kD>>{}));
    constexpr float kLog2e = 1.4426950408889634f;
    // Softcap c: S -> t = tanh(S * cap_in), cap_in = softmax_scale / c, in the exponent with
    // c * log2(e); dS gets the cap's derivative 1 - t^2 (softmax_scale enters dK in the epilogue
    // and dQ in the postprocess, as without the cap).
    const float cap_in = kSoftcap ? p.softmax_scale / p.mods.softcap : 0.f;
    const float scale_log2 = kSoftcap ? p.mods.softcap * kLog2e : p.softmax_scale_log2;

    for (int it = 0; it < total_iters; ++it) {
      const int h = hk * group + it / n_m, m = range.begin + it % n_m;
      const int buf = it & 1;
      const int m0 = m * kM;
      if (it + 1 < total_iters) {
        issue_q(it + 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      // lse (log2 domain) and D per accumulator element's row, loaded before the barrier.
      Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kM>, Int<kN>>{});
      Tensor acc_dp = partition_fragment_C(tiled_mma, Shape<Int<kM>, Int<kN>>{});
      // Accumulator fragment ((2,2), MMA_M, MMA_N): element i's row depends only on
      // slot(i) = ((i % 4) / 2) + 2 * ((i / 4) % MMA_M), so lse and D are kept per slot.
      constexpr int kMmaM = decltype(size<1>(acc_s))::value;
      constexpr int kSlots = 2 * kMmaM;
      float lse_r[kSlots], d_r[kSlots];
      {
        const float* lse = p.lse + int64_t(b) * p.lse_batch_stride + int64_t(h) * p.lse_head_stride +
                           (varlen ? q_off : 0);
        const float* dsum = bp.dsoftmax_sum + int64_t(b) * bp.dsoftmax_sum_batch_stride +
                            int64_t(h) * bp.dsoftmax_sum_head_stride + (varlen ? q_off : 0);
#pragma unroll
        for (int s = 0; s < kSlots; ++s) {
          const int row = m0 + get<0>(cMN((s % 2) * 2 + 4 * (s / 2)));
          if (row < sq) {
            const float l = lse[row];
            lse_r[s] = l == -INFINITY ? INFINITY : l * kLog2e;
            d_r[s] = dsum[row];
          } else {
            lse_r[s] = INFINITY;
            d_r[s] = 0.f;
          }
        }
      }
      __syncthreads();
      Tensor sQ = make_tensor(make_smem_ptr(pQ + buf * Traits::kSizeQ), LQ{});
      Tensor sdO = make_tensor(make_smem_ptr(pdO + buf * Traits::kSizeQ), LQ{});
      Tensor sQt = make_tensor(make_smem_ptr(pQ + buf * Traits::kSizeQ), typename Traits::LayoutQt{});
      Tensor sdOt =
          make_tensor(make_smem_ptr(pdO + buf * Traits::kSizeQ), typename Traits::LayoutQt{});

      clear(acc_s);
      clear(acc_dp);
      gemm_ss<TiledMma, CopyN, CopyN>(acc_s, sQ, sK, tid);
      gemm_ss<TiledMma, CopyN, CopyN>(acc_dp, sdO, sV, tid);

      const bool need_mask =
          n0 + kN > sk || !tile_fully_visible(m, n_block, kM, kN, sq, sk, wl, wr);
#pragma unroll
      for (int i = 0; i < size(acc_s); ++i) {
        const int r = get<0>(cMN(i)), c = get<1>(cMN(i));
        const int slot = ((i % 4) / 2) + 2 * ((i / 4) % kMmaM);
        float x = acc_s(i);
        if constexpr (kSoftcap) x = tanh_approx(x * cap_in);
        float pv = exp2f(x * scale_log2 - lse_r[slot]);
        if (need_mask && !mask_visible(m0 + r, n0 + c, sq, sk, wl, wr)) pv = 0.f;
        float ds = pv * (acc_dp(i) - d_r[slot]);
        if constexpr (kSoftcap) ds *= 1.f - x * x;
        sP(r, c) = Element(pv);
        sdS(r, c) = Element(ds);
      }
      __syncthreads();

      gemm_ss<TiledMma, CopyT, CopyT>(acc_dv, sPt, sdOt, tid);
      gemm_ss<TiledMma, CopyT, CopyT>(acc_dk, sdSt, sQt, tid);

      Tensor acc_dq = partition_fragment_C(tiled_mma, Shape<Int<kM>, Int<kD>>{});
      clear(acc_dq);
      gemm_ss<TiledMma, CopyN, CopyT>(acc_dq, sdS, sKt, tid);

      // dQ_accum rows: packed row (varlen) or b * seqlen_q + i.
      float* acc_base = dq_accum + (int64_t(h) * total_q_rows +
                                    si.q_row0(p.seqlen_q) + m0) *
                                       kD;
      if (!bp.deterministic) {
#pragma unroll
        for (int i = 0; i < size(acc_dq); i += 2) {
          const int r = get<0>(cMD(i)), c = get<1>(cMD(i));
          if (m0 + r < sq)
            atomicAdd(reinterpret_cast<float2*>(acc_base + int64_t(r) * kD + c),
                      make_float2(acc_dq(i), acc_dq(i + 1)));
        }
      } else {
        int* sem = sems + (int64_t(b) * p.heads + h) * num_m_tiles_max + m;
        if (tid == 0) {
          // First KV tile whose query range contains m (the visiting tiles are contiguous).
          const int n_tiles = (sk + kN - 1) / kN;
          int lo = 0, hi = n_block;  // answer in [0, n_block]
          while (lo < hi) {
            const int mid = (lo + hi) / 2;
            const TileRange rr = bwd_query_tiles(mid, kM, kN, sq, sk, wl, wr);
            if (rr.end > m && rr.begin < rr.end) hi = mid; else lo = mid + 1;
          }
          (void)n_tiles;
          const int expected = n_block - lo;
          while (ld_acquire(sem) != expected) __nanosleep(64);
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < size(acc_dq); i += 2) {
          const int r = get<0>(cMD(i)), c = get<1>(cMD(i));
          if (m0 + r < sq) {
            float2* a = reinterpret_cast<float2*>(acc_base + int64_t(r) * kD + c);
            float2 v = __ldcg(a);
            v.x += acc_dq(i);
            v.y += acc_dq(i + 1);
            __stcg(a, v);
          }
        }
        __threadfence();
        __syncthreads();
        if (tid == 0) atomicAdd(sem, 1);
      }
      __syncthreads();  // Q/dO buffer `buf`, P and dS are rewritten next
    }
  }

  // Epilogue: dK = scale * dK, dV; keys that no query sees get zeros (accumulators are 0).
  const float scale = p.softmax_scale;
#pragma unroll
  for (int i = 0; i < size(acc_dk); i += 2) {
    const int r = get<0>(cKD(i)), c = get<1>(cKD(i));
    if (r < rows_k) {
      __align__(4) Element k2[2] = {Element(acc_dk(i) * scale), Element(acc_dk(i + 1) * scale)};
      __align__(4) Element v2[2] = {Element(acc_dv(i)), Element(acc_dv(i + 1))};
      *reinterpret_cast<uint32_t*>(gdK + int64_t(r) * bp.dk_row_stride + c) =
          *reinterpret_cast<uint32_t*>(k2);
      *reinterpret_cast<uint32_t*>(gdV + int64_t(r) * bp.dv_row_stride + c) =
          *reinterpret_cast<uint32_t*>(v2);
    }
  }
}

}  // namespace flash
}  // namespace longctx
