// CUDA launchers of longctx::kvcache_append and longctx::flash_attn_with_kvcache (Hopper).
//
// Both are the ops of kvcache_op.h (argument checks, outputs) with the CUDA policy below.
// kvcache_append: kvcache_append.cuh's fused kernel (one CTA per new token; RoPE on K; quantize
// on write).
//
// flash_attn_with_kvcache picks one of two paths:
//  - decode (seqlen_q * heads / kv_heads <= 32 packed rows per kv head, head_dim a multiple of 8
//    up to 256: 64/128/256 and the others on the next of those kernels up, decode_choice.h):
//    split-KV, dequantization fused; the kernel that serves the cache's layout and the merge of
//    the splits (longctx/kvcache/decode_launch.cuh, instantiated per (format, dtype) by the
//    generated kvcache_decode_<format>_<dtype>.cu files). num_splits = 0 chooses the split count
//    from the occupancy (waves / splits, see choose_splits), with at least 256 keys per split.
//  - chunked prefill (more query rows): the cache pages of each sequence are gathered and
//    dequantized into a contiguous bf16/fp16 K/V (kvcache_gather_kernel), then the Hopper forward
//    kernel (longctx::flash_attn_fwd, varlen, bottom-right masks) runs on it. Dequantization is
//    NOT fused in this path: it pays one extra read of the cache and a write + read of the
//    gathered copy. The path reads cache_seqlens on the host (a sync) and always validates the
//    page ids (with validate=False too), since the gathered keys could not be masked otherwise.
//    With a left window only the keys some query can see are gathered (and, for packed queries,
//    cu_seqlens_q is read on the host too). num_splits is ignored there. In a CUDA graph capture
//    it reads nothing on the host: the key chunks are planned on the device (prefill_plan.cuh)
//    with buffers sized by the block table's capacity, and invalid pages gather NaN keys.
//  - mixed batches (packed queries whose leading sequences are decode rows, as continuous-
//    batching servers order them; eager calls only): that path reads cu_seqlens_q on the host
//    and runs the leading sequences of at most 32 packed rows per kv head on the decode kernels
//    and the rest on the chunked prefill (attend_mixed), instead of making every decode row a
//    128-row tile of the forward kernel over its gathered context.
// Both paths take softcap and sinks (logit_mods.h): the decode kernels cap their scores and add
// the sink where a final row is written (decode_common.cuh, decode_merge.cuh); the prefill passes
// both to the forward kernel.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>
#include "common/build_registry.h"
#include "common/checks.h"
#include "common/dispatch.h"
#include "common/nvtx.h"
#include "flash/flash_cuda.h"
#include "kvcache/kvcache_op.h"
#include "longctx/kvcache/append.cuh"
#include "longctx/kvcache/decode_launch.cuh"
#include "longctx/kvcache/prefill_chunks.h"
#include "longctx/kvcache/prefill_fold.cuh"
#include "longctx/kvcache/prefill_plan.cuh"

namespace longctx {
namespace {

namespace kc = kvcache::cuda;
using kvcache::Format;

// err: a launch call's own result; a launch error also stays in cudaGetLastError (cleared here).
void check_launch(const char* op, const char* what, cudaError_t err = cudaSuccess) {
  const cudaError_t last = cudaGetLastError();
  if (err == cudaSuccess) err = last;
  TORCH_CHECK(err == cudaSuccess, "longctx.", op, ": ", what, " launch failed: ",
              cudaGetErrorString(err));
}

// Whether the stream is recording a CUDA graph (no host reads or syncs may happen then).
bool stream_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(stream, &status);
  TORCH_CHECK(err == cudaSuccess, "longctx.flash_attn_with_kvcache: cudaStreamIsCapturing: ",
              cudaGetErrorString(err));
  return status != cudaStreamCaptureStatusNone;
}

void check_hopper(const char* op) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major >= 9, "longctx.", op, ": the CUDA kernels need sm_90 (Hopper), this is "
              "sm_", prop->major, prop->minor);
}

