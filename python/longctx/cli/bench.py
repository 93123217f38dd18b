"""`longctx bench`: run the benchmark suites, print longctx against its peers, write the results
(JSON and a markdown table, format of docs/design.md) and a plot per benchmark.

On a machine with a CUDA GPU the GPU suites run. They come from the harness package through a
small registry: the module `longctx.bench.suites` exposes

    SUITES: Mapping[str, Callable[..., results]]   # name -> benchmark function

and each function is called as fn(quick=bool[, progress=callable(label)]) and returns one
results dict in the docs/design.md format ({"gpu", "torch", "date", ..., "rows": [...]}), an
object with .as_dict() (longctx.bench.Results), or a list of them. Without a GPU, or without that
module, the CPU correctness smoke test of longctx.cli.bench_cpu runs instead (outputs checked
against a float64 reference; times shown, but no speedup or rate: toy sizes on a CPU measure
no performance), and the GPU cases skipped are listed, with why. The --out folder is checked for
writing before anything runs.

Plots (TFLOP/s or GB/s against sequence length, ours and every peer) need matplotlib, an optional
dependency; without it the plot is skipped and the command says so.
"""
from __future__ import annotations

import importlib
import inspect
import json
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from . import UserError

__all__ = ["run_bench", "load_gpu_suites", "format_table", "format_markdown", "write_results",
           "plot_results", "check_out_dir", "add_parser", "run"]


