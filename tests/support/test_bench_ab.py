"""longctx.bench.ab, the before/after A/B of bench results, on small synthetic round folders
(CPU only): the tolerance rule, medians over rounds, per-suite peers, missing cases, the <gpu>/
subfolder layout, exit statuses and the committed layout_ab example. The module is loaded from
its file: it uses only the standard library and needs no compiled extension."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AB_PY = ROOT / "python" / "longctx" / "bench" / "ab.py"
EXAMPLE = ROOT / "bench" / "results" / "h200" / "layout_ab"


def _load_ab():
    spec = importlib.util.spec_from_file_location("longctx_bench_ab_under_test", AB_PY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


ab = _load_ab()

ATTN = {"hdim": 128, "seqlen": 4096, "batch": 1, "heads": 16, "heads_kv": 16, "causal": True,
        "window": [-1, 0], "dtype": "bf16"}


def case(**kw):
    return {**ATTN, **kw}


def row(c, ours, peer, peer_name="sdpa_cudnn", **peers):
    return {"case": c, "ours_ms": ours, "peers": {peer_name: peer, **peers}}


def write(folder: Path, suite: str, rows, gpu=None) -> Path:
    """One round's <suite>.json, directly in folder or under folder/<gpu>/."""
    d = folder / gpu if gpu else folder
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{suite}.json"
    p.write_text(json.dumps({"gpu": gpu or "h100", "device_name": "test", "torch": "x",
                             "date": "2026-01-01", "rows": rows}))
    return p


def rounds(tmp_path: Path, suite: str, before, after, gpu=None):
    """before/after: per round, a list of rows; returns the two lists of folders."""
    b = [tmp_path / f"before_{i + 1}" for i in range(len(before))]
    a = [tmp_path / f"after_{i + 1}" for i in range(len(after))]
    for folder, rows in zip([*b, *a], [*before, *after]):
        write(folder, suite, rows, gpu)
    return b, a


def one_case(tmp_path, ms, change, n=3, suite="attn_fwd"):
    """A single case: before ours=ms vs peer=ms (ratio 1), after's ratio 1 + change."""
    c = case()
    b, a = rounds(tmp_path, suite, [[row(c, ms, ms)]] * n, [[row(c, ms * (1 + change), ms)]] * n)
    cmp = ab.compare(b, a, ab.resolve_specs([suite]))
    (s,) = cmp.suites
    assert len(s.cases) == 1 and not s.missing
    return s.cases[0]


