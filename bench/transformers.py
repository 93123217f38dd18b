"""bench/transformers: whole HuggingFace models with attn_implementation "longctx" against "sdpa"
and "eager" on the same random weights, prefill and a training step (issue 25).
Writes bench/results/<gpu>/transformers.{json,md}.

    python bench/transformers.py [--quick] [--models llama,gemma2,gpt-oss] [--no-eager] [--out DIR]

Models (random weights, bf16, batch 1, 8 layers): Llama-shaped (hidden 4096, 32 heads, 8 KV
heads, head dim 128, MLP 14336, vocab 32000, llama3 RoPE): prefill at 32K and 128K tokens, a
training step at 16K; Gemma-2-shaped (Gemma 2 2B's attention: 8 heads, 4 KV heads, head dim 256,
softcap 50, sliding window 4096 on alternate layers; hidden 2304): prefill at 32K and 8K (eager's
scores fit at 8K only); gpt-oss-shaped
(gpt-oss-20b's attention: 64 heads, 8 KV heads, head dim 64, sinks, window 128 on alternate
layers; 32 experts, top 4): prefill at 32K and 8K. --quick: the same models at 8K (training 4K).

A prefill is model(ids, use_cache=False, logits_to_keep=1) under no_grad; a training step
is zero_grad, forward with labels, backward. Times: longctx.bench.time_cuda (CUDA events, median).
Peers: attn_implementation "sdpa" and "eager" on the same model object (set_attn_implementation).
A peer the model does not allow (gpt-oss: no sdpa) or whose memory would not fit (eager keeps
heads * tokens^2 scores: ~12 bytes each in a prefill; a training step keeps ~8 per layer) is
null, with the reason under "skipped". "sdpa_backend" is the SDPA kernel that ran, read from the
aten op each layer called (flash, cudnn, efficient; math where a layer called none of them);
transformers' sdpa path drops Gemma 2's softcap (noted in the row). Each row's "check" compares
longctx's output (prefill: the last token's logits; training: the loss) with a peer's; an
implementation that fails records its error under "errors" and the run goes on.

Without a CUDA GPU: a smoke run of tiny fp32 models (2 layers, 64-128 tokens, windows shorter
than the prompt, no ceilings), to
check the script end to end; its times measure nothing. It writes only with --out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, Optional

HERE = Path(__file__).resolve().parent
# Run as a script, this file's folder is sys.path[0] and this file would shadow the transformers
# package it benchmarks.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import (AutoModelForCausalLM, Gemma2Config, GptOssConfig,  # noqa: E402
                          LlamaConfig)

import longctx.integrations.transformers  # noqa: E402,F401  (registers "longctx")
from longctx.bench import (Results, copy_bandwidth_gbps, matmul_tflops, nvtx_range,  # noqa: E402
                           time_cpu, time_cuda)

NAME = "transformers"
COLUMNS = [("model", "case.model"), ("tokens", "case.tokens"), ("kind", "case.kind"),
           ("longctx ms", "ours_ms"), ("sdpa ms", "peers.sdpa"), ("eager ms", "peers.eager"),
           ("x sdpa", "ratio.sdpa"), ("x eager", "ratio.eager"), ("sdpa kernel", "sdpa_backend")]
PEERS = ("sdpa", "eager")
_BYTES_PER_SCORE = {"prefill": 12, "train_step": 8}  # eager's memory per (head, query, key)


# ------------------------------------------------------------------------------------ models


def model_configs(tiny: bool) -> Dict[str, object]:
    """The three model shapes; tiny: 2 layers at toy widths (the CPU smoke run)."""
    common = dict(num_hidden_layers=2 if tiny else 8, initializer_range=0.02,
                  tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if tiny:
        return {
            "llama": LlamaConfig(**common, vocab_size=256, hidden_size=128,
                                 intermediate_size=256, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=4096),
            "gemma2": Gemma2Config(**common, vocab_size=256, hidden_size=64,
                                   intermediate_size=128, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                                   sliding_window=64, layer_types=["sliding_attention",
                                                                   "full_attention"],
                                   attn_logit_softcapping=50.0),
            "gpt-oss": GptOssConfig(**common, vocab_size=256, hidden_size=64,
                                    intermediate_size=64, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=64, num_local_experts=4,
                                    num_experts_per_tok=2, sliding_window=32,
                                    layer_types=["sliding_attention", "full_attention"]),
        }
    alternate = ["sliding_attention", "full_attention"] * 4
    return {
        "llama": LlamaConfig(**common, vocab_size=32000, hidden_size=4096,
                             intermediate_size=14336, num_attention_heads=32,
                             num_key_value_heads=8, max_position_embeddings=131072,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                              "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 8192}),
        "gemma2": Gemma2Config(**common, vocab_size=256000, hidden_size=2304,
                               intermediate_size=9216, num_attention_heads=8,
                               num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                               sliding_window=4096, layer_types=alternate,
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                               max_position_embeddings=32768),
        "gpt-oss": GptOssConfig(**common, vocab_size=201088, hidden_size=2880,
                                intermediate_size=2880, num_attention_heads=64,
                                num_key_value_heads=8, head_dim=64, num_local_experts=32,
                                num_experts_per_tok=4, sliding_window=128,
                                layer_types=alternate),
    }


def cases(quick: bool, tiny: bool):
    """(model, tokens, kind) in run order."""
    if tiny:
        return [("llama", 128, "prefill"), ("llama", 64, "train_step"),
                ("gemma2", 96, "prefill"), ("gpt-oss", 64, "prefill")]
    if quick:
        return [("llama", 8192, "prefill"), ("llama", 4096, "train_step"),
                ("gemma2", 8192, "prefill"), ("gpt-oss", 8192, "prefill")]
    return [("llama", 32768, "prefill"), ("llama", 131072, "prefill"),
            ("llama", 16384, "train_step"), ("gemma2", 32768, "prefill"),
            ("gemma2", 8192, "prefill"), ("gpt-oss", 32768, "prefill"),
            ("gpt-oss", 8192, "prefill")]


def build(config, device: str, dtype: torch.dtype):
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, attn_implementation="longctx",
                                                dtype=dtype).eval()


def shape_of(config) -> Dict[str, object]:
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "vocab_size", "sliding_window",
            "attn_logit_softcapping", "num_local_experts", "num_experts_per_tok")
    return {k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}


# ------------------------------------------------------------------------------------- calls


def step_fn(model, ids, kind: str) -> Callable[[], torch.Tensor]:
    """One prefill (the last token's logits) or one training step (the loss)."""
    if kind == "prefill":
        def prefill():
            # no_grad, not inference_mode: under inference_mode sdpa_backend's dispatch mode sees
            # no aten op
            with torch.no_grad():
                return model(ids, use_cache=False, logits_to_keep=1).logits
        return prefill

    def train_step():
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach()
    return train_step


_SDPA_KERNELS = {"_scaled_dot_product_flash_attention": "flash",
                 "_scaled_dot_product_flash_attention_for_cpu": "flash_cpu",
                 "_scaled_dot_product_cudnn_attention": "cudnn",
                 "_scaled_dot_product_efficient_attention": "efficient",
                 "_scaled_dot_product_fused_attention_overrideable": "overrideable"}


class _SdpaKernels(TorchDispatchMode):
    """Counts the fused SDPA kernels (aten ops) called, forward only."""

    def __init__(self):
        super().__init__()
        self.calls: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        label = _SDPA_KERNELS.get(func.overloadpacket.__name__)
        if label:
            self.calls[label] = self.calls.get(label, 0) + 1
        return func(*args, **(kwargs or {}))


def sdpa_backend(fn: Callable, layers: int) -> str:
    """The SDPA kernels one call of fn ran, '+'-joined; 'math' for layers that called none (the
    math path decomposes into plain ops)."""
    with _SdpaKernels() as rec:
        fn()
    names = set(rec.calls)
    if sum(rec.calls.values()) < layers:
        names.add("math")
    return "+".join(sorted(names))


def eager_score_bytes(config, tokens: int, kind: str) -> int:
    """Memory of eager attention's scores: one layer's in a prefill; in a training step every
    layer's saved probabilities plus one layer's temporaries."""
    per_layer = config.num_attention_heads * tokens * tokens
    if kind == "prefill":
        return per_layer * _BYTES_PER_SCORE["prefill"]
    return per_layer * (_BYTES_PER_SCORE["train_step"] * config.num_hidden_layers
                        + _BYTES_PER_SCORE["prefill"])


def eager_fits(config, tokens: int, kind: str, free_bytes: int) -> Optional[str]:
    """None when eager's scores fit in 90% of free_bytes, else why not."""
    need = eager_score_bytes(config, tokens, kind)
    if need > 0.9 * free_bytes:
        return (f"eager keeps {config.num_attention_heads} x {tokens}^2 scores: "
                f"~{need / 2**30:.0f} GiB, {free_bytes / 2**30:.0f} GiB free")
    return None


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> Dict[str, float]:
    a, b = a.float(), b.float()
    return {"max_abs_diff": (a - b).abs().max().item(), "ref_max_abs": b.abs().max().item()}


# ----------------------------------------------------------------------------------- the run


def run(quick: bool = False, models: Optional[set] = None, with_eager: bool = True,
        progress: Callable[[str], None] = print) -> Results:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    configs = model_configs(tiny=not cuda)
    todo = [c for c in cases(quick, tiny=not cuda) if models is None or c[0] in models]
    res = Results(NAME, copy_gbps=copy_bandwidth_gbps() if cuda else None,
                  matmul_tflops=matmul_tflops() if cuda else None,
                  extra={"dtype": str(dtype).replace("torch.", ""), "batch": 1,
                         "smoke_test": not cuda,
                         "models": {m: shape_of(configs[m]) for m in {c[0] for c in todo}}})
    timer = ((lambda fn: time_cuda(fn, warmup=2, reps=5, min_time_ms=0)) if cuda
             else (lambda fn: time_cpu(fn, warmup=0, reps=1)))
    built = {}
    for name, tokens, kind in todo:
        if name not in built:
            built.clear()  # one model in memory at a time
            if cuda:
                torch.cuda.empty_cache()
            built[name] = build(configs[name], device, dtype)
        model = built[name]
        model.train(kind == "train_step")
        g = torch.Generator().manual_seed(tokens)
        ids = torch.randint(3, configs[name].vocab_size, (1, tokens), generator=g).to(device)
        tag = f"transformers {name} {kind} {tokens}"
        progress(tag)
        row = {"case": {"model": name, "tokens": tokens, "kind": kind}, "ours_ms": None,
               "peers": {}, "ratio": {}, "skipped": {}, "sdpa_backend": None}
        outputs = {}
        for impl in ("longctx",) + PEERS:
            why = None
            if impl == "eager" and not with_eager:
                why = "--no-eager"
            elif impl == "eager" and cuda:
                why = eager_fits(configs[name], tokens, kind, torch.cuda.mem_get_info()[0])
            if why is None:
                try:
                    model.set_attn_implementation(impl)
                except (ValueError, ImportError) as e:
                    why = f"the model does not allow it: {str(e).splitlines()[0][:160]}"
            if why is not None:
                row["peers"][impl], row["skipped"][impl] = None, why
                continue
            fn = step_fn(model, ids, kind)
            try:
                outputs[impl] = fn()
                with nvtx_range(f"{tag} {impl}"):
                    ms = timer(fn)
                if impl == "sdpa":
                    row["sdpa_backend"] = sdpa_backend(fn, configs[name].num_hidden_layers)
            except torch.cuda.OutOfMemoryError:
                ms = None
                row["skipped"][impl] = "out of memory"
            except Exception as e:  # one failing implementation must not hide the others
                ms = None
                row.setdefault("errors", {})[impl] = \
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            finally:
                model.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.empty_cache()
            if impl == "longctx":
                row["ours_ms"] = ms
            else:
                row["peers"][impl] = ms
        model.set_attn_implementation("longctx")
        for peer in PEERS:
            ms = row["peers"].get(peer)
            row["ratio"][peer] = ms / row["ours_ms"] if ms and row["ours_ms"] else None
        ref = next((p for p in ("eager", "sdpa") if p in outputs), None)
        if ref and "longctx" in outputs:
            row["check"] = {"vs": ref, **_max_diff(outputs["longctx"], outputs[ref])}
        if name == "gemma2" and row["peers"].get("sdpa") is not None:
            row["note"] = "transformers' sdpa path drops the attention softcap"
        if not row["skipped"]:
            del row["skipped"]
        res.add(row)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the same models at 8K tokens")
    ap.add_argument("--models", default=None,
                    help="comma-separated subset of llama,gemma2,gpt-oss (default: all)")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager peer")
    ap.add_argument("--out", default=None,
                    help="results folder: <out>/<gpu>/transformers.json and .md (default: "
                         "bench/results with a GPU; without one nothing is written)")
    args = ap.parse_args(argv)
    models = set(args.models.split(",")) if args.models else None
    unknown = (models or set()) - {"llama", "gemma2", "gpt-oss"}
    if unknown:
        ap.error(f"--models: unknown model(s) {', '.join(sorted(unknown))}; "
                 "choose from llama, gemma2, gpt-oss")
    cuda = torch.cuda.is_available()
    if not cuda:
        print("bench/transformers: no CUDA GPU; a smoke run of tiny fp32 models (times measure "
              "nothing)", flush=True)
    res = run(args.quick, models, not args.no_eager)
    print(res.markdown(COLUMNS))
    out = args.out or (str(HERE / "results") if cuda else None)
    if out is not None:
        print(f"wrote {res.write(out, COLUMNS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