class Progress:
    """A text progress line on stderr ("[3/8] label"); tqdm's bar where tqdm is installed."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, file=sys.stderr, leave=False)
            except ImportError:
                pass
        self._tty = sys.stderr.isatty()

    def __call__(self, label: str, advance: bool = True) -> None:
        """Shows `label`; advance=False shows a sub-step of the current item."""
        self.done += 1 if advance else 0
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description(label)
            self._bar.update(1 if advance else 0)
        elif self._tty:
            sys.stderr.write(f"\r\033[K[{self.done}/{self.total}] {label}")
            sys.stderr.flush()
        else:
            print(f"[{self.done}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self._tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def load_gpu_suites() -> Tuple[Optional[Mapping[str, Callable]], str]:
    """(the registered GPU suites, "") or (None, why not)."""
    try:
        mod = importlib.import_module("longctx.bench.suites")
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name and e.name.startswith("longctx.bench"):
            return None, "longctx.bench.suites is not installed (no GPU suites in this build)"
        return None, f"longctx.bench.suites could not be imported: {e}"
    suites = getattr(mod, "SUITES", None)
    if not isinstance(suites, Mapping) or not suites:
        return None, "longctx.bench.suites registers no suite (SUITES is missing or empty)"
    return suites, ""


def _as_result_dicts(name: str, out: Any) -> List[Dict[str, Any]]:
    items = out if isinstance(out, (list, tuple)) else [out]
    dicts = []
    for item in items:
        d = dict(item.as_dict()) if hasattr(item, "as_dict") else dict(item)
        d.setdefault("name", getattr(item, "name", name))
        dicts.append(d)
    return dicts


def run_gpu_suites(suites: Mapping[str, Callable], quick: bool, progress: Progress
                   ) -> Tuple[List[Dict[str, Any]], List[str]]:
    results, failed = [], []
    for name, fn in suites.items():
        kwargs: Dict[str, Any] = {"quick": quick}
        params = inspect.signature(fn).parameters
        if "progress" in params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
            kwargs["progress"] = lambda label, n=name: progress(f"{n}: {label}", advance=False)
        progress(name)
        try:
            results += _as_result_dicts(name, fn(**kwargs))
        except Exception as e:  # one failing suite must not hide the others' results
            failed.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return results, failed


# -------------------------------------------------------------------------------- reporting


def _metric(rows: List[Dict[str, Any]]) -> Tuple[Optional[str], str]:
    if any("tflops" in r for r in rows):
        return "tflops", "TFLOP/s"
    if any("gbps" in r for r in rows):
        return "gbps", "GB/s"
    return None, ""


def _trivial_window(window, causal: bool) -> bool:
    """(-1, -1), or (-1, 0) with causal (the causal mask itself): no window to show."""
    w = list(window)
    return w == [-1, -1] or (causal and w == [-1, 0])


def _case_label(case: Mapping[str, Any], skip: Tuple[str, ...] = ()) -> str:
    parts = []
    for k, v in case.items():
        if k in skip or (k == "window" and _trivial_window(v, case.get("causal", False))):
            continue
        parts.append(f"{k}={v}" if not isinstance(v, bool) else (k if v else f"no-{k}"))
    return " ".join(parts)


def _common_case_keys(rows: List[Dict[str, Any]]) -> Tuple[str, ...]:
    """Case keys with one value over every row (shown once, in the title)."""
    if len(rows) < 2:
        return ()
    first = rows[0].get("case", {})
    return tuple(k for k, v in first.items()
                 if all(r.get("case", {}).get(k, object()) == v for r in rows[1:]))


def smoke_table_cells(rows: List[Dict[str, Any]], common: Tuple[str, ...]) -> List[List[str]]:
    """The rows of a correctness smoke test (the CPU run): case, the check against the float64
    reference, then the times (no rate, no speedup: toy sizes on a shared CPU measure neither)."""
    peers = sorted({p for r in rows for p in r.get("peers", {})})
    lines = [["case", "max error", "tolerance", "check", "ours ms"] + [f"{p} ms" for p in peers]]
    for r in rows:
        ms = [r.get("ours_ms")] + [r.get("peers", {}).get(p) for p in peers]
        lines.append([_case_label(r.get("case", {}), common) or "-",
                      f"{r['max_abs_err']:.2e}" if r.get("max_abs_err") is not None else "-",
                      f"{r['tolerance']:.2e}" if r.get("tolerance") is not None else "-",
                      "ok" if r.get("ok") else "FAILED"]
                     + [f"{t:.3f}" if t else "-" for t in ms])
    return lines


def table_cells(result: Mapping[str, Any]) -> Tuple[str, List[List[str]]]:
    """(title, rows of cells with a header row first): case, our time, each peer's time, our
    rate, speedup over each peer; for a smoke test, smoke_table_cells."""
    rows = result.get("rows", [])
    if result.get("smoke_test"):
        common = _common_case_keys(rows)
        first = rows[0].get("case", {}) if rows else {}
        shared = _case_label({k: first[k] for k in common})
        return (f"{result.get('name', '?')} on cpu: correctness smoke test"
                + (f" ({shared})" if shared else ""), smoke_table_cells(rows, common))
    peers = sorted({p for r in rows for p in r.get("peers", {})})
    key, unit = _metric(rows)
    common = _common_case_keys(rows)
    header = ["case", "ours ms"] + [f"{p} ms" for p in peers]
    header += ([f"ours {unit}"] if key else []) + [f"vs {p}" for p in peers]
    lines = [header]
    for r in rows:
        ours = r.get("ours_ms")
        cells = [_case_label(r.get("case", {}), common) or "-", f"{ours:.3f}" if ours else "-"]
        for p in peers:
            ms = r.get("peers", {}).get(p)
            cells.append(f"{ms:.3f}" if ms else "-")
        if key:
            cells.append(f"{r[key]:.2f}" if r.get(key) is not None else "-")
        for p in peers:
            ms = r.get("peers", {}).get(p)
            cells.append(f"{ms / ours:.2f}x" if ms and ours else "-")
        lines.append(cells)
    first = rows[0].get("case", {}) if rows else {}
    shared = _case_label({k: first[k] for k in common})
    title = (f"{result.get('name', '?')} on {result.get('device_name', result.get('gpu', '?'))}"
             + (f" ({shared})" if shared else ""))
    return title, lines


def format_table(result: Mapping[str, Any]) -> str:
    """The results as an aligned plain-text table under a title line."""
    title, lines = table_cells(result)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = [title]
    for i, line in enumerate(lines):
        out.append("  " + "  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                                    for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_markdown(result: Mapping[str, Any]) -> str:
    title, lines = table_cells(result)
    note = f" {result['note']}" if result.get("note") else ""
    md = [f"# {title}", "", f"torch {result.get('torch')}, {result.get('date')}.{note}", "",
          "| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    md += ["| " + " | ".join(cells) + " |" for cells in lines[1:]]
    return "\n".join(md) + "\n"


def write_results(result: Mapping[str, Any], root: Path) -> Path:
    """<root>/<gpu>/<name>.json and .md (the table)."""
    out = Path(root) / str(result.get("gpu", "unknown"))
    out.mkdir(parents=True, exist_ok=True)
    name = result.get("name", "bench")
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text(format_markdown(result))
    return path


def plot_results(result: Mapping[str, Any], root: Path) -> Tuple[Optional[Path], str]:
    """<root>/<gpu>/<name>.png: rate against sequence length, one line per (variant, impl).
    Returns (path, "") or (None, why it was skipped)."""
    rows = result.get("rows", [])
    key, unit = _metric(rows)
    if result.get("smoke_test"):
        return None, "a correctness smoke test has no rate"
    if key is None or not any("seqlen" in r.get("case", {}) for r in rows):
        return None, "no rate or no seqlen in the rows"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "matplotlib is not installed (pip install matplotlib)"
    # batch follows seqlen in the benchmarks (batch * seqlen fixed): not a series of its own
    common = _common_case_keys(rows) + ("seqlen", "batch")
    series: Dict[str, List[Tuple[int, float]]] = {}
    for r in rows:
        case = r.get("case", {})
        seqlen = case.get("seqlen")
        ours, rate = r.get("ours_ms"), r.get(key)
        if seqlen is None or not ours or rate is None:
            continue
        variant = _case_label(case, common)
        series.setdefault(f"longctx {variant}".strip(), []).append((seqlen, rate))
        for peer, ms in r.get("peers", {}).items():
            if ms:  # same work, so the peer's rate scales with the time ratio
                series.setdefault(f"{peer} {variant}".strip(), []).append(
                    (seqlen, rate * ours / ms))
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                linestyle="-" if label.startswith("longctx") else "--", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel(unit)
    ax.set_title(table_cells(result)[0], fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    out = Path(root) / str(result.get("gpu", "unknown")) / f"{result.get('name', 'bench')}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out, ""


# ---------------------------------------------------------------------------------- command


def check_out_dir(out: Path) -> None:
    """Raises UserError unless files can be written under `out` (created when missing): checked
    before any benchmark runs, so that a bad --out loses no results."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".longctx-write-check-"):
            pass
    except OSError as e:
        raise UserError(f"--out {out}: cannot write results there: {e.strerror or e}") from None


