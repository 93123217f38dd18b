"""Before/after A/B of two builds' benchmark results: each case's ratio to its same-run peer.

    python -m longctx.bench.ab --before R/before_1 R/before_2 R/before_3 \\
        --after R/after_1 R/after_2 R/after_3 [--suites rope,attn_fwd,attn_bwd,kvcache] \\
        [--peer SUITE=NAME] [--kinds SUITE=K1,K2] [--one-sided] [--fail-on-missing] \\
        [--out report.md] [--json summary.json]

(`python python/longctx/bench/ab.py ...` works as well: standard library only, no extension.)
Each round folder holds the <suite>.json files of one run of bench/<suite>.py, directly or under
one <gpu>/ subfolder (what `--out` of the bench scripts writes). scripts/gpu_ab.sh runs the
rounds alternately (before, after, before, ...) and then this module.

The criterion: for each case present in every round of both sides (matched by the canonical JSON
of row["case"]), ratio = ours_ms / peer_ms in each round, the median over a side's rounds, and
change = median_after / median_before - 1. A case passes when |change| <= tolerance (with
--one-sided: change <= tolerance, only a slowdown fails), where the tolerance depends on the
median ours_ms of the before side: 10% under 0.1 ms, 5% from 1 ms, and between the two linear
in log10(ms): 10% - 5% x log10(ms / 0.1 ms) (6.5% at 0.5 ms).

Peers (SUITES, overridable per suite): rope compares with "torch_compile", the attention and
KV-cache suites with "sdpa_cudnn". kvcache keeps only its decode rows (case "kind" "decode", which
includes the window and head-dim groups' rows); its prefill and mixed rows have no peer. Cases
missing from some round, or without ours_ms or the peer's time there, are listed, not dropped.
Exit status: 0 all compared cases pass, 1 some fail (or, with --fail-on-missing, some case is
missing), 2 bad input (the message names the argument).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = [
    "AbInputError",
    "CaseResult",
    "Comparison",
    "Missing",
    "Round",
    "SuiteResult",
    "SuiteSpec",
    "SUITES",
    "compare",
    "load_round",
    "main",
    "markdown",
    "summary_json",
    "tolerance",
]


@dataclass(frozen=True)
class SuiteSpec:
    """A suite's file name (<name>.json), the peer its ratio uses and, when set, the case kinds
    kept (rows whose case["kind"] is one of them; None keeps every row)."""
    name: str
    peer: str
    kinds: Optional[Tuple[str, ...]] = None


SUITES: Dict[str, SuiteSpec] = {
    "rope": SuiteSpec("rope", "torch_compile"),
    "attn_fwd": SuiteSpec("attn_fwd", "sdpa_cudnn"),
    "attn_bwd": SuiteSpec("attn_bwd", "sdpa_cudnn"),
    "kvcache": SuiteSpec("kvcache", "sdpa_cudnn", kinds=("decode",)),
}

# The tolerance: TOL_SHORT under SHORT_MS, TOL_LONG from LONG_MS, linear in log10(ms) between.
SHORT_MS, TOL_SHORT = 0.1, 0.10
LONG_MS, TOL_LONG = 1.0, 0.05


def tolerance(ours_ms: float) -> float:
    """The allowed relative change of the ratio for a case whose before-side time is ours_ms."""
    if ours_ms < SHORT_MS:
        return TOL_SHORT
    if ours_ms >= LONG_MS:
        return TOL_LONG
    t = math.log10(ours_ms / SHORT_MS) / math.log10(LONG_MS / SHORT_MS)
    return TOL_SHORT + (TOL_LONG - TOL_SHORT) * t


class AbInputError(ValueError):
    """Bad input; `argument` names the command-line argument (or parameter) it came from."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument}: {message}")
        self.argument = argument


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------

@dataclass
class Round:
    """One run's results: label ("before_1"), folder, and per suite its file's JSON (None where
    the folder has no <suite>.json) and path."""
    label: str
    folder: Path
    data: Dict[str, Optional[dict]] = field(default_factory=dict)
    paths: Dict[str, Path] = field(default_factory=dict)