// ------------------------------------------------------------------------------------------------
// append
// ------------------------------------------------------------------------------------------------

void append_cuda(const kvcache::AppendParams& p, const at::Tensor& k) {
  constexpr const char* op = "kvcache_append";
  const c10::cuda::CUDAGuard guard(k.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_cuda_dtype_and_format(k.scalar_type(), p.cache.format, op, [&](auto* tag, auto fmt) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr Format F = decltype(fmt)::value;
    kc::kvcache_append_kernel<T, F>
        <<<dim3(static_cast<unsigned>(p.total_new)), kc::kAppendWarps * 32, 0, stream>>>(p);
  });
  check_launch(op, "append kernel");
}

// Pool pointers 16-byte aligned and strides multiples of 8 elements: the decode kernel's vector
// loads need them.
bool decode_aligned(const at::Tensor& kc_, const at::Tensor& vc_) {
  for (const at::Tensor* t : {&kc_, &vc_}) {
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return false;
    for (int d = 0; d < 3; ++d)
      if (t->size(d) > 1 && t->stride(d) % 8 != 0) return false;
  }
  return true;
}

// ------------------------------------------------------------------------------------------------
// chunked prefill: gather + the Hopper forward kernel
// ------------------------------------------------------------------------------------------------

// out, lse += (o, l) of one more key chunk (prefill_fold.cuh); o, l in the forward's varlen
// layout, out and lse in the op's (packed, or (batch, seqlen_q, ...) when not packed).
void fold_key_chunk(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& o,
                    const at::Tensor& l, bool packed, cudaStream_t stream) {
  const int64_t rows = o.size(0);
  if (rows == 0) return;
  const int heads = static_cast<int>(o.size(1)), d = static_cast<int>(o.size(2));
  const int lanes = kc::fold_lanes(d);
  const int64_t blocks = (rows * heads * lanes + kc::kFoldThreads - 1) / kc::kFoldThreads;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "longctx.flash_attn_with_kvcache: too many query rows for the prefill's fold");
  dispatch_cuda_dtype(out.scalar_type(), "flash_attn_with_kvcache", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    kc::PrefillFold<T> f{};
    f.out = static_cast<T*>(out.data_ptr());
    f.lse = lse.data_ptr<float>();
    f.o = static_cast<const T*>(o.data_ptr());
    f.l = l.data_ptr<float>();
    f.rows = rows;
    f.heads = heads;
    f.head_dim = d;
    // packed: out (rows, heads, d), lse (heads, rows); else out (batch, sq, heads, d), lse
    // (batch, heads, sq)
    f.rows_per_batch = packed ? rows : out.size(1);
    f.out_at = {packed ? 0 : out.stride(0), out.stride(-3), out.stride(-2)};
    f.lse_at = {packed ? 0 : lse.stride(0), lse.stride(-1), lse.stride(-2)};
    kc::prefill_fold_kernel<T><<<static_cast<unsigned>(blocks), kc::kFoldThreads, 0, stream>>>(
        f, lanes);
  });
  check_launch("flash_attn_with_kvcache", "prefill fold kernel");
}

// The keys of one chunk of the chunked prefill: sequence b's gathered keys are rows
// cu_k[b] .. cu_k[b + 1] of the gathered K/V, from cache position k_first[b] on (cu_k, k_first
// on the device; k_first undefined: every sequence from position 0). max_sk (the longest
// sequence's count) and total_k (the rows to allocate) are exact, or bounds when the lengths
// cannot be read on the host.
struct ChunkKeys {
  at::Tensor cu_k, k_first;
  int64_t max_sk = 0, total_k = 0;
};