def run_main(argv, capsys):
    rc = ab.main([str(x) for x in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ------------------------------------------------------------------------------ tolerance rule

def test_tolerance_rule_values():
    assert ab.tolerance(0.05) == pytest.approx(0.10)
    assert ab.tolerance(0.0999) == pytest.approx(0.10)
    assert ab.tolerance(0.1) == pytest.approx(0.10)
    assert ab.tolerance(0.5) == pytest.approx(0.10 - 0.05 * math.log10(5))  # 6.505%
    assert ab.tolerance(0.5) == pytest.approx(0.06505, abs=1e-5)
    assert ab.tolerance(0.2) == pytest.approx(0.08495, abs=1e-5)
    assert ab.tolerance(0.8) == pytest.approx(0.05485, abs=1e-5)
    assert ab.tolerance(1.0) == pytest.approx(0.05)
    assert ab.tolerance(2.0) == pytest.approx(0.05)
    assert ab.tolerance(500.0) == pytest.approx(0.05)
    ms = [0.01 * 1.3 ** i for i in range(30)]
    tols = [ab.tolerance(m) for m in ms]
    assert all(x >= y for x, y in zip(tols, tols[1:]))  # never grows with the time


@pytest.mark.parametrize("ms,ok,bad", [(0.05, 0.095, 0.105),   # 10%
                                       (0.5, 0.063, 0.067),    # 6.5%
                                       (2.0, 0.048, 0.052)])   # 5%
def test_tolerance_applied_at_50us_500us_2ms(tmp_path, ms, ok, bad):
    for sign in (+1, -1):
        c = one_case(tmp_path / f"ok{sign}", ms, sign * ok)
        assert c.passed, (ms, sign * ok, c.tolerance)
        assert c.tolerance == pytest.approx(ab.tolerance(ms))
        assert c.change == pytest.approx(sign * ok)
        c = one_case(tmp_path / f"bad{sign}", ms, sign * bad)
        assert not c.passed, (ms, sign * bad, c.tolerance)


def test_tolerance_comes_from_the_before_side_time(tmp_path):
    # before 2 ms (5%), after 0.05 ms: a 7% change fails although 0.05 ms alone would allow 10%.
    c = case()
    b, a = rounds(tmp_path, "attn_fwd", [[row(c, 2.0, 2.0)]] * 3, [[row(c, 0.0535, 0.05)]] * 3)
    (r,) = ab.compare(b, a, ab.resolve_specs(["attn_fwd"])).suites[0].cases
    assert r.before_ms == pytest.approx(2.0) and r.after_ms == pytest.approx(0.0535)
    assert r.tolerance == pytest.approx(0.05)
    assert r.change == pytest.approx(0.07)
    assert not r.passed


# ---------------------------------------------------------------- pass / fail, both directions

def test_pass_within_and_fail_beyond_both_directions(tmp_path, capsys):
    cs = [case(seqlen=s) for s in (1024, 2048, 4096)]
    before = [[row(c, 3.0, 3.0) for c in cs]] * 3
    after = [[row(cs[0], 3.09, 3.0), row(cs[1], 3.3, 3.0), row(cs[2], 2.7, 3.0)]] * 3
    b, a = rounds(tmp_path, "attn_fwd", before, after)
    cmp = ab.compare(b, a, ab.resolve_specs(["attn_fwd"]))
    got = {c.case["seqlen"]: (round(c.change, 6), c.passed) for c in cmp.suites[0].cases}
    assert got == {1024: (0.03, True), 2048: (0.1, False), 4096: (-0.1, False)}
    assert cmp.compared == 3 and len(cmp.failed) == 2
    rc, out, _ = run_main(["--before", *b, "--after", *a, "--suites", "attn_fwd"], capsys)
    assert rc == 1
    assert "A/B: 3 cases compared, 2 failed, worst attn_fwd" in out
    assert out.count("**FAIL**") == 2
    # --one-sided: only the slowdown fails
    cmp1 = ab.compare(b, a, ab.resolve_specs(["attn_fwd"]), one_sided=True)
    assert [c.case["seqlen"] for c in cmp1.suites[0].cases if not c.passed] == [2048]


def test_all_pass_exits_0_and_writes_report_and_json(tmp_path, capsys):
    c = case()
    b, a = rounds(tmp_path, "attn_bwd", [[row(c, 4.0, 2.0)]] * 3, [[row(c, 4.1, 2.0)]] * 3)
    rep, js = tmp_path / "r" / "report.md", tmp_path / "s.json"
    rc, out, err = run_main(["--before", *b, "--after", *a, "--out", rep, "--json", js], capsys)
    assert rc == 0, err
    assert rep.read_text() == out
    assert ("| 4.000 | 2.000 2.000 2.000 | 2.050 2.050 2.050 | 2.000 | 2.050 | +2.5% | 5.0% "
            "| pass |") in out
    s = json.loads(js.read_text())
    assert (s["compared"], s["failed"], s["missing"], s["passed"]) == (1, 0, 0, True)
    (cr,) = s["suites"]["attn_bwd"]["cases"]
    assert cr["case"] == c and cr["change"] == pytest.approx(0.025)
    assert cr["before_ratios"] == [2.0] * 3 and cr["tolerance"] == pytest.approx(0.05)
    assert s["worst"]["suite"] == "attn_bwd"
    # suites found in no round are skipped with a note (default --suites), not an error
    assert s["suites"]["rope"]["note"] == "no rope.json in any round"
    assert s["suites"]["rope"]["cases"] == []


# ------------------------------------------------------------------------------- medians of 3

def test_median_of_three_ignores_an_outlier_round(tmp_path):
    c = case()
    before = [[row(c, 2.0, 2.0)], [row(c, 1.6, 2.0)], [row(c, 2.0, 2.02)]]  # 1.0, 0.8, 0.990
    after = [[row(c, 2.0, 2.0)], [row(c, 2.6, 2.0)], [row(c, 1.99, 2.0)]]   # 1.0, 1.3, 0.995
    b, a = rounds(tmp_path, "attn_fwd", before, after)
    (r,) = ab.compare(b, a, ab.resolve_specs(["attn_fwd"])).suites[0].cases
    assert r.before_ratios == pytest.approx([1.0, 0.8, 2.0 / 2.02])
    assert r.after_ratios == pytest.approx([1.0, 1.3, 0.995])
    assert r.ratio_before == pytest.approx(2.0 / 2.02) and r.ratio_after == pytest.approx(1.0)
    assert r.change == pytest.approx(1.0 / (2.0 / 2.02) - 1) and r.passed  # +1%
    assert r.before_ms == pytest.approx(2.0) and r.after_ms == pytest.approx(2.0)
    # the mean would fail it (+18%), as would a comparison against the outlier round alone
    mean_change = (sum(r.after_ratios) / 3) / (sum(r.before_ratios) / 3) - 1
    assert mean_change > 0.15
    (r1,) = ab.compare(b[:1], a[1:2], ab.resolve_specs(["attn_fwd"])).suites[0].cases
    assert not r1.passed and r1.change == pytest.approx(0.3)


def test_ratio_is_to_the_same_run_peer(tmp_path):
    # a round with clocks 20% slower for both ours and the peer: the ratio does not move
    c = case()
    b, a = rounds(tmp_path, "attn_fwd", [[row(c, 2.0, 1.0)]] * 3,
                  [[row(c, 2.4, 1.2)], [row(c, 2.0, 1.0)], [row(c, 2.4, 1.2)]])
    (r,) = ab.compare(b, a, ab.resolve_specs(["attn_fwd"])).suites[0].cases
    assert r.change == pytest.approx(0.0) and r.passed
    assert r.after_ms == pytest.approx(2.4)


# ------------------------------------------------------------------------- peers and case kinds

def test_rope_uses_torch_compile_and_peer_is_overridable(tmp_path, capsys):
    c = {"seqlen": 32768, "layout": "neox"}
    rb = {"case": c, "ours_ms": 0.2, "peers": {"eager": 2.0, "torch_compile": 1.0,
                                                "copy_same_bytes": 0.18}}
    ra = {"case": c, "ours_ms": 0.2, "peers": {"eager": 1.0, "torch_compile": 1.0,
                                                "copy_same_bytes": 0.18}}
    b, a = rounds(tmp_path, "rope", [[rb]] * 3, [[ra]] * 3)
    assert ab.SUITES["rope"].peer == "torch_compile"
    (r,) = ab.compare(b, a, ab.resolve_specs(["rope"])).suites[0].cases
    assert r.ratio_before == pytest.approx(0.2) and r.passed  # eager's change is not looked at
    rc, out, _ = run_main(["--before", *b, "--after", *a, "--suites", "rope", "--peer",
                           "rope=eager"], capsys)
    assert rc == 1 and "## rope (peer eager)" in out and "+100.0%" in out


def test_kvcache_compares_decode_rows_only(tmp_path):
    dec = {"kind": "decode", "format": "bf16", "context": 32768, "batch": 1}
    pre = {"kind": "prefill", "format": "bf16", "context": 131072, "chunk": 8192}
    mixed = {"kind": "mixed", "format": "bf16", "batch": 16}
    rows_b = [row(dec, 0.05, 0.05), {"case": pre, "ours_ms": 237.0, "peers": None},
              {"case": mixed, "ours_ms": 5.8}]
    rows_a = [row(dec, 0.052, 0.05), {"case": pre, "ours_ms": 300.0, "peers": None},
              {"case": mixed, "ours_ms": 9.0}]
    b, a = rounds(tmp_path, "kvcache", [rows_b] * 3, [rows_a] * 3)
    (s,) = ab.compare(b, a, ab.resolve_specs(["kvcache"])).suites
    assert [c.case for c in s.cases] == [dec] and s.cases[0].passed
    assert s.missing == []  # prefill and mixed rows are filtered out, not missing
    # with every kind kept, the peerless rows are listed as missing
    (s2,) = ab.compare(b, a, ab.resolve_specs(["kvcache"], kinds={"kvcache": None})).suites
    assert len(s2.cases) == 1
    assert [m.case["kind"] for m in s2.missing] == ["prefill", "mixed"]
    assert s2.missing[0].absent[0] == "before_1: no sdpa_cudnn time"


# ------------------------------------------------------------------------------ missing cases

def test_missing_cases_are_listed(tmp_path, capsys):
    c1, c2, c3, c4 = (case(seqlen=s) for s in (1024, 2048, 4096, 8192))
    full = [row(c1, 1.0, 1.0), row(c2, 1.0, 1.0), row(c3, 1.0, 1.0)]
    b, a = rounds(tmp_path, "attn_fwd", [full] * 3,
                  [full, [row(c1, 1.0, 1.0), row(c3, 1.0, None), row(c4, 1.0, 1.0)], full])
    cmp = ab.compare(b, a, ab.resolve_specs(["attn_fwd"]))
    (s,) = cmp.suites
    assert [c.case for c in s.cases] == [c1]
    miss = {m.case["seqlen"]: m.absent for m in s.missing}
    assert miss == {2048: ["after_2: no row"],
                    4096: ["after_2: no sdpa_cudnn time"],
                    8192: ["before_1: no row", "before_2: no row", "before_3: no row",
                           "after_1: no row", "after_3: no row"]}
    rc, out, _ = run_main(["--before", *b, "--after", *a, "--suites", "attn_fwd"], capsys)
    assert rc == 0  # missing cases are reported; they fail only with --fail-on-missing
    assert "1 compared, 0 failed, 3 missing." in out
    assert "seqlen=2048" in out and "after_2: no row" in out
    assert out.splitlines()[-1].endswith(", 3 missing")
    rc, _, _ = run_main(["--before", *b, "--after", *a, "--suites", "attn_fwd",
                         "--fail-on-missing"], capsys)
    assert rc == 1


def test_suite_file_missing_from_one_round(tmp_path):
    c = case()
    b, a = rounds(tmp_path, "attn_bwd", [[row(c, 1.0, 1.0)]] * 2, [[row(c, 1.0, 1.0)]] * 2)
    write(a[0], "attn_fwd", [row(c, 1.0, 1.0)])
    for f in (*b, a[1]):
        write(f, "attn_fwd", [row(c, 1.0, 1.0)])
    (a[1] / "attn_bwd.json").unlink()
    cmp = ab.compare(b, a, ab.resolve_specs(["attn_fwd", "attn_bwd"]))
    fwd, bwd = cmp.suites
    assert len(fwd.cases) == 1 and not fwd.missing
    assert bwd.cases == [] and bwd.missing[0].absent == ["after_2: no attn_bwd.json"]
    assert cmp.warnings and "median of 3" in cmp.warnings[0]


# ------------------------------------------------------------------- <gpu>/ subfolder layout

def test_gpu_subfolder_and_direct_layouts_mix(tmp_path):
    c = case()
    b, _ = rounds(tmp_path / "b", "attn_fwd", [[row(c, 1.0, 1.0)]] * 3, [], gpu="h200")
    _, a = rounds(tmp_path / "a", "attn_fwd", [], [[row(c, 1.2, 1.0)]] * 3)
    assert (b[0] / "h200" / "attn_fwd.json").is_file() and (a[0] / "attn_fwd.json").is_file()
    cmp = ab.compare(b, a, ab.resolve_specs(["attn_fwd"]))
    (r,) = cmp.suites[0].cases
    assert r.change == pytest.approx(0.2) and not r.passed
    assert cmp.suites[0].files["before_1"].endswith("h200/attn_fwd.json")
    assert any("different GPUs" in w for w in cmp.warnings)  # h200 vs h100


def test_two_gpu_subfolders_are_ambiguous(tmp_path, capsys):
    c = case()
    b, a = rounds(tmp_path, "attn_fwd", [[row(c, 1.0, 1.0)]], [[row(c, 1.0, 1.0)]], gpu="h100")
    write(a[0], "attn_fwd", [row(c, 1.0, 1.0)], gpu="h200")
    rc, _, err = run_main(["--before", *b, "--after", *a], capsys)
    assert rc == 2
    assert "--after" in err and "several GPU subfolders" in err and "h100, h200" in err


# ------------------------------------------------------------------------------ bad arguments

def _good(tmp_path):
    c = case()
    return rounds(tmp_path, "attn_fwd", [[row(c, 1.0, 1.0)]], [[row(c, 1.0, 1.0)]])


@pytest.mark.parametrize("bad", ["before", "after"])
def test_missing_folder_exits_2_naming_the_argument(tmp_path, capsys, bad):
    b, a = _good(tmp_path)
    nope = tmp_path / "nope"
    argv = ["--before", *(b if bad == "after" else [nope]), "--after", *(a if bad == "before"
                                                                         else [nope])]
    rc, out, err = run_main(argv, capsys)
    assert rc == 2 and out == ""
    assert f"--{bad}: {nope}: no such folder" in err


def test_folder_without_results_exits_2(tmp_path, capsys):
    b, _ = _good(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run_main(["--before", *b, "--after", empty], capsys)
    assert rc == 2 and "--after" in err and "none of rope.json" in err


def test_bad_json_exits_2(tmp_path, capsys):
    b, a = _good(tmp_path)
    (a[0] / "attn_fwd.json").write_text("{not json")
    rc, _, err = run_main(["--before", *b, "--after", *a], capsys)
    assert rc == 2 and "--after" in err and "not a readable JSON file" in err
    (a[0] / "attn_fwd.json").write_text(json.dumps({"gpu": "h100"}))
    rc, _, err = run_main(["--before", *b, "--after", *a], capsys)
    assert rc == 2 and 'no "rows" list' in err
    c = case()
    write(b[0], "attn_fwd", [row(c, 1.0, 1.0), row(c, 1.1, 1.0)])
    write(a[0], "attn_fwd", [row(c, 1.0, 1.0)])
    rc, _, err = run_main(["--before", *b, "--after", *a], capsys)
    assert rc == 2 and "--before" in err and "appears twice" in err


@pytest.mark.parametrize("extra,named,text", [
    (["--suites", "nosuch"], "--suites", "unknown suite 'nosuch'"),
    (["--suites", "rope"], "--suites", "no rope.json in any round"),
    (["--suites", ","], "--suites", "no suite named"),
    (["--peer", "rope"], "--peer", "not SUITE=VALUE"),
    (["--suites", "attn_fwd", "--peer", "rope=eager"], "--peer", "not among --suites"),
    (["--kinds", "=decode"], "--kinds", "not SUITE=VALUE"),
])
def test_bad_options_exit_2_naming_the_argument(tmp_path, capsys, extra, named, text):
    b, a = _good(tmp_path)
    rc, _, err = run_main(["--before", *b, "--after", *a, *extra], capsys)
    assert rc == 2
    assert f"error: {named}: " in err and text in err


def test_required_argument_missing_exits_2(tmp_path, capsys):
    b, _ = _good(tmp_path)
    with pytest.raises(SystemExit) as e:
        ab.main(["--before", str(b[0])])
    assert e.value.code == 2
    assert "--after" in capsys.readouterr().err


def test_unknown_suite_with_a_peer_is_compared(tmp_path):
    c = {"n": 1}
    r = row(c, 1.0, 1.0, "flex")
    b, a = rounds(tmp_path, "logit_mods", [[r]], [[r]])
    cmp = ab.compare(b, a, ab.resolve_specs(["logit_mods"], peers={"logit_mods": "flex"}),
                     explicit_suites=True)
    assert cmp.compared == 1 and not cmp.failed


def test_command_line_exit_status(tmp_path):
    c = case()
    b, a = rounds(tmp_path, "attn_fwd", [[row(c, 1.0, 1.0)]], [[row(c, 1.5, 1.0)]])
    cmd = [sys.executable, str(AB_PY), "--before", str(b[0]), "--after"]
    p = subprocess.run(cmd + [str(a[0])], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "1 failed" in p.stdout
    p = subprocess.run(cmd + [str(tmp_path / "x")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--after" in p.stderr and "Traceback" not in p.stderr


# ------------------------------------------------------------------- the committed example

@pytest.mark.skipif(not EXAMPLE.is_dir(), reason="bench/results/h200/layout_ab not present")
def test_layout_ab_example_loads(tmp_path, capsys):
    before, after = EXAMPLE / "before", EXAMPLE / "after"
    cmp = ab.compare([before], [after])
    by = {s.spec.name: s for s in cmp.suites}
    assert set(by) == {"rope", "attn_fwd", "attn_bwd", "kvcache"}
    assert cmp.compared > 0
    for s in cmp.suites:
        present = [p for p in (before, after) if (p / f"{s.spec.name}.json").is_file()]
        if not present:
            assert s.note and not s.cases and not s.missing
        elif len(present) == 1:  # e.g. rope: after's run is ../rope.json
            assert not s.cases and s.missing
            assert all(m.absent == [f"{'after' if present[0] == before else 'before'}_1: no "
                                    f"{s.spec.name}.json"] for m in s.missing)
        else:
            rows_b = {ab.case_key(r["case"]): r
                      for r in json.loads((before / f"{s.spec.name}.json").read_text())["rows"]}
            rows_a = {ab.case_key(r["case"]): r
                      for r in json.loads((after / f"{s.spec.name}.json").read_text())["rows"]}
            assert len(s.cases) + len(s.missing) == len(set(rows_b) | set(rows_a))
            for c in s.cases:  # each compared case against the files' own numbers
                rb, ra = rows_b[ab.case_key(c.case)], rows_a[ab.case_key(c.case)]
                want = (ra["ours_ms"] / ra["peers"]["sdpa_cudnn"]) / (
                    rb["ours_ms"] / rb["peers"]["sdpa_cudnn"]) - 1
                assert c.change == pytest.approx(want, rel=1e-9)
                assert c.before_ms == rb["ours_ms"]
                assert c.passed == (abs(want) <= ab.tolerance(rb["ours_ms"]))
    js = tmp_path / "s.json"
    rc, out, err = run_main(["--before", before, "--after", after, "--json", js], capsys)
    assert rc in (0, 1), err
    s = json.loads(js.read_text())
    assert s["compared"] == cmp.compared and s["failed"] == len(cmp.failed)
    assert s["summary"] == out.splitlines()[-1]
    assert rc == (1 if cmp.failed else 0)
