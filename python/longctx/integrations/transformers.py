"""HuggingFace transformers on longctx: attn_implementation="longctx".

    import longctx.integrations.transformers   # registers "longctx" (import registers)
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="longctx")
    model = AutoModelForCausalLM.from_config(config, attn_implementation="longctx")

Importing this module registers two functions under the name "longctx" (`register()` does it
again, or under another name): `longctx_attention_forward` with transformers' AttentionInterface,
and `longctx_attention_mask` with its AttentionMaskInterface: transformers' own flash-attention
mask function (the attention function receives what FlashAttention receives: no mask when no
token is padding, otherwise the 2D (batch, keys) boolean padding mask), behind a check that the
mask the model asks for is one longctx expresses. Without a registered mask function
transformers would hand the attention function no mask at all and padding would be ignored.

How transformers' arguments map to longctx (docs/integrations.md):
- query (batch, heads, seq, head_dim), key/value (batch, heads_kv, seq_k, head_dim) are passed
  as .transpose(1, 2) views (FlashAttention's layout, only the last dimension contiguous: no copy
  where transformers' tensors allow it); the output is (batch, seq, heads, head_dim), the layout
  transformers' attention functions return. GQA runs natively (no repeated K/V).
- causal: bottom-right aligned, so a decode step (1 query, the cache's keys) and a chunked
  prefill need no offset. `is_causal` as the model passes it (default: module.is_causal).
- scaling -> softmax_scale; sliding_window W -> window_size (W - 1, 0): transformers' sliding
  mask keeps the query's own key and the W - 1 before it (masking_utils.sliding_window_overlay:
  kv_idx > q_idx - W), as its FlashAttention path does.
- softcap (Gemma 2) -> softcap=, s_aux (gpt-oss's attention sinks, one logit per query head in
  units of the scaled scores) -> sinks=; passed only when the model uses them.
- a padding mask -> varlen: the valid rows of q/k/v packed with int32 cu_seqlens, one
  flash_attn_varlen_func call, the output scattered back (padding rows: zeros). Queries are the
  last seq positions of the keys (left or right padding, prefill or decode).
- packed sequences (batch 1, no mask, position_ids that restart, as transformers' eager and
  flash paths detect them) and FlashAttention's cu_seq_lens_q/_k keyword arguments -> varlen.

What cannot be expressed raises NotImplementedError naming it (never a silently different
result): dropout > 0, output_attentions, a 4D attention_mask (a custom bias or block mask), mask
pieces other than causal / sliding window / padding / packing (chunked attention, image-token or
block overlays, custom or/and mask functions), a static cache without an attention_mask, a
sliding window without causal masking (transformers' bidirectional sliding conventions
disagree), value head_dim != query head_dim, and softcap/sinks on a longctx build without them.
"""
from __future__ import annotations

import inspect
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import (AttentionMaskInterface, causal_mask_function,
                                        flash_attention_mask)

from ..attention import flash_attn_func, flash_attn_varlen_func

__all__ = ["NAME", "register", "longctx_attention_forward", "longctx_attention_mask",
           "window_size_for"]

NAME = "longctx"
_WHO = "longctx attention (attn_implementation='longctx')"

# Keywords this build's attention functions take (softcap and sinks exist since issue 25).
_FLASH_KWARGS = (set(inspect.signature(flash_attn_func).parameters)
                 & set(inspect.signature(flash_attn_varlen_func).parameters))


def register(name: str = NAME) -> str:
    """Registers the attention function and the mask function under `name`; returns it.
    Idempotent; importing this module already registered NAME."""
    AttentionInterface.register(name, longctx_attention_forward)
    AttentionMaskInterface.register(name, longctx_attention_mask)
    return name


# The pieces of transformers' mask functions (masking_utils, by qualified name) that longctx
# expresses: causal, sliding windows (the layer's sliding_window argument), padding (the 2D mask)
# and packed sequences (position_ids), intersected (and_masks). A union (or_masks: image tokens,
# block overlays) is never expressed.
_EXPRESSED_MASKS = {
    "causal_mask_function", "bidirectional_mask_function",
    "sliding_window_overlay.<locals>.inner_mask",
    "sliding_window_bidirectional_overlay.<locals>.inner_mask",
    "padding_mask_function.<locals>.inner_mask",
    "packed_sequence_mask_function.<locals>.inner_mask",
}
_AND, _OR = "and_masks.<locals>.and_mask", "or_masks.<locals>.or_mask"