// The chunk plan from the lengths read on the host (eager calls): exact sizes. cu_seqlens_q is
// read too where a left window needs the query lengths.
class HostChunkPlan {
 public:
  HostChunkPlan(const at::Tensor& q, const kvcache::PagedKV& c, int64_t window_left,
                const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& cu_seqlens_q)
      : window_left_(window_left), cap_(kvcache::seq_capacity(c)), len_(c.batch),
        sq_(c.batch, q.dim() == 4 ? q.size(1) : 0) {
    const at::Tensor sl = cache_seqlens.to(at::kCPU);
    const int32_t* len = sl.data_ptr<int32_t>();
    std::copy(len, len + c.batch, len_.begin());
    if (window_left >= 0 && cu_seqlens_q.has_value()) {
      const at::Tensor h = cu_seqlens_q->to(at::kCPU);
      const int32_t* cu = h.data_ptr<int32_t>();
      for (int b = 0; b < c.batch; ++b) sq_[b] = int64_t(cu[b + 1]) - cu[b];
    }
    int64_t max_keys = 0;  // the longest sequence's keys
    for (int b = 0; b < c.batch; ++b)
      max_keys = std::max(max_keys, kvcache::prefill_seq_keys(len_[b], cap_));
    chunks_ = kvcache::prefill_key_chunks(max_keys, window_left >= 0);
  }
  int chunks() const { return chunks_; }
  ChunkKeys keys(int ch, const at::Device& device) const {
    const int batch = static_cast<int>(len_.size());
    std::vector<int32_t> cu(static_cast<size_t>(batch) + 1, 0), first(batch, 0);
    ChunkKeys r;
    for (int b = 0; b < batch; ++b) {
      const kvcache::KeyChunk kc = chunk(b, ch);
      first[b] = static_cast<int32_t>(kc.first);
      r.max_sk = std::max(r.max_sk, kc.count);
      TORCH_CHECK(int64_t(cu[b]) + kc.count <= std::numeric_limits<int32_t>::max(),
                  "longctx.flash_attn_with_kvcache: more than 2^31 cached keys in the batch");
      cu[b + 1] = static_cast<int32_t>(cu[b] + kc.count);
    }
    r.total_k = cu[batch];
    r.cu_k = at::tensor(cu, at::kInt).to(device);
    if (std::any_of(first.begin(), first.end(), [](int32_t f) { return f != 0; }))
      r.k_first = at::tensor(first, at::kInt).to(device);
    return r;
  }

 private:
  kvcache::KeyChunk chunk(int b, int ch) const {
    return kvcache::prefill_call_chunk(len_[b], cap_, sq_[b], window_left_, ch);
  }
  int64_t window_left_, cap_;
  std::vector<int64_t> len_, sq_;
  int chunks_ = 1;
};

// The chunk plan computed on the device (prefill_plan.cuh), with no host read: what a CUDA graph
// capture can record. Sizes are bounds from the block table's capacity and max_seqlen_q
// (prefill_chunk_keys_bound); chunks past a sequence's keys are empty and fold as no-ops.
class DeviceChunkPlan {
 public:
  DeviceChunkPlan(const kvcache::AttnParams& p, const at::Tensor& cache_seqlens,
                  const std::optional<at::Tensor>& cu_seqlens_q, int64_t seqlen_q,
                  cudaStream_t stream)
      : p_(p), cache_seqlens_(cache_seqlens), cu_seqlens_q_(cu_seqlens_q), seqlen_q_(seqlen_q),
        stream_(stream), cap_(kvcache::seq_capacity(p.cache)) {
    max_keys_ = kvcache::prefill_chunk_keys_bound(cap_, p.seqlen_q, p.window_left);
    TORCH_CHECK(int64_t(p.cache.batch) * max_keys_ <= std::numeric_limits<int32_t>::max(),
                "longctx.flash_attn_with_kvcache: batch (", p.cache.batch, ") x ", max_keys_,
                " keys per sequence must stay below 2^31 for a prefill captured in a CUDA graph "
                "(the gathered K/V are sized by the block table's capacity there)");
    chunks_ = kvcache::prefill_key_chunks(cap_, p.window_left >= 0);
  }
  int chunks() const { return chunks_; }
  ChunkKeys keys(int ch, const at::Device& device) const {
    const int batch = p_.cache.batch;
    auto opts = at::TensorOptions().dtype(at::kInt).device(device);
    ChunkKeys r{at::empty({batch + 1}, opts), at::empty({batch}, opts), max_keys_,
                int64_t(batch) * max_keys_};
    kc::prefill_chunk_plan_kernel<<<1, kc::kPlanThreads, 0, stream_>>>(
        cache_seqlens_.data_ptr<int32_t>(),
        cu_seqlens_q_.has_value() ? cu_seqlens_q_->data_ptr<int32_t>() : nullptr, seqlen_q_,
        batch, cap_, p_.window_left, ch, max_keys_, r.cu_k.data_ptr<int32_t>(),
        r.k_first.data_ptr<int32_t>());
    check_launch("flash_attn_with_kvcache", "prefill plan kernel");
    return r;
  }