def run_bench(quick: bool, out_dir: Path, plot: bool = True, as_json: bool = False,
              show_progress: bool = True) -> int:
    """The `longctx bench` command; returns the exit code."""
    check_out_dir(out_dir)
    import torch

    from . import bench_cpu

    has_gpu = torch.cuda.is_available()
    suites, why_no_suites = load_gpu_suites()
    skipped: List[str] = []
    failed: List[str] = []
    if has_gpu and suites:
        progress = Progress(len(suites), enabled=show_progress and not as_json)
        results, failed = run_gpu_suites(suites, quick, progress)
        mode = f"GPU suites on {torch.cuda.get_device_name()}"
    else:
        why = why_no_suites if has_gpu else "no CUDA GPU found"
        skipped.append(f"GPU benchmarks: {why}")
        cases, _ = bench_cpu.cpu_cases(quick)
        progress = Progress(len(cases), enabled=show_progress and not as_json)
        results, cpu_skipped = bench_cpu.run_cpu_benchmarks(quick, progress)
        skipped += cpu_skipped
        failed += bench_cpu.failed_checks(results)
        mode = f"CPU correctness smoke test, {torch.get_num_threads()} threads"
    progress.close()

    written, plots, plot_notes = [], [], []
    for result in results:
        written.append(str(write_results(result, out_dir)))
        if plot and not result.get("smoke_test"):
            path, why = plot_results(result, out_dir)
            if path:
                plots.append(str(path))
            else:
                plot_notes.append(f"{result.get('name')}: plot skipped: {why}")
    if as_json:
        print(json.dumps({"mode": mode, "results": results, "skipped": skipped, "failed": failed,
                          "files": written + plots, "plot_notes": plot_notes}, indent=1))
    else:
        print(f"longctx bench: {mode}{' (quick)' if quick else ''}")
        if any(r.get("smoke_test") for r in results):
            print(textwrap.fill(bench_cpu.SMOKE_TEST_NOTE, width=98, initial_indent="  ",
                                subsequent_indent="  "))
        for result in results:
            print()
            print(format_table(result))
        print()
        for s in skipped:
            print(f"skipped: {s}")
        for f in failed:
            print(f"FAILED: {f}")
        for path in written + plots:
            print(f"wrote {path}")
        for note in plot_notes:
            print(note)
    return 1 if failed else 0


def add_parser(sub):
    bench = sub.add_parser("bench", help="benchmark longctx against its peers")
    bench.add_argument("--quick", action="store_true", help="few, small cases (seconds)")
    bench.add_argument("--out", default="bench/results",
                       help="results folder: <out>/<gpu>/<name>.json, .md, .png "
                            "(default bench/results)")
    bench.add_argument("--no-plot", action="store_true", help="write no PNG plot")
    bench.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    return bench


def run(args) -> int:
    return run_bench(quick=args.quick, out_dir=Path(args.out), plot=not args.no_plot,
                     as_json=args.json, show_progress=not args.no_progress)