def _mask_parts(fn) -> list:
    """The mask functions and_masks/or_masks combined into fn (their closure's tuple)."""
    return [f for cell in (getattr(fn, "__closure__", None) or ())
            if isinstance(cell.cell_contents, tuple) for f in cell.cell_contents]


def _unexpressed_mask_parts(fn) -> list:
    """Names of the pieces of fn longctx does not express ([] when it expresses all)."""
    name = getattr(fn, "__qualname__", type(fn).__name__)
    if name in (_AND, _OR) and _mask_parts(fn):
        inner = [p for f in _mask_parts(fn) for p in _unexpressed_mask_parts(f)]
        return inner or ([name] if name == _OR else [])
    return [] if name in _EXPRESSED_MASKS else [name]


def _has_causal_part(fn) -> bool:
    return fn is causal_mask_function or any(_has_causal_part(f) for f in _mask_parts(fn))


def longctx_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0,
                           kv_offset: int = 0, mask_function=causal_mask_function,
                           attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """transformers' mask-interface contract. Returns what its flash-attention mask function
    returns (None, or the 2D padding mask sliced to this layer's keys) after refusing what
    longctx would otherwise get silently wrong: mask pieces it cannot express, and a static
    cache without a padding mask (its unused slots would be attended to)."""
    unexpressed = _unexpressed_mask_parts(mask_function)
    if unexpressed:
        raise NotImplementedError(
            f"{_WHO}: the model's attention mask includes {', '.join(unexpressed)}, which "
            "longctx cannot express (it expresses causal masks, sliding windows, padding and "
            "packed sequences); use attn_implementation='eager' or 'sdpa' for this model")
    # a static cache: its query offset is a tensor, or its keys outnumber the tokens seen
    static = isinstance(q_offset, torch.Tensor) or q_offset + q_length - kv_offset < kv_length
    if attention_mask is None and static and _has_causal_part(mask_function):
        raise NotImplementedError(
            f"{_WHO}: a static cache without an attention_mask is not supported (its "
            f"{kv_length} key slots are not all written); pass attention_mask (a (batch, "
            "tokens so far) tensor of ones; generate() passes one)")
    return flash_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                                mask_function, attention_mask, **kwargs)


def window_size_for(sliding_window: Optional[int], causal: bool) -> Tuple[int, int]:
    """longctx's window_size for transformers' `sliding_window` (None: no window)."""
    if sliding_window is None:
        return (-1, -1)
    if isinstance(sliding_window, bool) or int(sliding_window) != sliding_window \
            or sliding_window < 1:
        raise ValueError(f"{_WHO}: sliding_window must be a positive int, got {sliding_window!r}")
    if not causal:
        raise NotImplementedError(
            f"{_WHO}: sliding_window={sliding_window} without causal masking is not supported "
            "(transformers' bidirectional sliding masks keep |i - j| <= W while its FlashAttention "
            "path keeps |i - j| <= W - 1); use attn_implementation='eager' or 'sdpa'")
    return (int(sliding_window) - 1, 0)


def _feature_kwargs(softcap, s_aux) -> dict:
    """softcap= and sinks= for longctx, only where the model uses them."""
    out = {}
    if softcap is not None and float(softcap) != 0.0:
        out["softcap"] = float(softcap)
    if s_aux is not None:
        out["sinks"] = s_aux
    for key, what in (("softcap", "logit softcapping (softcap)"),
                      ("sinks", "attention sinks (s_aux)")):
        if key in out and key not in _FLASH_KWARGS:
            raise NotImplementedError(
                f"{_WHO}: the model uses {what}, which this longctx build does not support "
                f"(longctx.flash_attn_func has no '{key}' argument); update longctx")
    return out


def _check_supported(module, query, value, attention_mask, dropout, kwargs) -> None:
    if dropout and float(dropout) > 0.0:
        raise NotImplementedError(
            f"{_WHO}: attention dropout (dropout={dropout}) is not supported; set the config's "
            "attention_dropout to 0.0 or run the model in eval() mode")
    config = getattr(module, "config", None)
    if kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
        raise NotImplementedError(
            f"{_WHO}: output_attentions=True is not supported (longctx never materializes the "
            "attention probabilities); use attn_implementation='eager' for them")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise NotImplementedError(
            f"{_WHO}: a {attention_mask.dim()}D attention_mask of shape "
            f"{tuple(attention_mask.shape)} is not supported (only a 2D (batch, keys) padding "
            "mask: a custom 4D mask or bias cannot be expressed as causal/window/varlen)")
    if value.shape[-1] != query.shape[-1]:
        raise NotImplementedError(
            f"{_WHO}: value head_dim {value.shape[-1]} != query head_dim {query.shape[-1]} is "
            "not supported")


