// One case of the standalone flash-attention tests (flash_fwd_test.cu, flash_bwd_test.cu): head
// dim, dtype, batch, heads, lengths, mask, and for varlen the per-sequence lengths; plus the
// cumulative row offsets of a case (the packed layout; batched cases are laid out the same way).
#pragma once
#include <cstdio>
#include <string>
#include <vector>

struct Case {
  int d; bool bf16; int b, h, hk, sq, sk; bool causal; int wl, wr;
  std::vector<int> lens_q = {}, lens_k = {};  // varlen when non-empty
  bool packed_qkv = false;                    // q, k, v interleaved in one (b, s, 3, h, d) buffer
  float softcap = 0.f;                        // logit softcap c (0: none)
  bool varlen() const { return !lens_q.empty(); }
  int batch() const { return varlen() ? int(lens_q.size()) : b; }
  std::string name() const {
    char buf[256];
    char cap[32] = "";
    if (softcap != 0.f) snprintf(cap, sizeof cap, " softcap=%g", softcap);
    snprintf(buf, sizeof buf, "d=%d %s b=%d h=%d/%d sq=%d sk=%d causal=%d win=(%d,%d)%s%s%s", d,
             bf16 ? "bf16" : "fp16", b, h, hk, sq, sk, causal, wl, wr,
             lens_q.empty() ? "" : " varlen", packed_qkv ? " packed" : "", cap);
    return buf;
  }
  // cuq / cuk: the batch() + 1 row offsets of the sequences' queries and keys.
  void row_offsets(std::vector<int>& cuq, std::vector<int>& cuk) const {
    const int B = batch();
    cuq.assign(B + 1, 0);
    cuk.assign(B + 1, 0);
    for (int i = 0; i < B; ++i) {
      cuq[i + 1] = cuq[i] + (varlen() ? lens_q[i] : sq);
      cuk[i + 1] = cuk[i] + (varlen() ? lens_k[i] : sk);
    }
  }
};

// A causal varlen case (4 query heads over 2 kv heads) and its non-causal twin with the key
// lengths lens_k2 (sequences of length 0 and 1 among them).
inline void add_varlen_pair(std::vector<Case>& cases, int d, bool bf16, std::vector<int> lens_q,
                            std::vector<int> lens_k, std::vector<int> lens_k2) {
  Case vl{d, bf16, 0, 4, 2, 0, 0, true, -1, -1};
  vl.lens_q = lens_q;
  vl.lens_k = lens_k;
  cases.push_back(vl);
  vl.causal = false;
  vl.lens_k = lens_k2;
  cases.push_back(vl);
}
