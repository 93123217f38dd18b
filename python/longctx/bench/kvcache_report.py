"""The KV-cache benchmark's results: several runs merged into one file, and its markdown (a table
per group, the failed cases last).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, List, Optional

from .kvcache_cases import D, WINDOW
from .results import Results

# ------------------------------------------------------------------------------------------------
# results of several runs in one file
# ------------------------------------------------------------------------------------------------

def load_results(path: Path | str) -> Optional[dict]:
    """A results file's JSON, or None where there is none."""
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else None


def merge_runs(previous: Optional[dict], res: Results) -> Results:
    """res with the rows of `previous` (a results file's JSON) whose case res did not measure,
    in the file's order (res's rows replace those of the same case in place; new cases follow).
    Every row carries run_date, the date of the run that measured it; meta["runs"] holds each of
    those runs' date, torch, copy bandwidth and matmul rate. Without previous: res as it is."""
    if previous is None:
        return res
    prev_meta = {k: v for k, v in previous.items() if k != "rows"}
    runs = dict(prev_meta.get("runs") or {prev_meta["date"]: _run_meta(prev_meta)})
    runs[res.meta["date"]] = _run_meta(res.meta)
    new = {_case_key(r): {**r, "run_date": res.meta["date"]} for r in res.rows}
    rows = []
    for r in previous["rows"]:
        key = _case_key(r)
        rows.append(new.pop(key) if key in new else {"run_date": prev_meta["date"], **r})
    rows += list(new.values())
    merged = copy.copy(res)
    merged.meta = {**res.meta, "runs": {d: runs[d] for d in sorted({r["run_date"] for r in rows})}}
    merged.rows = rows
    return merged


def _run_meta(meta: dict) -> dict:
    return {k: meta.get(k) for k in ("torch", "device_name", "copy_gbps", "matmul_tflops")}


def _case_key(row: dict) -> str:
    return json.dumps(row["case"], sort_keys=True)


# ------------------------------------------------------------------------------------------------
# markdown
# ------------------------------------------------------------------------------------------------

def _fmt(x, p=3) -> str:
    return "-" if x is None else (f"{x:.{p}f}" if isinstance(x, float) else str(x))