 private:
  const kvcache::AttnParams& p_;
  const at::Tensor& cache_seqlens_;
  const std::optional<at::Tensor>& cu_seqlens_q_;
  int64_t seqlen_q_;
  cudaStream_t stream_;
  int64_t cap_, max_keys_ = 0;
  int chunks_ = 1;
};

// One key chunk's K/V gathered (and dequantized) into contiguous (keys, kv_heads, head_dim)
// tensors (ChunkKeys says which keys go where).
std::pair<at::Tensor, at::Tensor> gather_keys(const at::Tensor& q, const kvcache::PagedKV& c,
                                              const ChunkKeys& ck, cudaStream_t stream) {
  auto opts = q.options();
  at::Tensor kg = at::empty({ck.total_k, c.kv_heads, c.head_dim}, opts);
  at::Tensor vg = at::empty({ck.total_k, c.kv_heads, c.head_dim}, opts);
  if (ck.total_k > 0) {
    const dim3 grid(static_cast<unsigned>((ck.max_sk + kc::kGatherTokens - 1) / kc::kGatherTokens),
                    c.batch);
    dispatch_cuda_dtype_and_format(q.scalar_type(), c.format, "flash_attn_with_kvcache",
                                   [&](auto* tag, auto fmt) {
      using T = std::remove_pointer_t<decltype(tag)>;
      constexpr Format F = decltype(fmt)::value;
      kc::kvcache_gather_kernel<T, F><<<grid, 256, 0, stream>>>(
          c, ck.cu_k.data_ptr<int32_t>(),
          ck.k_first.defined() ? ck.k_first.data_ptr<int32_t>() : nullptr,
          static_cast<T*>(kg.data_ptr()), static_cast<T*>(vg.data_ptr()));
    });
    check_launch("flash_attn_with_kvcache", "gather kernel");
  }
  return {kg, vg};
}