def longctx_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    is_causal: Optional[bool] = None,
    s_aux: Optional[torch.Tensor] = None,
    **kwargs,
) -> Tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query (batch, heads, seq, head_dim), key and
    value (batch, heads_kv, seq_k, head_dim), attention_mask None or the 2D padding mask (True /
    1 = a real token). Returns ((batch, seq, heads, head_dim), None)."""
    _check_supported(module, query, value, attention_mask, dropout, kwargs)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    opts = dict(softmax_scale=scaling, causal=causal,
                window_size=window_size_for(sliding_window, causal),
                **_feature_kwargs(softcap, s_aux))
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

    if attention_mask is not None:
        return _attend_padded(q, k, v, attention_mask.bool(), opts), None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        return _attend_packed(q, k, v, cu_q, cu_k, kwargs.get("max_length_q"),
                              kwargs.get("max_length_k"), opts), None
    cu = _packed_from_position_ids(kwargs.get("position_ids"), q.shape[0], q.shape[1],
                                   k.shape[1])
    if cu is not None:
        return _attend_packed(q, k, v, cu, cu, None, None, opts), None
    return flash_attn_func(q, k, v, **opts), None


def _attend_padded(q, k, v, mask: torch.Tensor, opts: dict) -> torch.Tensor:
    """Padded batch as varlen. mask (batch, L): the keys' positions (a static cache's keys may be
    longer than L: the slots past L are unused); the queries are its last seq_q positions."""
    b, sq = q.shape[0], q.shape[1]
    length = mask.shape[1]
    if mask.shape[0] != b or length < sq or k.shape[1] < length:
        raise ValueError(
            f"{_WHO}: attention_mask of shape {tuple(mask.shape)} does not fit batch {b}, "
            f"{sq} queries and {k.shape[1]} keys")
    if k.shape[1] > length:
        k, v = k[:, :length], v[:, :length]
    mask_q = mask[:, length - sq:]
    bq, iq = mask_q.nonzero(as_tuple=True)  # row-major: batch by batch, in order
    bk, ik = mask.nonzero(as_tuple=True)
    lens_q = mask_q.sum(1, dtype=torch.int32)
    lens_k = mask.sum(1, dtype=torch.int32)
    max_q, max_k = (int(x) for x in torch.stack([lens_q.max(), lens_k.max()]).tolist())
    cu_q = F.pad(lens_q.cumsum(0, dtype=torch.int32), (1, 0))
    cu_k = F.pad(lens_k.cumsum(0, dtype=torch.int32), (1, 0))
    out = flash_attn_varlen_func(q[bq, iq], k[bk, ik], v[bk, ik], cu_q, cu_k, max_q, max_k,
                                 **opts)
    return out.new_zeros(b, sq, *out.shape[1:]).index_put((bq, iq), out)


def _attend_packed(q, k, v, cu_q, cu_k, max_q, max_k, opts: dict) -> torch.Tensor:
    """Sequences packed along the batch's rows (padding-free batches), cu_seqlens given."""
    b, sq = q.shape[0], q.shape[1]
    cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
    if max_q is None:
        max_q = int(cu_q.diff().max())
    if max_k is None:
        max_k = int(cu_k.diff().max())
    out = flash_attn_varlen_func(q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]),
                                 v.reshape(-1, *v.shape[2:]), cu_q, cu_k, int(max_q), int(max_k),
                                 **opts)
    return out.view(b, sq, *out.shape[1:])


def _packed_from_position_ids(position_ids, batch: int, sq: int, sk: int
                              ) -> Optional[torch.Tensor]:
    """cu_seqlens of sequences packed in one row, where position_ids do not step by 1 (the rule of
    transformers' find_packed_sequence_indices); None when there is one sequence (a device sync
    to know, as in transformers' FlashAttention path)."""
    if (position_ids is None or batch != 1 or sq != sk or sq < 2 or position_ids.dim() != 2
            or position_ids.shape[-1] != sq or position_ids.shape[0] != 1):
        return None
    starts = (position_ids[0, 1:] - position_ids[0, :-1]) != 1
    if not bool(starts.any()):
        return None
    inner = (starts.nonzero().flatten() + 1).to(torch.int32)
    ends = torch.tensor([0, sq], dtype=torch.int32, device=inner.device)
    return torch.cat([ends[:1], inner, ends[1:]])


register()