def _table(res: Results, keep: Callable[[dict], bool], header, cells):
    """Markdown table of the measured rows whose case passes keep (failed cases are listed in
    their own section)."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cells(r["case"], r)) + " |" for r in res.rows
            if "error" not in r and keep(r["case"])]
    return out


def _is_decode(c) -> bool:  # failed rows of older runs have no hdim
    return c["kind"] == "decode" and "window" not in c and c.get("hdim", D) == D


def _is_window(c) -> bool:
    return c["kind"] == "decode" and "window" in c


def _is_hdim(c) -> bool:
    return c["kind"] == "decode" and "window" not in c and c.get("hdim", D) != D


def _decode_cells(c, r):
    p, f = r["peers"], _fmt
    return [c["format"], str(c["context"]), str(c["batch"]), f(r["ours_ms"], 4),
            f(r["ours_eager_ms"], 4), f(r["gbps"], 0), f(r["frac_copy"]),
            f(p.get("sdpa_cudnn"), 4), f(p.get("sdpa_flash"), 4), f(r["ratio_cudnn"]),
            f(r["append_ms"], 2)]


def _window_cells(c, r):
    p, f = r["peers"], _fmt
    return [c["format"], str(c["context"]), str(c["batch"]), str(c["window"][0]),
            f(r["ours_ms"], 4), f(r["ours_eager_ms"], 4), f(r["gbps"], 0), f(r["frac_copy"]),
            f(p.get("sdpa_cudnn"), 4), f(r["ratio_cudnn"]), f(r.get("ratio_plain"))]


def _hdim_cells(c, r):
    p, f = r["peers"], _fmt
    return [c["format"], str(c["hdim"]), str(c["context"]), str(c["batch"]),
            f(r["ours_ms"], 4), f(r["gbps"], 0), f(r["frac_copy"]),
            f(p.get("sdpa_cudnn"), 4), f(p.get("sdpa_flash"), 4), f(r["ratio_cudnn"])]


def _tokens(n: int) -> str:
    """32768 -> "32K"; counts that are not whole K as they are."""
    return f"{n // 1024}K" if n % 1024 == 0 and n else str(n)


def _extra_cell(extra: Optional[dict]) -> str:
    """{"32768": bytes, ...} as "32K: 136.0, 128K: 520.0" (MiB)."""
    if not extra:
        return "-"
    return ", ".join(f"{_tokens(int(k))}: {v / 2**20:.1f}"
                     for k, v in sorted(extra.items(), key=lambda kv: int(kv[0])))


def _prefill_cells(c, r):
    f = _fmt
    return [c["format"], str(c["context"]), str(c["chunk"]), f(r["ours_ms"], 2),
            f(r["fwd_ms"], 2), f(r["tflops"], 1), f(r["fwd_tflops"], 1), f(r["frac_fwd"]),
            f(r["one_pass_fwd_ms"], 2), f(r["append_ms"], 2),
            f"{r['max_abs_diff_chunked_vs_one_pass']:.2e}",
            f"{r['max_abs_diff_vs_fwd_on_unquantized']:.2e}", _extra_cell(r.get("extra_bytes"))]


def _mixed_cells(c, r):
    f = _fmt
    return [c["format"], f"{c['decode_rows']} x {c['decode_context']}",
            f"{c['prefill_chunk']} of {c['prefill_context']}", f(r["ours_ms"], 3),
            f(r["separate_ms"], 3), f(r["ratio_separate"]), f(r["decode_ms"], 3),
            f(r["prefill_ms"], 3), f"{r['max_abs_diff_vs_separate']:.2e}"]


def _error_cells(c, r):
    return [c["format"]] + [f"{r[k]:.2e}" for k in ("max_abs_vs_bf16_cache", "rel_vs_bf16_cache",
                                                   "max_abs_vs_fp64", "rel_vs_fp64")]


def _failed(res: Results) -> List[str]:
    """One line per failed case: its case and the error."""
    rows = [r for r in res.rows if "error" in r]
    if not rows:
        return []
    out = ["", "## Failed cases", ""]
    for r in rows:
        case = ", ".join(f"{k} {v}" for k, v in r["case"].items())
        out.append(f"- {case}: `{r['error'][:300]}`")
    return out


def markdown(res: Results) -> str:
    m = res.meta
    modes = {k: v for r in res.rows if r["case"]["kind"] == "decode"
             for k, v in r.get("peer_mode", {}).items()}
    out = [f"# kvcache on {m['device_name']}", "",
           f"torch {m['torch']}, {m['date']}. Copy bandwidth {_fmt(m['copy_gbps'], 1)} GB/s "
           "(read + write bytes of a device copy), measured in the same run. GQA 32/8, hdim 128, "
           "page size 16."]
    if m.get("runs"):
        out += ["", "Rows from several runs (each row's run_date; ratios are within one run): "
                + "; ".join(f"{d}: copy {_fmt(v['copy_gbps'], 1)} GB/s"
                            for d, v in m["runs"].items()) + "."]
    out += ["", "## Decode (one query token per sequence; CUDA-graph time per call)", ""]
    out += _table(res, _is_decode, ["format", "context", "batch", "ours ms", "eager ms",
                                    "GB/s read", "x copy BW", "cuDNN ms (bf16)",
                                    "flash ms (bf16)", "ours / cuDNN", "append ms"],
                  _decode_cells)
    out += ["", f"Peers: {modes} (ratio uses the bf16 cuDNN time of the same context/batch).",
            "", f"## Sliding-window decode (window of {WINDOW} keys vs a plain 4K context; "
            "CUDA-graph time per call)", "",
            "Bytes count the keys the query sees; cuDNN runs on a contiguous copy of them. "
            "x plain: the windowed time over the plain 4K decode's (same batch).", ""]
    out += _table(res, _is_window, ["format", "context", "batch", "window", "ours ms",
                                    "eager ms", "GB/s read", "x copy BW", "cuDNN ms",
                                    "ours / cuDNN", "x plain 4K"], _window_cells)
    out += ["", "## Decode at other head dims (GQA 32/8; CUDA-graph time per call)", ""]
    out += _table(res, _is_hdim, ["format", "hdim", "context", "batch", "ours ms", "GB/s read",
                                  "x copy BW", "cuDNN ms (bf16)", "flash ms (bf16)",
                                  "ours / cuDNN"], _hdim_cells)
    out += ["", "## Chunked prefill (append + attend per chunk; attention time summed)", "",
            "extra MiB: device memory one chunk's call allocates beyond its inputs, outputs "
            "and the pool, at the chunk ending at that context.", ""]
    out += _table(res, lambda c: c["kind"] == "prefill",
                  ["format", "prompt", "chunk", "ours ms", "fwd ms (contiguous, same shapes)",
                   "ours TFLOP/s", "fwd TFLOP/s", "x fwd", "one-pass fwd ms", "append ms",
                   "max diff chunked vs one pass", "max diff vs fwd (unquantized)",
                   "extra MiB"], _prefill_cells)
    out += ["", "## Mixed batch (decode rows and a prefill chunk in one call vs two calls; "
            "eager time)", ""]
    out += _table(res, lambda c: c["kind"] == "mixed",
                  ["format", "decode rows x context", "prefill chunk of context", "ours ms",
                   "separate ms", "ours / separate", "decode call ms", "prefill call ms",
                   "max diff vs separate"], _mixed_cells)
    out += ["", "## Output error of the quantized caches (decode, 32K keys with outlier channels)",
            ""]
    out += _table(res, lambda c: c["kind"] == "error",
                  ["format", "max abs vs bf16 cache", "rel vs bf16 cache", "max abs vs fp64",
                   "rel vs fp64"], _error_cells)
    out += _failed(res)
    return "\n".join(out) + "\n"
