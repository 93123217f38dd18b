// CUDA launcher of longctx::flash_attn_bwd (Hopper, sm_90a): the op of flash_op.h (the checks of
// the CPU backward, dq/dk/dv and the fp32 D (dsoftmax_sum)) with a runner that allocates the dQ
// accumulator (+ semaphores when deterministic) and runs the compiled (head_dim, dtype)
// instantiation from FlashBwdTable (the generated flash_bwd_hdim<D>_<dtype>.cu files; other
// head dims, multiples of 8 up to 256, run the next D up, flash_bwd_dispatch.cuh) on the
// current stream: preprocess (D, zeroing), main kernel, postprocess
// (dq = scale * acc). deterministic = true orders the dQ additions with per-(batch, head, query
// tile) semaphores (bitwise reproducible; its cost: docs/kernels/flash_bwd.md).
//
// The build report: each instantiation file registers its own LONGCTX_REGISTER_KERNEL entry
// ("flash_bwd", "cuda", "<dtype>",
// "hdim<D>,causal,window,gqa,varlen,deterministic,softcap,sinks").
// Sinks: the kernels compute P = exp(S - lse) with the forward's lse, which includes the sink,
// and P = 0 on masked entries whatever lse is (a row without keys has a finite lse with sinks);
// dsinks comes from lse and D in flash_op.h. Softcap: the main kernels cap S as the forward does
// and multiply dS by the cap's derivative (flash_bwd_sm90.cuh, flash_bwd_sm90_hdim256.cuh).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include "common/nvtx.h"
#include "flash/flash_cuda.h"
#include "flash/flash_op.h"
#include "longctx/flash/flash_bwd_dispatch.cuh"

namespace longctx {
namespace {

void run_bwd_cuda(const FlashBwdCall& c) {
  constexpr const char* op = "flash_attn_bwd";
  const FlashBwdArgs& a = c.args;
  const flash::BwdParams& p = a.params;
  const c10::cuda::CUDAGuard guard(c.in.q.device());
  check_flash_cuda(a.dtype, op, "tensors");
  const flash::FlashBwdFn fn = find_flash_kernel<flash::FlashBwdTable>(
      flash::fwd_kernel_head_dim(p.fwd.head_dim), a.dtype, op,
      "head_dim 64, 128 and 256 run their own kernels, other multiples of 8 the next one up; "
      "rebuild with LONGCTX_HEADDIMS / LONGCTX_DTYPES including it and without "
      "LONGCTX_DISABLE_BWD");
  const char* why = flash::flash_bwd_unsupported_reason(p);
  TORCH_CHECK(why == nullptr, "longctx.", op, ": ", why, "; pass .contiguous() tensors");

  const int64_t total_q = a.varlen ? c.in.q.size(0) : int64_t(p.fwd.batch) * p.fwd.seqlen_q;
  const int64_t total_k = a.varlen ? c.in.k.size(0) : int64_t(p.fwd.batch) * p.fwd.seqlen_k;
  if (total_q == 0 || p.fwd.heads == 0) {  // nothing reads k/v: their gradients are zero
    c.dk.zero_();
    c.dv.zero_();
    return;
  }
  auto accum = at::empty({flash::flash_bwd_accum_floats(p, total_q)},
                         c.in.q.options().dtype(at::kFloat));
  at::Tensor sems;
  if (p.deterministic)
    sems = at::empty({flash::flash_bwd_num_sems(p)}, c.in.q.options().dtype(at::kInt));
  const cudaError_t err = fn(p, total_q, total_k, accum.data_ptr<float>(),
                             p.deterministic ? sems.data_ptr<int>() : nullptr,
                             at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "longctx.", op, ": kernel launch failed: ",
              cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(longctx, CUDA, m) { m.impl("flash_attn_bwd", &flash_attn_bwd_op<&run_bwd_cuda>); }

}  // namespace longctx
