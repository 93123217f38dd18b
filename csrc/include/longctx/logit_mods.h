// Two modifiers of the attention logits that models use (framework-free, shared by the flash and
// KV-cache params):
//
//  - Logit softcapping (Gemma 2): with softcap c > 0 the score of query i and key j is
//      s_ij = c * tanh(softmax_scale * q_i.k_j / c)
//    before the mask and the softmax; c = 0 leaves s_ij = softmax_scale * q_i.k_j. Its derivative,
//    ds/dx = 1 - (s/c)^2, multiplies dS in the backward.
//  - Attention sinks (gpt-oss; StreamingLLM's sink): one logit per query head, sinks[h], that joins
//    the softmax denominator as a key with a zero value:
//      out_i = sum_j exp(s_ij - L_i) v_j,   L_i = log(exp(sinks[h]) + sum_j exp(s_ij)),
//    and lse = L_i. A row that sees no key gets out = 0 and lse = sinks[h]. The sink is in the
//    units of the scaled (and capped) scores and is not capped itself. Its gradient is
//      dsinks[h] = -sum_i exp(sinks[h] - L_i) * D_i,   D_i = dout_i . out_i,
//    summed over every query row of head h.
#pragma once

namespace longctx {

struct LogitMods {
  const float* sinks = nullptr;  // (heads,) fp32, or nullptr for no sinks
  float softcap = 0.f;           // 0: no capping
};

}  // namespace longctx