def find_suite_file(folder: Path, suite: str, argument: str = "folder") -> Optional[Path]:
    """<folder>/<suite>.json, else <folder>/<gpu>/<suite>.json of its one <gpu>/ subfolder that
    has it; None where neither exists; AbInputError when several <gpu>/ subfolders have it."""
    direct = folder / f"{suite}.json"
    if direct.is_file():
        return direct
    found = sorted(p for p in folder.glob(f"*/{suite}.json") if p.is_file())
    if len(found) > 1:
        raise AbInputError(argument, f"{folder} has {suite}.json under several GPU subfolders "
                           f"({', '.join(p.parent.name for p in found)}); pass the subfolder")
    return found[0] if found else None


def _load_json(path: Path, argument: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AbInputError(argument, f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise AbInputError(argument, f"{path}: no \"rows\" list (not a bench results file)")
    for i, r in enumerate(data["rows"]):
        if not isinstance(r, dict) or not isinstance(r.get("case"), dict):
            raise AbInputError(argument, f"{path}: row {i} has no \"case\" object")
    return data


def load_round(folder: Path | str, suites: Sequence[str], label: str,
               argument: str = "folder") -> Round:
    """Reads the suites' result files of one round folder (see find_suite_file)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AbInputError(argument, f"{folder}: no such folder")
    rnd = Round(label, folder)
    for s in suites:
        path = find_suite_file(folder, s, argument)
        rnd.data[s] = None if path is None else _load_json(path, argument)
        if path is not None:
            rnd.paths[s] = path
    return rnd


def _check_not_empty(rnd: Round, argument: str) -> None:
    if all(v is None for v in rnd.data.values()):
        raise AbInputError(argument, f"{rnd.folder}: none of "
                           f"{', '.join(f'{s}.json' for s in rnd.data)} in it, directly or "
                           "under one <gpu>/ subfolder")


def case_key(case: dict) -> str:
    """The canonical JSON of a row's case: the key cases are matched by."""
    return json.dumps(case, sort_keys=True, separators=(",", ":"))


# ------------------------------------------------------------------------------------------------
# comparing
# ------------------------------------------------------------------------------------------------

@dataclass
class CaseResult:
    case: dict
    before_ratios: List[float]
    after_ratios: List[float]
    before_ms: float          # median ours_ms of the before side
    after_ms: float           # median ours_ms of the after side
    ratio_before: float       # median of before_ratios
    ratio_after: float
    change: float             # ratio_after / ratio_before - 1
    tolerance: float
    passed: bool

    @property
    def excess(self) -> float:
        """|change| / tolerance: above 1 fails (the worst case has the largest)."""
        return abs(self.change) / self.tolerance


@dataclass
class Missing:
    """A case not comparable: absent holds "<round>: <why>" for each round that lacks it."""
    case: dict
    absent: List[str]


@dataclass
class SuiteResult:
    spec: SuiteSpec
    cases: List[CaseResult]
    missing: List[Missing]
    files: Dict[str, str]     # round label -> results file (rounds that have one)
    note: str = ""            # e.g. "no rope.json in any round"

    @property
    def failed(self) -> List[CaseResult]:
        return [c for c in self.cases if not c.passed]


def _usable(row: dict, peer: str) -> Tuple[Optional[Tuple[float, float]], str]:
    """(ours_ms, peer_ms) of a row, or None and why not."""
    ours = row.get("ours_ms")
    peer_ms = (row.get("peers") or {}).get(peer)
    if not isinstance(ours, (int, float)) or not ours > 0:
        return None, f"no ours_ms ({ours!r})"
    if not isinstance(peer_ms, (int, float)) or not peer_ms > 0:
        return None, f"no {peer} time"
    return (float(ours), float(peer_ms)), ""


def _rows_by_case(rnd: Round, spec: SuiteSpec, argument: str) -> Optional[Dict[str, dict]]:
    data = rnd.data.get(spec.name)
    if data is None:
        return None
    out: Dict[str, dict] = {}
    for r in data["rows"]:
        if spec.kinds is not None and r["case"].get("kind") not in spec.kinds:
            continue
        k = case_key(r["case"])
        if k in out:
            raise AbInputError(argument, f"{rnd.paths[spec.name]}: case {k} appears twice")
        out[k] = r
    return out


def compare_suite(spec: SuiteSpec, before: Sequence[Round], after: Sequence[Round],
                  one_sided: bool = False) -> SuiteResult:
    """The suite's cases compared over the rounds (see the module docstring)."""
    rounds = [*before, *after]
    arg = {id(r): "--before" if i < len(before) else "--after" for i, r in enumerate(rounds)}
    tables = [_rows_by_case(r, spec, arg[id(r)]) for r in rounds]
    files = {r.label: str(r.paths[spec.name]) for r in rounds if spec.name in r.paths}
    if all(t is None for t in tables):
        return SuiteResult(spec, [], [], files, note=f"no {spec.name}.json in any round")
    order: Dict[str, dict] = {}   # every case seen, in first-seen order
    for t in tables:
        for k, r in (t or {}).items():
            order.setdefault(k, r["case"])
    cases, missing = [], []
    for k, case in order.items():
        vals: List[Tuple[float, float]] = []
        absent = []
        for rnd, t in zip(rounds, tables):
            if t is None:
                absent.append(f"{rnd.label}: no {spec.name}.json")
            elif k not in t:
                absent.append(f"{rnd.label}: no row")
            else:
                v, why = _usable(t[k], spec.peer)
                if v is None:
                    absent.append(f"{rnd.label}: {why}")
                else:
                    vals.append(v)
        if absent:
            missing.append(Missing(case, absent))
            continue
        b, a = vals[:len(before)], vals[len(before):]
        b_ratios = [o / p for o, p in b]
        a_ratios = [o / p for o, p in a]
        rb, ra = statistics.median(b_ratios), statistics.median(a_ratios)
        b_ms = statistics.median(o for o, _ in b)
        tol = tolerance(b_ms)
        change = ra / rb - 1.0
        ok = change <= tol if one_sided else abs(change) <= tol
        cases.append(CaseResult(case, b_ratios, a_ratios, b_ms, statistics.median(o for o, _ in a),
                                rb, ra, change, tol, ok))
    return SuiteResult(spec, cases, missing, files)


@dataclass
class Comparison:
    before: List[Round]
    after: List[Round]
    suites: List[SuiteResult]
    one_sided: bool
    warnings: List[str]

    @property
    def compared(self) -> int:
        return sum(len(s.cases) for s in self.suites)

    @property
    def failed(self) -> List[Tuple[str, CaseResult]]:
        return [(s.spec.name, c) for s in self.suites for c in s.failed]

    @property
    def n_missing(self) -> int:
        return sum(len(s.missing) for s in self.suites)

    @property
    def worst(self) -> Optional[Tuple[str, CaseResult]]:
        allc = [(s.spec.name, c) for s in self.suites for c in s.cases]
        return max(allc, key=lambda sc: sc[1].excess) if allc else None


def resolve_specs(suites: Sequence[str], peers: Optional[Dict[str, str]] = None,
                  kinds: Optional[Dict[str, Optional[Tuple[str, ...]]]] = None) -> List[SuiteSpec]:
    """SuiteSpecs of the named suites: SUITES' defaults, with peers / kinds overriding them (a
    suite outside SUITES needs its peer)."""
    peers, kinds = peers or {}, kinds or {}
    for what, d in (("--peer", peers), ("--kinds", kinds)):
        extra = sorted(set(d) - set(suites))
        if extra:
            raise AbInputError(what, f"suite {extra[0]!r} is not among --suites")
    specs = []
    for s in suites:
        base = SUITES.get(s)
        if base is None and s not in peers:
            raise AbInputError("--suites", f"unknown suite {s!r} (known: {', '.join(SUITES)}); "
                               f"pass --peer {s}=NAME to compare it")
        base = base or SuiteSpec(s, peers[s])
        specs.append(SuiteSpec(s, peers.get(s, base.peer), kinds.get(s, base.kinds)))
    return specs


def compare(before_dirs: Sequence[Path | str], after_dirs: Sequence[Path | str],
            specs: Optional[Sequence[SuiteSpec]] = None, one_sided: bool = False,
            explicit_suites: bool = False) -> Comparison:
    """Loads the round folders and compares every suite. explicit_suites: a suite found in no
    round is bad input (else it is reported as absent)."""
    specs = list(specs if specs is not None else SUITES.values())
    names = [s.name for s in specs]
    if not before_dirs:
        raise AbInputError("--before", "no round folder given")
    if not after_dirs:
        raise AbInputError("--after", "no round folder given")
    before = [load_round(d, names, f"before_{i + 1}", "--before")
              for i, d in enumerate(before_dirs)]
    after = [load_round(d, names, f"after_{i + 1}", "--after") for i, d in enumerate(after_dirs)]
    results = [compare_suite(s, before, after, one_sided) for s in specs]
    if explicit_suites:
        for r in results:
            if r.note:
                raise AbInputError("--suites", f"{r.note} (rounds: "
                                   f"{', '.join(str(x.folder) for x in [*before, *after])})")
    for side, rnds in (("--before", before), ("--after", after)):
        for r in rnds:
            _check_not_empty(r, side)
    warnings = []
    if len(before) < 3 or len(after) < 3:
        warnings.append(f"{len(before)} before and {len(after)} after rounds: the criterion asks "
                        "for the median of 3 alternating runs each")
    gpus = sorted({str(d.get("gpu")) for r in [*before, *after] for d in r.data.values() if d})
    if len(gpus) > 1:
        warnings.append(f"results from different GPUs ({', '.join(gpus)}): ratios are not "
                        "comparable across GPUs")
    return Comparison(before, after, results, one_sided, warnings)


# ------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------

def case_label(case: dict) -> str:
    """Short, readable: "hdim=64 seqlen=1024 causal=True window=-1,0"; long lists by length."""
    parts = []
    for k, v in case.items():
        if isinstance(v, list):
            v = ",".join(map(str, v)) if len(v) <= 3 else f"<{len(v)} values>"
        parts.append(f"{k}={v}")
    return " ".join(parts)


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def _ms(x: float) -> str:
    return f"{x:.4f}" if x < 1 else f"{x:.3f}"


def summary_line(cmp: Comparison) -> str:
    failed = len(cmp.failed)
    line = f"A/B: {cmp.compared} cases compared, {failed} failed"
    w = cmp.worst
    if w is not None:
        s, c = w
        line += (f", worst {s} [{case_label(c.case)}] {_pct(c.change)} "
                 f"(tolerance {100 * c.tolerance:.1f}%)")
    line += f", {cmp.n_missing} missing"
    return line


def markdown(cmp: Comparison) -> str:
    """The report: criterion, rounds, a table per suite, the missing cases, the summary line."""
    rule = "change <= tol (slowdowns only)" if cmp.one_sided else "|change| <= tol"
    out = ["# A/B: ratio to the same-run peer, after vs before", "",
           f"Per round ratio = ours_ms / peer_ms; median over rounds per side; change = median "
           f"after / median before - 1; pass when {rule}, tol from before's median ours_ms: "
           f"{100 * TOL_SHORT:.0f}% under {SHORT_MS} ms, {100 * TOL_LONG:.0f}% from {LONG_MS} ms, "
           "linear in log10(ms) between.", ""]
    for r in [*cmp.before, *cmp.after]:
        out.append(f"- {r.label}: {r.folder}")
    out += [f"- warning: {w}" for w in cmp.warnings]
    for s in cmp.suites:
        kinds = f", case kinds {'/'.join(s.spec.kinds)}" if s.spec.kinds else ""
        out += ["", f"## {s.spec.name} (peer {s.spec.peer}{kinds})", ""]
        if s.note:
            out.append(f"Not compared: {s.note}.")
            continue
        out.append(f"{len(s.cases)} compared, {len(s.failed)} failed, {len(s.missing)} missing.")
        if s.cases:
            out += ["", "| case | before ms | ratios before | ratios after | median before "
                    "| median after | change | tol | verdict |", "|" + "---|" * 9]
            for c in s.cases:
                out.append(
                    f"| {case_label(c.case)} | {_ms(c.before_ms)} "
                    f"| {' '.join(f'{x:.3f}' for x in c.before_ratios)} "
                    f"| {' '.join(f'{x:.3f}' for x in c.after_ratios)} "
                    f"| {c.ratio_before:.3f} | {c.ratio_after:.3f} | {_pct(c.change)} "
                    f"| {100 * c.tolerance:.1f}% | {'pass' if c.passed else '**FAIL**'} |")
        if s.missing:
            out += ["", "Missing (not compared):", ""]
            out += [f"- {case_label(m.case)}: {'; '.join(m.absent)}" for m in s.missing]
    out += ["", summary_line(cmp)]
    return "\n".join(out) + "\n"


def summary_json(cmp: Comparison) -> Dict[str, Any]:
    """The comparison as JSON-ready data (--json)."""
    w = cmp.worst
    return {
        "criterion": {"short_ms": SHORT_MS, "tol_short": TOL_SHORT, "long_ms": LONG_MS,
                      "tol_long": TOL_LONG, "between": "linear in log10(ms)",
                      "one_sided": cmp.one_sided},
        "before": [str(r.folder) for r in cmp.before],
        "after": [str(r.folder) for r in cmp.after],
        "warnings": cmp.warnings,
        "suites": {s.spec.name: {
            "peer": s.spec.peer,
            "kinds": list(s.spec.kinds) if s.spec.kinds else None,
            "files": s.files,
            "note": s.note or None,
            "cases": [{"case": c.case, "before_ratios": c.before_ratios,
                       "after_ratios": c.after_ratios, "before_ms": c.before_ms,
                       "after_ms": c.after_ms, "ratio_before": c.ratio_before,
                       "ratio_after": c.ratio_after, "change": c.change,
                       "tolerance": c.tolerance, "passed": c.passed} for c in s.cases],
            "missing": [{"case": m.case, "absent": m.absent} for m in s.missing],
        } for s in cmp.suites},
        "compared": cmp.compared,
        "failed": len(cmp.failed),
        "missing": cmp.n_missing,
        "worst": None if w is None else {"suite": w[0], "case": w[1].case, "change": w[1].change,
                                         "tolerance": w[1].tolerance},
        "passed": not cmp.failed,
        "summary": summary_line(cmp),
    }


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------

def _pairs(items: Sequence[str], argument: str) -> Dict[str, str]:
    out = {}
    for it in items:
        name, sep, val = it.partition("=")
        if not sep or not name:
            raise AbInputError(argument, f"{it!r} is not SUITE=VALUE")
        out[name] = val
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit status (0 pass, 1 fail, 2 bad input)."""
    ap = argparse.ArgumentParser(
        prog="python -m longctx.bench.ab",
        description="Before/after A/B of bench results: each case's ratio to its same-run peer, "
                    "median over rounds, within 5% (>= 1 ms) to 10% (< 0.1 ms).")
    ap.add_argument("--before", nargs="+", required=True, metavar="DIR",
                    help="round folders of the base tree (<suite>.json, or <gpu>/<suite>.json)")
    ap.add_argument("--after", nargs="+", required=True, metavar="DIR",
                    help="round folders of the changed tree")
    ap.add_argument("--suites", default=None,
                    help=f"comma-separated (default {','.join(SUITES)}; with the default, a suite "
                         "found in no round is skipped, a named one is an error)")
    ap.add_argument("--peer", action="append", default=[], metavar="SUITE=NAME",
                    help="the peer a suite's ratio uses (defaults: " + ", ".join(
                        f"{s.name}={s.peer}" for s in SUITES.values()) + ")")
    ap.add_argument("--kinds", action="append", default=[], metavar="SUITE=K1,K2",
                    help="keep only rows whose case kind is one of these (default kvcache=decode; "
                         "SUITE= keeps every row)")
    ap.add_argument("--one-sided", action="store_true",
                    help="only a slowdown beyond the tolerance fails")
    ap.add_argument("--fail-on-missing", action="store_true",
                    help="exit 1 when some case is missing from some round")
    ap.add_argument("--out", default=None, help="write the markdown report here too")
    ap.add_argument("--json", default=None, metavar="PATH", help="write a JSON summary here")
    args = ap.parse_args(argv)
    try:
        names = list(SUITES) if args.suites is None else [
            s.strip() for s in args.suites.split(",") if s.strip()]
        if not names:
            raise AbInputError("--suites", "no suite named")
        kinds = {k: (tuple(x for x in v.split(",") if x) or None)
                 for k, v in _pairs(args.kinds, "--kinds").items()}
        specs = resolve_specs(names, _pairs(args.peer, "--peer"), kinds)
        cmp = compare(args.before, args.after, specs, args.one_sided,
                      explicit_suites=args.suites is not None)
    except AbInputError as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    report = markdown(cmp)
    print(report, end="")
    for dest, text, arg in ((args.out, report, "--out"),
                            (args.json, json.dumps(summary_json(cmp), indent=1) + "\n", "--json")):
        if dest:
            try:
                Path(dest).parent.mkdir(parents=True, exist_ok=True)
                Path(dest).write_text(text)
            except OSError as e:
                print(f"{ap.prog}: error: {arg}: cannot write {dest} ({e})", file=sys.stderr)
                return 2
    if cmp.failed or (args.fail_on_missing and cmp.n_missing):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