// The chunked prefill: per key chunk, the gather, the forward kernel over the gathered keys and
// the fold of its (out, lse) into the call's. host_lengths: plan the chunks from the lengths read
// on the host (exact sizes); otherwise on the device (a CUDA graph capture).
void prefill_gather_fwd(
    const at::Tensor& q, const kvcache::AttnParams& p, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& sinks,
    const at::Tensor& out, const at::Tensor& lse, bool host_lengths, cudaStream_t stream) {
  const kvcache::PagedKV& c = p.cache;
  // q packed (total_q, heads, d) with cu_seqlens_q
  at::Tensor qp, cu_q;
  int64_t max_sq;
  const bool packed = cu_seqlens_q.has_value();
  if (packed) {
    qp = q;
    cu_q = *cu_seqlens_q;
    max_sq = p.seqlen_q;
  } else {
    qp = q.reshape({-1, q.size(2), q.size(3)});
    cu_q = at::arange(0, int64_t(c.batch + 1) * q.size(1), q.size(1),
                      q.options().dtype(at::kInt));
    max_sq = q.size(1);
  }
  if (!qp.is_contiguous()) qp = qp.contiguous();
  // With a left window only keys [sk - sq - window_left, sk) of a sequence can be seen (bottom-
  // right aligned masks): the gather starts there, and the forward over the shortened keys sees
  // the same masks (both ends move by the same offset). Without one the keys are gathered in
  // chunks from the last key back (prefill_chunks.h).
  std::optional<HostChunkPlan> host_plan;
  std::optional<DeviceChunkPlan> device_plan;
  if (host_lengths) {
    host_plan.emplace(q, c, p.window_left, cache_seqlens, cu_seqlens_q);
  } else {
    device_plan.emplace(p, cache_seqlens, cu_seqlens_q, q.dim() == 4 ? q.size(1) : 0, stream);
  }
  const int chunks = host_plan ? host_plan->chunks() : device_plan->chunks();
  const int64_t window_right = p.causal ? 0 : p.window_right;
  for (int ch = 0; ch < chunks; ++ch) {
    const ChunkKeys ck = host_plan ? host_plan->keys(ch, q.device())
                                   : device_plan->keys(ch, q.device());
    auto [kg, vg] = gather_keys(q, c, ck, stream);
    // chunk 0 runs the call's mask and adds the sinks; chunk ch > 0 the mask moved by ch chunks
    auto [o, l] = flash_attn_fwd_op<&run_fwd_cuda>(
        qp, kg, vg, cu_q, ck.cu_k, max_sq, ck.max_sk, double(p.softmax_scale),
        ch == 0 && p.causal, p.window_left,
        ch == 0 ? p.window_right : kvcache::prefill_chunk_window_right(window_right, ch), false,
        ch == 0 ? sinks : std::nullopt, double(p.mods.softcap));
    kg.reset();  // the next chunk's gather reuses this memory
    vg.reset();
    if (ch > 0) {
      fold_key_chunk(out, lse, o, l, packed, stream);
    } else if (packed) {
      out.copy_(o);
      lse.copy_(l);
    } else {
      out.copy_(o.view(q.sizes()));
      lse.copy_(l.view({q.size(2), c.batch, q.size(1)}).permute({1, 0, 2}));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// decode: the instantiation of (format, dtype) from DecodeTable, its split scratch, two launches
// ------------------------------------------------------------------------------------------------

void run_decode(kvcache::AttnParams& p, const at::Tensor& q, int64_t num_splits,
                cudaStream_t stream) {
  constexpr const char* op = "flash_attn_with_kvcache";
  const kvcache::DecodeFns fns = kvcache::DecodeTable::find(
      static_cast<int>(p.cache.format), registry_dtype(q.scalar_type()));
  TORCH_CHECK(fns.plan != nullptr, "longctx.", op, ": the decode kernels of this cache format "
              "and dtype are not compiled into this build");
  const int m_tiles = kvcache::decode_row_tiles(p);
  TORCH_CHECK(int64_t(p.cache.kv_heads) * m_tiles <= 65535 && p.cache.batch <= 65535,
              "longctx.flash_attn_with_kvcache: batch (", p.cache.batch, ") and kv_heads x query "
              "tiles (", int64_t(p.cache.kv_heads) * m_tiles, ") must be <= 65535 on CUDA");
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t max_keys = kvcache::seq_capacity(p.cache);
  kvcache::DecodeLaunch l;
  cudaError_t err = fns.plan(p, static_cast<int>(num_splits), max_keys,
                             prop->multiProcessorCount, &l);
  TORCH_CHECK(err == cudaSuccess, "longctx.flash_attn_with_kvcache: cannot give the decode "
              "kernel ", l.smem_bytes, " bytes of shared memory: ", cudaGetErrorString(err));
  p.num_splits = l.splits;
  at::Tensor out_accum, lse_accum;  // alive until both kernels are enqueued
  if (l.splits > 1) {
    out_accum = at::empty({l.splits, p.total_q, p.heads, p.cache.head_dim},
                          q.options().dtype(at::kFloat));
    lse_accum = at::empty({l.splits, p.heads, p.total_q}, q.options().dtype(at::kFloat));
    p.out_accum = out_accum.data_ptr<float>();
    p.lse_accum = lse_accum.data_ptr<float>();
  }
  // Programmatic dependent launch on sm_90+ (grid_dependency.cuh).
  const bool pdl = prop->major >= 9;
  check_launch(op, "decode kernel", fns.decode(p, l, pdl, stream));
  if (l.splits > 1) {
    TORCH_CHECK(p.heads <= 65535, "longctx.flash_attn_with_kvcache: heads must be <= 65535");
    check_launch(op, "merge kernel", fns.merge(p, pdl, stream));
  }
}

// ------------------------------------------------------------------------------------------------
// op
// ------------------------------------------------------------------------------------------------

// The decode path serves at most kDecodeMaxRows packed query rows (seqlen_q x GQA group) per kv
// head; larger shapes take the gathered prefill.
bool decode_rows_fit(int64_t seqlen_q, int64_t group) {
  return seqlen_q * std::max<int64_t>(group, 1) <= kc::kDecodeMaxRows;
}

bool is_decode(const at::Tensor& q, const at::Tensor& k_cache, int64_t seqlen_q) {
  // Runs before the argument checks: q's rank is checked, k_cache's is not yet.
  const int64_t group = k_cache.dim() == 4 && k_cache.size(2) > 0 ? q.size(-2) / k_cache.size(2)
                                                                   : 1;
  return decode_rows_fit(seqlen_q, group);
}

// Mixed batches: the number of leading sequences of a packed batch (cu_seqlens_q on the host)
// that the decode path serves (decode_rows_fit for each).
int leading_decode_seqs(const at::Tensor& cu_q_host, int batch, int64_t group) {
  const int32_t* cu = cu_q_host.data_ptr<int32_t>();
  int nd = 0;
  while (nd < batch && decode_rows_fit(cu[nd + 1] - cu[nd], group)) ++nd;
  return nd;
}

// The longest query of sequences [b0, b1) (cu_seqlens_q on the host).
int max_query_len(const int32_t* cu, int b0, int b1) {
  int m = 0;
  for (int b = b0; b < b1; ++b) m = std::max(m, cu[b + 1] - cu[b]);
  return m;
}

// A packed batch whose first nd sequences (0 < nd < batch) are decode rows: those run the decode
// kernels on the first cu[nd] rows (the same pointers, fewer sequences), the others the chunked
// prefill on views of the rest (their rows, cache lengths, block-table rows and lse columns,
// cu_seqlens_q rebased to 0 on the device). Same stream, so out and lse are written in order.
void attend_mixed(const KVCacheAttnCall& c, const at::Tensor& cu_q_host, int nd,
                  cudaStream_t stream) {
  const kvcache::AttnParams& p = c.params;
  const int batch = p.cache.batch;
  const int32_t* cu = cu_q_host.data_ptr<int32_t>();
  const int64_t rows_d = cu[nd], rows_p = int64_t(cu[batch]) - rows_d;

  if (rows_d > 0) {  // leading rows with no query at all have nothing to write
    kvcache::AttnParams pd = p;
    pd.cache.batch = nd;
    pd.total_q = rows_d;
    pd.seqlen_q = max_query_len(cu, 0, nd);
    run_decode(pd, c.q, c.num_splits, stream);
  }

  kvcache::AttnParams pp = p;
  pp.cache.batch = batch - nd;
  pp.cache.block_table = p.cache.block_table + int64_t(nd) * p.cache.block_table_stride;
  pp.cache.cache_seqlens = p.cache.cache_seqlens + nd;
  pp.total_q = rows_p;
  pp.seqlen_q = max_query_len(cu, nd, batch);
  const at::Tensor cu_p = c.cu_seqlens_q->narrow(0, nd, batch - nd + 1) - cu[nd];
  prefill_gather_fwd(c.q.narrow(0, rows_d, rows_p), pp,
                     c.cache.cache_seqlens.narrow(0, nd, batch - nd), cu_p, c.sinks,
                     c.out.narrow(0, rows_d, rows_p), c.lse.narrow(1, rows_d, rows_p), true,
                     stream);
}

struct Cuda {
  static void append(const kvcache::AppendParams& p, const at::Tensor& k) { append_cuda(p, k); }

  // The gathered prefill cannot mask keys on invalid pages: it needs the host checks, except in
  // a CUDA graph capture, where nothing can be read on the host (validate=False is the caller's
  // promise there; the gather writes NaN keys for invalid pages, append.cuh).
  static bool needs_host_checks(const at::Tensor& q, const at::Tensor& k_cache, int64_t seqlen_q) {
    return !is_decode(q, k_cache, seqlen_q) &&
           !stream_capturing(at::cuda::getCurrentCUDAStream(q.device().index()));
  }

  // What only the CUDA kernels refuse: head dims that are not multiples of 8 up to 256, pools the
  // vector loads cannot read. Runs on the current device (a Hopper GPU).
  static void check(const kvcache::AttnParams& p, const at::Tensor& q,
                    const KVCacheTensors& cache) {
    constexpr const char* op = "flash_attn_with_kvcache";
    const c10::cuda::CUDAGuard guard(q.device());
    check_hopper(op);
    if (p.total_q == 0 || p.heads == 0) return;
    const int d = p.cache.head_dim;
    LONGCTX_CHECK_ARG(kvcache::decode_head_dim_ok(d), op, "k_cache",
                      "head_dim must be a multiple of 8 in [8, 256] on CUDA (64, 128 and 256 run "
                      "their own kernels, the others the next of them up), got ", d);
    LONGCTX_CHECK_ARG(decode_aligned(cache.k_cache, cache.v_cache), op, "k_cache",
                      "and v_cache must be 16-byte aligned with page/slot/head strides that are "
                      "multiples of 8 elements on CUDA, got strides ", cache.k_cache.strides(),
                      " and ", cache.v_cache.strides());
  }

  static void attend(const KVCacheAttnCall& c) {  // after check()
    kvcache::AttnParams& p = c.params;
    if (p.total_q == 0 || p.heads == 0) return;
    const c10::cuda::CUDAGuard guard(c.q.device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if (!is_decode(c.q, c.cache.k_cache, p.seqlen_q)) {
      // In a CUDA graph capture nothing is read on the host: no mixed split, chunks planned on
      // the device.
      const bool capturing = stream_capturing(stream);
      if (!capturing && c.cu_seqlens_q.has_value() && p.cache.batch > 1) {  // mixed batch? (syncs)
        const at::Tensor cq = c.cu_seqlens_q->to(at::kCPU);
        const int nd = leading_decode_seqs(cq, p.cache.batch, p.heads / p.cache.kv_heads);
        if (nd > 0 && nd < p.cache.batch) {
          attend_mixed(c, cq, nd, stream);
          return;
        }
      }
      prefill_gather_fwd(c.q, p, c.cache.cache_seqlens, c.cu_seqlens_q, c.sinks, c.out, c.lse,
                         !capturing, stream);
      return;
    }
    run_decode(p, c.q, c.num_splits, stream);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(longctx, CUDA, m) {
  m.impl("kvcache_append", &kvcache_append_op<Cuda>);
  m.impl("flash_attn_with_kvcache", &flash_attn_with_kvcache_op<Cuda>);
  m.impl("flash_attn_with_kvcache_check", &flash_attn_with_kvcache_check_op<Cuda>);
}

// The append and the chunked prefill's gather live here, for every dtype and format; each
// decode instantiation registers its own (format, dtype) entry ("decode", generate_kernels.py).
LONGCTX_REGISTER_KERNEL("kvcache", "cuda", "bf16,fp16",
                        "append,attention,prefill_gather_fwd,cache_bf16,cache_fp16,cache_int8,"
                        "cache_fp8_e4m3,rope,causal,window,gqa,varlen,any_block_size,softcap,"
                        "sinks");

}  // namespace longctx
