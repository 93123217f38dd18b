// CUDA launcher of longctx::flash_attn_fwd (Hopper, sm_90a): the op of flash_op.h (shared argument
// checks, out and lse) with a runner that checks what the kernel needs and runs the compiled
// (head_dim, dtype) instantiation from FlashFwdTable (the generated flash_fwd_hdim<D>_<dtype>.cu
// files) on the current stream.
// deterministic is accepted for signature parity with the backward: the forward is always
// deterministic (no atomics on outputs; the dynamic tile scheduler changes only which CTA
// computes a tile, never the arithmetic).
//
// The build report: each instantiation file registers its own LONGCTX_REGISTER_KERNEL entry
// ("flash_fwd", "cuda", "<dtype>", "hdim<D>,causal,window,gqa,varlen,softcap,sinks"), so the
// report lists exactly the (head_dim, dtype) pairs in the binary. Other head dims (multiples of 8
// up to 256) run the next compiled one up (fwd_kernel_head_dim).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <limits>
#include "common/nvtx.h"
#include "flash/flash_cuda.h"
#include "flash/flash_op.h"
#include "longctx/flash/flash_fwd_dispatch.cuh"

namespace longctx {

void run_fwd_cuda(const FlashFwdCall& c) {
  constexpr const char* op = "flash_attn_fwd";
  const FlashFwdArgs& a = c.args;
  const flash::FwdParams& p = a.params;
  const c10::cuda::CUDAGuard guard(c.in.q.device());
  check_flash_cuda(a.dtype, op, "q/k/v");
  const flash::FlashFwdFn fn = find_flash_kernel<flash::FlashFwdTable>(
      flash::fwd_kernel_head_dim(p.head_dim), a.dtype, op,
      "head_dim 64, 128 and 256 run their own kernels, other multiples of 8 the next one up; "
      "rebuild with LONGCTX_HEADDIMS / LONGCTX_DTYPES including it");
  const char* why = flash::flash_fwd_tma_unsupported_reason(p, 2);
  TORCH_CHECK(why == nullptr, "longctx.", op, ": ", why,
              " (the Hopper kernel loads them with TMA); pass .contiguous() tensors");

  const int64_t total_q = a.varlen ? c.in.q.size(0) : int64_t(p.batch) * p.seqlen_q;
  const int64_t total_k = a.varlen ? c.in.k.size(0) : int64_t(p.batch) * p.seqlen_k;
  if (total_q == 0 || p.heads == 0) return;
  if (total_k == 0) {  // no keys anywhere: every row sees nothing (lse = its head's sink)
    c.out.zero_();
    if (c.in.sinks.has_value()) {
      c.lse.copy_(a.varlen ? c.in.sinks->view({p.heads, 1}) : c.in.sinks->view({1, p.heads, 1}));
    } else {
      c.lse.fill_(-std::numeric_limits<float>::infinity());
    }
    return;
  }
  // 4 bytes of scratch for the dynamic tile scheduler, private to this launch (stream-ordered
  // through the caching allocator; the kernel launcher zeroes it on the stream).
  auto tile_counter = at::empty({1}, c.in.q.options().dtype(at::kInt));
  const cudaError_t err = fn(p, total_q, total_k, tile_counter.data_ptr<int>(),
                             at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "longctx.", op, ": kernel launch failed: ",
              cudaGetErrorString(err));
}

TORCH_LIBRARY_IMPL(longctx, CUDA, m) { m.impl("flash_attn_fwd", &flash_attn_fwd_op<&run_fwd_cuda>); }

}  // namespace longctx
