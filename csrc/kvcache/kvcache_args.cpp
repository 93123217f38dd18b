// Argument checks for kvcache_append / flash_attn_with_kvcache (CPU twin and CUDA launchers) and
// their translation into kvcache::AppendParams / AttnParams.
//
// Order matters, as in flash/flash_args.cpp: ranks before sizes, dtypes before data_ptr<T>, shapes
// before values. The value checks (validate=True) read the small index tensors on the host and
// run last, once every shape is known to be right, so a wrong page id or length is an error that
// names the sequence, never a write outside the sequence's pages.
#include "kvcache/kvcache_args.h"
#include <algorithm>
#include <cmath>
#include <limits>
#include <unordered_map>
#include <vector>
#include "flash/flash_args.h"
#include "common/checks.h"
#include "common/logit_mods.h"
#include "longctx/rope/rope_kernel_limits.h"

namespace longctx {
namespace {

constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

bool is_quantized(at::ScalarType s) { return s == at::kChar || s == at::kFloat8_e4m3fn; }

void check_absent(const std::optional<at::Tensor>& t, const char* op, const char* arg,
                  const char* why) {
  LONGCTX_CHECK_ARG(!t.has_value(), op, arg, "must be None ", why);
}

// Pools, scales, block table and lengths; elem is the dtype of q / the new tokens.
kvcache::PagedKV make_paged_kv(const KVCacheTensors& c, at::ScalarType elem,
                               const at::Tensor& ref, const char* ref_name, bool writes,
                               bool validate, const char* op) {
  const at::Tensor& kc = c.k_cache;
  const at::Tensor& vc = c.v_cache;
  const bool on_cpu = ref.device().is_cpu();
  check_dim(kc, op, "k_cache", {4});
  if (on_cpu) {
    check_dtype(kc, op, "k_cache",
                {at::kBFloat16, at::kHalf, at::kFloat, at::kChar, at::kFloat8_e4m3fn});
  } else {
    check_dtype(kc, op, "k_cache", {at::kBFloat16, at::kHalf, at::kChar, at::kFloat8_e4m3fn});
  }
  LONGCTX_CHECK_ARG(is_quantized(kc.scalar_type()) || kc.scalar_type() == elem, op, "k_cache",
                    "must have the dtype of ", ref_name, " (", elem,
                    ") or be a quantized cache (int8, float8_e4m3fn), got ", kc.scalar_type());
  LONGCTX_CHECK_ARG(vc.scalar_type() == kc.scalar_type(), op, "v_cache",
                    "must have the dtype of k_cache (", kc.scalar_type(), "), got ",
                    vc.scalar_type());
  LONGCTX_CHECK_ARG(vc.sizes() == kc.sizes(), op, "v_cache",
                    "must have the shape of k_cache (num_blocks, block_size, kv_heads, head_dim) "
                    "= ", kc.sizes(), ", got ", vc.sizes());
  check_same_device(kc, ref, op, "k_cache", ref_name);
  check_same_device(vc, ref, op, "v_cache", ref_name);
  check_last_dim_contiguous(kc, op, "k_cache");
  check_last_dim_contiguous(vc, op, "v_cache");
  if (writes) {
    check_writable(kc, op, "k_cache");
    check_writable(vc, op, "v_cache");
  }
  const int64_t num_blocks = kc.size(0), block_size = kc.size(1), kv_heads = kc.size(2),
                head_dim = kc.size(3);
  LONGCTX_CHECK_ARG(block_size >= 1 && block_size <= kIntMax, op, "k_cache",
                    "must have block_size (dim 1) >= 1, got shape ", kc.sizes());
  LONGCTX_CHECK_ARG(kv_heads >= 1 && kv_heads <= kIntMax, op, "k_cache",
                    "must have kv_heads (dim 2) >= 1, got shape ", kc.sizes());
  LONGCTX_CHECK_ARG(head_dim >= 1 && head_dim <= 256, op, "k_cache",
                    "must have head_dim (dim 3) in [1, 256], got shape ", kc.sizes());

  kvcache::PagedKV p;
  const at::ScalarType s = kc.scalar_type();
  p.format = s == at::kChar ? kvcache::Format::kInt8
             : s == at::kFloat8_e4m3fn ? kvcache::Format::kFp8E4M3
                                        : kvcache::Format::kNative;

  // scales of each format
  if (p.format == kvcache::Format::kInt8) {
    check_absent(c.k_fp8_scale, op, "k_fp8_scale",
                 "for an int8 cache (it takes k_scale_cache / v_scale_cache)");
    check_absent(c.v_fp8_scale, op, "v_fp8_scale",
                 "for an int8 cache (it takes k_scale_cache / v_scale_cache)");
    const std::optional<at::Tensor>* scs[2] = {&c.k_scale_cache, &c.v_scale_cache};
    const char* names[2] = {"k_scale_cache", "v_scale_cache"};
    for (int i = 0; i < 2; ++i) {
      LONGCTX_CHECK_ARG(scs[i]->has_value(), op, names[i],
                        "is required for an int8 cache: fp32 (num_blocks, block_size, kv_heads) "
                        "= (", num_blocks, ", ", block_size, ", ", kv_heads, ")");
      const at::Tensor& t = **scs[i];
      check_dtype(t, op, names[i], {at::kFloat});
      LONGCTX_CHECK_ARG(t.dim() == 3 && t.size(0) == num_blocks && t.size(1) == block_size &&
                            t.size(2) == kv_heads,
                        op, names[i], "must have shape (num_blocks, block_size, kv_heads) = (",
                        num_blocks, ", ", block_size, ", ", kv_heads, "), got ", t.sizes());
      check_same_device(t, ref, op, names[i], ref_name);
      if (writes) check_writable(t, op, names[i]);
    }
  } else if (p.format == kvcache::Format::kFp8E4M3) {
    check_absent(c.k_scale_cache, op, "k_scale_cache",
                 "for a float8_e4m3fn cache (it takes per-head k_fp8_scale / v_fp8_scale)");
    check_absent(c.v_scale_cache, op, "v_scale_cache",
                 "for a float8_e4m3fn cache (it takes per-head k_fp8_scale / v_fp8_scale)");
    const std::optional<at::Tensor>* scs[2] = {&c.k_fp8_scale, &c.v_fp8_scale};
    const char* names[2] = {"k_fp8_scale", "v_fp8_scale"};
    for (int i = 0; i < 2; ++i) {
      LONGCTX_CHECK_ARG(scs[i]->has_value(), op, names[i],
                        "is required for a float8_e4m3fn cache: fp32 (kv_heads,) = (", kv_heads,
                        ",) (longctx.fp8_scales_from_data calibrates one)");
      const at::Tensor& t = **scs[i];
      check_dtype(t, op, names[i], {at::kFloat});
      LONGCTX_CHECK_ARG(t.dim() == 1 && t.size(0) == kv_heads && t.is_contiguous(), op,
                        names[i], "must be a contiguous (kv_heads,) = (", kv_heads,
                        ",) tensor, got shape ", t.sizes());
      check_same_device(t, ref, op, names[i], ref_name);
      if (validate) {
        const at::Tensor h = t.to(at::kCPU);
        const float* x = h.data_ptr<float>();
        for (int64_t j = 0; j < kv_heads; ++j)
          TORCH_CHECK(std::isfinite(x[j]) && x[j] > 0.f, "longctx.", op, ": ", names[i], "[", j,
                      "] = ", x[j], " must be finite and > 0");
      }
    }
  } else {
    const char* why = "for an unquantized cache (scales belong to int8 / float8_e4m3fn caches)";
    check_absent(c.k_scale_cache, op, "k_scale_cache", why);
    check_absent(c.v_scale_cache, op, "v_scale_cache", why);
    check_absent(c.k_fp8_scale, op, "k_fp8_scale", why);
    check_absent(c.v_fp8_scale, op, "v_fp8_scale", why);
  }

  // block table and lengths
  const at::Tensor& bt = c.block_table;
  const at::Tensor& sl = c.cache_seqlens;
  check_dtype(bt, op, "block_table", {at::kInt});
  check_dim(bt, op, "block_table", {2});
  LONGCTX_CHECK_ARG(bt.size(1) <= 1 || bt.stride(1) == 1, op, "block_table",
                    "must be contiguous in its last dimension, got strides ", bt.strides());
  check_same_device(bt, ref, op, "block_table", ref_name);
  check_dtype(sl, op, "cache_seqlens", {at::kInt});
  LONGCTX_CHECK_ARG(sl.dim() == 1 && sl.is_contiguous(), op, "cache_seqlens",
                    "must be a contiguous 1-D (batch,) tensor, got shape ", sl.sizes());
  check_same_device(sl, ref, op, "cache_seqlens", ref_name);
  LONGCTX_CHECK_ARG(sl.size(0) == bt.size(0), op, "cache_seqlens",
                    "must have one entry per row of block_table (batch = ", bt.size(0), "), got ",
                    sl.size(0));
  LONGCTX_CHECK_ARG(bt.size(0) <= kIntMax && bt.size(1) <= kIntMax, op, "block_table",
                    "is too large: ", bt.sizes());
  LONGCTX_CHECK_ARG(bt.size(1) * block_size <= kIntMax, op, "block_table",
                    "covers max_blocks * block_size = ", bt.size(1) * block_size,
                    " tokens per sequence; at most 2^31 - 1 are supported");

  p.k.data = kc.data_ptr();
  p.v.data = vc.data_ptr();
  p.k.page_stride = kc.stride(0);
  p.k.slot_stride = kc.stride(1);
  p.k.head_stride = kc.stride(2);
  p.v.page_stride = vc.stride(0);
  p.v.slot_stride = vc.stride(1);
  p.v.head_stride = vc.stride(2);
  if (p.format == kvcache::Format::kInt8) {
    const at::Tensor& ks = *c.k_scale_cache;
    const at::Tensor& vs = *c.v_scale_cache;
    p.k.token_scale = ks.data_ptr<float>();
    p.v.token_scale = vs.data_ptr<float>();
    p.k.scale_page_stride = ks.stride(0);
    p.k.scale_slot_stride = ks.stride(1);
    p.k.scale_head_stride = ks.stride(2);
    p.v.scale_page_stride = vs.stride(0);
    p.v.scale_slot_stride = vs.stride(1);
    p.v.scale_head_stride = vs.stride(2);
  } else if (p.format == kvcache::Format::kFp8E4M3) {
    p.k.head_scale = c.k_fp8_scale->data_ptr<float>();
    p.v.head_scale = c.v_fp8_scale->data_ptr<float>();
  }
  p.block_table = bt.data_ptr<int32_t>();
  p.block_table_stride = bt.size(0) <= 1 ? bt.size(1) : bt.stride(0);
  p.cache_seqlens = sl.data_ptr<int32_t>();
  p.num_blocks = num_blocks;
  p.batch = static_cast<int>(bt.size(0));
  p.kv_heads = static_cast<int>(kv_heads);
  p.head_dim = static_cast<int>(head_dim);
  p.block_size = static_cast<int>(block_size);
  p.max_blocks = static_cast<int>(bt.size(1));
  p.validated = validate;
  return p;
}

// Host-side value checks of the page map. new_len[b] tokens are appended to sequence b (all 0 for
// attention). Every page of [0, cache_seqlens[b] + new_len[b]) must be in [0, num_blocks); with
// writes, every page receiving new tokens must appear exactly once among all sequences' pages.
void check_pages(const kvcache::PagedKV& p, const at::Tensor& block_table,
                 const at::Tensor& cache_seqlens, const std::vector<int64_t>& new_len,
                 bool writes, const char* op) {
  const at::Tensor bt = block_table.to(at::kCPU).contiguous();
  const at::Tensor sl = cache_seqlens.to(at::kCPU);
  const int32_t* tab = bt.data_ptr<int32_t>();
  const int32_t* len = sl.data_ptr<int32_t>();
  const int64_t bs = p.block_size, mb = p.max_blocks;
  for (int b = 0; b < p.batch; ++b) {
    TORCH_CHECK(len[b] >= 0, "longctx.", op, ": cache_seqlens[", b, "] = ", len[b],
                " must be >= 0");
    const int64_t total = int64_t(len[b]) + new_len[b];
    const int64_t pages = (total + bs - 1) / bs;
    if (writes) {
      TORCH_CHECK(pages <= mb, "longctx.", op, ": cache_seqlens[", b, "] = ", len[b], " plus ",
                  new_len[b], " new tokens = ", total, " tokens need ", pages, " pages of ", bs,
                  " but block_table has ", mb,
                  " columns (max_blocks): allocate pages before appending");
    } else {
      TORCH_CHECK(pages <= mb, "longctx.", op, ": cache_seqlens[", b, "] = ", len[b],
                  " tokens need ", pages, " pages of ", bs, " but block_table has ", mb,
                  " columns (max_blocks)");
    }
    for (int64_t j = 0; j < pages; ++j) {
      const int32_t page = tab[b * mb + j];
      TORCH_CHECK(page >= 0 && page < p.num_blocks, "longctx.", op, ": block_table[", b, "][",
                  j, "] = ", page, " is not a page of the pool: page ids must lie in "
                  "[0, num_blocks = ", p.num_blocks, ") (sequence ", b, " holds ", total,
                  " tokens, so its first ", pages, " entries are used)");
    }
  }
  if (!writes) return;
  // Pages receiving new tokens, then how often each is used by any sequence's pages.
  std::unordered_map<int32_t, int64_t> uses;
  for (int b = 0; b < p.batch; ++b) {
    if (new_len[b] == 0) continue;
    for (int64_t j = len[b] / bs; j <= (len[b] + new_len[b] - 1) / bs; ++j)
      uses[tab[b * mb + j]] = 0;
  }
  for (int b = 0; b < p.batch; ++b) {
    const int64_t pages = (int64_t(len[b]) + new_len[b] + bs - 1) / bs;
    for (int64_t j = 0; j < pages; ++j) {
      auto it = uses.find(tab[b * mb + j]);
      if (it != uses.end()) ++it->second;
    }
  }
  for (int b = 0; b < p.batch; ++b) {
    if (new_len[b] == 0) continue;
    for (int64_t j = len[b] / bs; j <= (len[b] + new_len[b] - 1) / bs; ++j) {
      const int32_t page = tab[b * mb + j];
      const int64_t n = uses[page];
      TORCH_CHECK(n == 1, "longctx.", op, ": block_table[", b, "][", j, "] = ", page,
                  " receives new tokens of sequence ", b, " but the page is used ", n,
                  " times by the sequences of this batch: appending would overwrite another "
                  "sequence's (or another position's) tokens");
    }
  }
}

void set_row_strides(const at::Tensor& t, bool packed, int64_t& batch_stride, int64_t& row_stride,
                     int64_t& head_stride) {
  batch_stride = packed ? 0 : t.stride(0);
  row_stride = t.stride(-3);
  head_stride = t.stride(-2);
}

void check_elem_dtype(const at::Tensor& t, const char* op, const char* arg) {
  if (t.device().is_cpu()) {
    check_dtype(t, op, arg, {at::kBFloat16, at::kHalf, at::kFloat});
  } else {
    check_dtype(t, op, arg, {at::kBFloat16, at::kHalf});
  }
}

void check_cu(const at::Tensor& cu, const at::Tensor& ref, int64_t batch, const char* op,
              const char* arg, const char* ref_name) {
  check_dtype(cu, op, arg, {at::kInt});
  LONGCTX_CHECK_ARG(cu.dim() == 1 && cu.is_contiguous(), op, arg,
                    "must be a contiguous 1-D (batch + 1,) tensor, got shape ", cu.sizes());
  LONGCTX_CHECK_ARG(cu.size(0) == batch + 1, op, arg,
                    "must have batch + 1 = ", batch + 1, " entries (batch = rows of "
                    "block_table), got ", cu.size(0));
  check_same_device(cu, ref, op, arg, ref_name);
}

}  // namespace

kvcache::Format kvcache_format(const at::Tensor& k_cache) {
  const auto s = k_cache.scalar_type();
  return s == at::kChar ? kvcache::Format::kInt8
         : s == at::kFloat8_e4m3fn ? kvcache::Format::kFp8E4M3
                                    : kvcache::Format::kNative;
}

kvcache::AppendParams make_kvcache_append_args(
    const at::Tensor& k, const at::Tensor& v, const KVCacheTensors& cache,
    const std::optional<at::Tensor>& cu_new, const std::optional<at::Tensor>& positions,
    const std::optional<at::Tensor>& inv_freq, double attention_factor, bool rope_interleaved,
    bool validate, const char* op) {
  check_elem_dtype(k, op, "k");
  LONGCTX_CHECK_ARG(v.scalar_type() == k.scalar_type(), op, "v", "must have the dtype of k (",
                    k.scalar_type(), "), got ", v.scalar_type());
  check_same_device(v, k, op, "v", "k");
  const bool packed = cu_new.has_value();
  if (packed) {
    LONGCTX_CHECK_ARG(k.dim() == 3, op, "k", "must have 3 dimensions (total_new, kv_heads, "
                      "head_dim) when cu_new is given, got shape ", k.sizes());
  } else {
    LONGCTX_CHECK_ARG(k.dim() == 4, op, "k", "must have 4 dimensions (batch, seqlen_new, "
                      "kv_heads, head_dim) when cu_new is not given, got shape ", k.sizes());
  }
  LONGCTX_CHECK_ARG(v.sizes() == k.sizes(), op, "v", "must have the shape of k (", k.sizes(),
                    "), got ", v.sizes());
  kvcache::AppendParams a;
  a.cache = make_paged_kv(cache, k.scalar_type(), k, "k", /*writes=*/true, validate, op);
  kvcache::PagedKV& c = a.cache;
  LONGCTX_CHECK_ARG(k.size(-2) == c.kv_heads, op, "k", "has ", k.size(-2),
                    " heads but k_cache has kv_heads = ", c.kv_heads);
  LONGCTX_CHECK_ARG(k.size(-1) == c.head_dim, op, "k", "has head_dim ", k.size(-1),
                    " but k_cache has head_dim = ", c.head_dim);
  check_last_dim_contiguous(k, op, "k");
  check_last_dim_contiguous(v, op, "v");
  if (packed) {
    check_cu(*cu_new, k, c.batch, op, "cu_new", "k");
    a.total_new = k.size(0);
  } else {
    LONGCTX_CHECK_ARG(k.size(0) == c.batch, op, "k", "must have the batch of block_table (",
                      c.batch, "), got ", k.size(0));
    LONGCTX_CHECK_ARG(k.size(1) <= kIntMax, op, "k", "has too many new tokens: ", k.size(1));
    a.seqlen_new = static_cast<int>(k.size(1));
    a.total_new = k.size(0) * k.size(1);
  }
  LONGCTX_CHECK_ARG(a.total_new <= kIntMax, op, "k", "has too many new tokens: ", a.total_new);

  // RoPE
  if (positions.has_value()) {
    LONGCTX_CHECK_ARG(inv_freq.has_value(), op, "positions",
                      "is given but inv_freq is not: positions only set the RoPE angle of k");
    const at::Tensor& pos = *positions;
    check_dtype(pos, op, "positions", {at::kInt, at::kLong});
    check_same_device(pos, k, op, "positions", "k");
    if (packed) {
      LONGCTX_CHECK_ARG(pos.dim() == 1 && pos.size(0) == a.total_new, op, "positions",
                        "must have shape (total_new,) = (", a.total_new, ",), got ",
                        pos.sizes());
    } else {
      LONGCTX_CHECK_ARG(pos.dim() == 2 && pos.size(0) == c.batch && pos.size(1) == a.seqlen_new,
                        op, "positions", "must have shape (batch, seqlen_new) = (", c.batch, ", ",
                        a.seqlen_new, "), got ", pos.sizes());
    }
    a.positions = pos.data_ptr();
    a.positions_int64 = pos.scalar_type() == at::kLong;
    a.pos_batch_stride = packed ? 0 : pos.stride(0);
    a.pos_row_stride = pos.stride(-1);
  }
  if (inv_freq.has_value()) {
    const at::Tensor& f = *inv_freq;
    check_dtype(f, op, "inv_freq", {at::kFloat});
    LONGCTX_CHECK_ARG(f.dim() == 1 && f.is_contiguous(), op, "inv_freq",
                      "must be a contiguous 1-D tensor of rotary_dim / 2 frequencies, got shape ",
                      f.sizes());
    check_same_device(f, k, op, "inv_freq", "k");
    LONGCTX_CHECK_ARG(f.numel() >= 1 && 2 * f.numel() <= c.head_dim &&
                          f.numel() <= rope::kMaxFrequencies,
                      op, "inv_freq", "has ", f.numel(), " frequencies, so rotary_dim = ",
                      2 * f.numel(), "; it must lie in [2, head_dim = ", c.head_dim, "]");
    LONGCTX_CHECK_ARG(std::isfinite(attention_factor) && attention_factor > 0, op,
                      "attention_factor", "must be a finite positive number, got ",
                      attention_factor);
    a.inv_freq = f.data_ptr<float>();
    a.n_freq = static_cast<int>(f.numel());
    a.rope_scale = static_cast<float>(attention_factor);
    a.rope_interleaved = rope_interleaved;
  }

  a.k = k.data_ptr();
  a.v = v.data_ptr();
  set_row_strides(k, packed, a.k_batch_stride, a.k_row_stride, a.k_head_stride);
  set_row_strides(v, packed, a.v_batch_stride, a.v_row_stride, a.v_head_stride);
  if (packed) a.cu_new = cu_new->data_ptr<int32_t>();

  if (validate) {
    std::vector<int64_t> new_len(static_cast<size_t>(c.batch), a.seqlen_new);
    if (packed) {
      check_cu_seqlens_values(*cu_new, a.total_new, a.total_new, op, "cu_new");
      const at::Tensor h = cu_new->to(at::kCPU);
      const int32_t* cu = h.data_ptr<int32_t>();
      for (int b = 0; b < c.batch; ++b) new_len[b] = int64_t(cu[b + 1]) - cu[b];
    }
    check_pages(c, cache.block_table, cache.cache_seqlens, new_len, /*writes=*/true, op);
  }
  return a;
}

kvcache::AttnParams make_kvcache_attn_args(
    const at::Tensor& q, const KVCacheTensors& cache, const std::optional<at::Tensor>& cu_seqlens_q,
    int64_t max_seqlen_q, double softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, const std::optional<at::Tensor>& sinks, double softcap,
    int64_t num_splits, bool validate, const at::Tensor& out, const at::Tensor& lse,
    const char* op, int64_t new_tokens) {
  check_elem_dtype(q, op, "q");
  const bool packed = cu_seqlens_q.has_value();
  const auto shapes = flash_fwd_output_shapes(q, packed, op);  // checks q's rank
  kvcache::AttnParams a;
  a.cache = make_paged_kv(cache, q.scalar_type(), q, "q", /*writes=*/false, validate, op);
  kvcache::PagedKV& c = a.cache;
  const int64_t heads = q.size(-2);
  LONGCTX_CHECK_ARG(q.size(-1) == c.head_dim, op, "q", "has head_dim ", q.size(-1),
                    " but k_cache has head_dim = ", c.head_dim);
  LONGCTX_CHECK_ARG(heads >= 1 && heads % c.kv_heads == 0, op, "q",
                    "heads must be a multiple of the kv_heads of k_cache (GQA): q has ", heads,
                    " heads, k_cache has ", c.kv_heads);
  LONGCTX_CHECK_ARG(heads <= kIntMax, op, "q", "has too many heads: ", heads);
  check_last_dim_contiguous(q, op, "q");
  LONGCTX_CHECK_ARG(max_seqlen_q >= 0 && max_seqlen_q <= kIntMax, op, "max_seqlen_q",
                    "must lie in [0, 2^31), got ", max_seqlen_q);
  if (packed) {
    check_cu(*cu_seqlens_q, q, c.batch, op, "cu_seqlens_q", "q");
    a.seqlen_q = static_cast<int>(max_seqlen_q);
    a.total_q = q.size(0);
  } else {
    LONGCTX_CHECK_ARG(q.size(0) == c.batch, op, "q", "must have the batch of block_table (",
                      c.batch, "), got ", q.size(0));
    LONGCTX_CHECK_ARG(q.size(1) <= kIntMax, op, "q", "seqlen_q must be < 2^31, got ", q.size(1));
    a.seqlen_q = static_cast<int>(q.size(1));
    a.total_q = q.size(0) * q.size(1);
  }
  LONGCTX_CHECK_ARG(int64_t(a.seqlen_q) * (heads / c.kv_heads) <= kIntMax, op, "q",
                    "seqlen_q * heads / kv_heads must be < 2^31");
  LONGCTX_CHECK_ARG(std::isfinite(softmax_scale), op, "softmax_scale", "must be finite, got ",
                    softmax_scale);
  LONGCTX_CHECK_ARG(window_left >= -1, op, "window_left", "must be -1 (unbounded) or >= 0, got ",
                    window_left);
  LONGCTX_CHECK_ARG(window_right >= -1, op, "window_right",
                    "must be -1 (unbounded) or >= 0, got ", window_right);
  if (causal) {
    LONGCTX_CHECK_ARG(window_right <= 0, op, "window_right",
                      "must be -1 or 0 with causal=True (causal means window_right = 0), got ",
                      window_right);
  }
  LONGCTX_CHECK_ARG(num_splits >= 1 && num_splits <= 1024, op, "num_splits",
                    "must lie in [1, 1024] once resolved (0 = automatic), got ", num_splits);

  // outputs
  LONGCTX_CHECK_ARG(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(), op, "out",
                    "must have the shape and dtype of q");
  check_same_device(out, q, op, "out", "q");
  check_same_device(lse, q, op, "lse", "q");
  check_last_dim_contiguous(out, op, "out");
  LONGCTX_CHECK_ARG(lse.scalar_type() == at::kFloat && lse.sizes() == at::IntArrayRef(shapes.lse),
                    op, "lse", "must be fp32 of shape ", at::IntArrayRef(shapes.lse));
  check_last_dim_contiguous(lse, op, "lse");

  a.q = q.data_ptr();
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  set_row_strides(q, packed, a.q_batch_stride, a.q_row_stride, a.q_head_stride);
  set_row_strides(out, packed, a.out_batch_stride, a.out_row_stride, a.out_head_stride);
  a.lse_batch_stride = packed ? 0 : lse.stride(0);
  a.lse_head_stride = lse.stride(-2);
  if (packed) a.cu_seqlens_q = cu_seqlens_q->data_ptr<int32_t>();
  a.heads = static_cast<int>(heads);
  a.softmax_scale = static_cast<float>(softmax_scale);
  a.causal = causal;
  a.window_left = window_left > kIntMax ? -1 : static_cast<int>(window_left);
  a.window_right = causal ? 0 : (window_right > kIntMax ? -1 : static_cast<int>(window_right));
  a.mods = make_logit_mods(sinks, softcap, q, heads, op);
  a.num_splits = static_cast<int>(num_splits);

  TORCH_CHECK(new_tokens >= (packed ? -1 : 0) && (!packed || new_tokens <= 0), "longctx.", op,
              ": new_tokens must be -1 or 0 with packed queries, >= 0 without, got ",
              new_tokens);
  if (validate) {
    std::vector<int64_t> new_len(static_cast<size_t>(c.batch), std::max<int64_t>(new_tokens, 0));
    if (packed) {
      check_cu_seqlens_values(*cu_seqlens_q, a.total_q, a.seqlen_q, op, "cu_seqlens_q");
      if (new_tokens == -1) {
        const at::Tensor h = cu_seqlens_q->to(at::kCPU);
        const int32_t* cu = h.data_ptr<int32_t>();
        for (int b = 0; b < c.batch; ++b) new_len[b] = int64_t(cu[b + 1]) - cu[b];
      }
    }
    check_pages(c, cache.block_table, cache.cache_seqlens, new_len, new_tokens != 0, op);
  }
  return a;
}

}  // namespace longctx
