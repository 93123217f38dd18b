"""The KV-cache benchmark's CPU-side logic (longctx.bench.kvcache_cases, kvcache_report and
kvcache_suite): the case lists the issue asks for, their selection, byte / FLOP / cu_seqlens
arithmetic, the merge of several runs and the markdown of fabricated results. The rows of
today's committed run (bench/results/h100/kvcache.json) pin the schema and numbers the suite must
keep. One GPU test runs the --quick suite end to end.
"""
import copy
import json
from pathlib import Path

import pytest
import torch

from longctx.bench import Results
from longctx.bench import kvcache_cases as kc
from longctx.bench import kvcache_report as kr
from longctx.bench import kvcache_suite as ks

COMMITTED = Path(__file__).resolve().parents[2] / "bench" / "results" / "h100" / "kvcache.json"


def _committed():
    if not COMMITTED.exists():
        pytest.skip(f"{COMMITTED} is not in this checkout")
    return json.loads(COMMITTED.read_text())


def _results(doc):
    """A Results holding a results file's meta and rows."""
    res = Results("kvcache", gpu=doc.get("gpu", "h100"))
    res.meta.update({k: v for k, v in doc.items() if k != "rows"})
    res.rows = copy.deepcopy(doc["rows"])
    return res


def _section(md, title):
    """The lines of a markdown section (from its '## title' heading to the next heading)."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## " + title))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
               len(lines))
    return lines[start:end]


# ---- the case lists ------------------------------------------------------------------------

def test_full_plan_has_the_issue_cases():
    cases = kc.plan(quick=False)
    by_group = {g: [c for c in cases if c.group == g] for g in kc.GROUPS}
    assert [c.group for c in cases] == sorted((c.group for c in cases), key=kc.GROUPS.index)
    # decode as today: 32K and 128K, batch 1 and 16, every format
    assert {(c.context, c.batch, c.fmt) for c in by_group["decode"]} == {
        (ctx, b, f) for ctx in (32768, 131072) for b in (1, 16) for f in kc.FORMATS}
    # window: 128K through (4096, 0) beside a plain 4K decode, bf16, batch 1 and 16, plain first
    window = by_group["window"]
    assert [(c.fmt, c.context, c.batch, c.window) for c in window] == [
        ("bf16", 4096, 1, (-1, -1)), ("bf16", 131072, 1, (4096, 0)),
        ("bf16", 4096, 16, (-1, -1)), ("bf16", 131072, 16, (4096, 0))]
    # head dims 64, 96, 256 at 128K batch 16, every format, bf16 first (it measures the peers)
    hdim = by_group["hdim"]
    assert {(c.hdim, c.fmt) for c in hdim} == {(d, f) for d in (64, 96, 256) for f in kc.FORMATS}
    assert all((c.context, c.batch, c.window) == (131072, 16, None) for c in hdim)
    assert all(hdim[i].fmt == "bf16" for i in range(0, len(hdim), len(kc.FORMATS)))
    # prefill: 128K in 8K chunks, every format, extra bytes at 32K and 128K (both chunk ends)
    prefill = by_group["prefill"]
    assert {c.fmt for c in prefill} == set(kc.FORMATS)
    for c in prefill:
        assert (c.prompt, c.chunk, c.extra_at) == (131072, 8192, (32768, 131072))
        assert set(c.extra_at) <= set(kc.chunk_ends(c.prompt, c.chunk))
    # mixed: 15 decode rows at 32K and one 8K chunk of a 16K+ sequence, bf16 and 8-bit
    mixed = by_group["mixed"]
    assert "bf16" in {c.fmt for c in mixed} and {"fp8", "int8"} & {c.fmt for c in mixed}
    for c in mixed:
        assert (c.decode_rows, c.decode_context, c.chunk) == (15, 32768, 8192)
        assert c.prefill_context >= 16384
    assert [c.context for c in by_group["error"]] == [32768]


def test_quick_plan_runs_every_group_small():
    cases = kc.plan(quick=True)
    assert {c.group for c in cases} == set(kc.GROUPS)
    for c in cases:
        if isinstance(c, kc.PrefillCase):
            assert c.prompt <= 16384 and set(c.extra_at) <= set(kc.chunk_ends(c.prompt, c.chunk))
        if isinstance(c, kc.DecodeCase) and c.group != "window":
            assert c.context * c.batch <= 32768
    assert len(cases) < len(kc.plan(quick=False))


def test_tags_are_unique_and_select_cases():
    for quick in (False, True):
        tags = [c.tag for c in kc.plan(quick)]
        assert len(set(tags)) == len(tags)
    cases = kc.plan(quick=False)
    assert kc.select(cases) == cases
    # "kvcache decode" is the plain decode group only, not window-decode or hdim-decode
    assert {c.group for c in kc.select(cases, only=["kvcache decode"])} == {"decode"}
    picked = kc.select(cases, groups=["window", "hdim"], only=["batch=16"])
    assert [c.tag for c in picked] == [c.tag for c in cases
                                       if c.group in ("window", "hdim") and c.batch == 16]
    assert all(c.fmt == "int8" for c in kc.select(cases, groups=["mixed"], only=["int8"]))
    assert [c.hdim for c in kc.select(cases, only=["hdim=96"])] == [96] * len(kc.FORMATS)
    with pytest.raises(ValueError, match="unknown groups.*'windows'"):
        kc.select(cases, groups=["decode", "windows"])


def test_existing_rows_keep_their_cases():
    """The decode, window, hdim, prefill and mixed groups produce exactly the cases of the
    committed run's rows (same keys, same order, same values)."""
    doc = _committed()
    plan = kc.plan(quick=False)
    kinds = ("decode", "prefill", "mixed")
    committed = [r["case"] for r in doc["rows"] if r["case"]["kind"] in kinds]
    ours = [c.case() for c in plan if c.case()["kind"] in kinds]
    assert [list(c.items()) for c in ours] == [list(c.items()) for c in committed]


def test_new_cases_describe_themselves():
    window = kc.DecodeCase("window", "bf16", 131072, 16, window=(4096, 0))
    assert window.case()["window"] == [4096, 0] and window.case()["kind"] == "decode"
    assert "window" not in kc.DecodeCase("hdim", "int8", 131072, 16, hdim=96).case()
    assert kc.DecodeCase("hdim", "int8", 131072, 16, hdim=96).case()["hdim"] == 96
    mixed = kc.MixedCase("fp8", 15, 32768, 8192, 16384).case()
    assert mixed["kind"] == "mixed" and mixed["format"] == "fp8" and mixed["batch"] == 16
    assert kc.ErrorCase(32768).case() == {"kind": "error", "context": 32768}
    # the cases that share the bf16 case's peers: same group, context, batch, hdim and window
    a, b = kc.DecodeCase("decode", "bf16", 32768, 1), kc.DecodeCase("decode", "int8", 32768, 1)
    assert a.peer_key == b.peer_key != kc.DecodeCase("hdim", "bf16", 32768, 1).peer_key


# ---- arithmetic ----------------------------------------------------------------------------

def test_decode_bytes_match_the_committed_rows():
    doc = _committed()
    rows = [r for r in doc["rows"] if r["case"]["kind"] == "decode"]
    assert rows
    for r in rows:
        c = r["case"]
        elem = 2 if c["format"] == "bf16" else 1
        window_left = c.get("window", [-1, -1])[0]
        assert kc.decode_bytes(c["batch"], c["context"], c["hdim"], elem, c["format"] == "int8",
                               window_left) == r["bytes"], c


def test_decode_bytes_of_a_window():
    """A window of 4096 to the left sees 4097 keys; at 128K they span 257 pages of 16."""
    assert kc.visible_keys(131072, 4096) == 4097
    assert kc.visible_keys(131072, -1) == 131072
    assert kc.visible_keys(100, 4096) == 100
    assert kc.pages_touched(131072, 4097) == 257
    assert kc.pages_touched(131072, 4096) == 256
    assert kc.pages_touched(131072, 131072) == 8192
    assert kc.pages_touched(20, 1) == 1 and kc.pages_touched(20, 5) == 2
    assert kc.pages_touched(20, 0) == 0
    kv = 2 * 8 * 128 * 2  # K and V, 8 kv heads, bf16
    assert kc.decode_bytes(16, 131072, 128, 2, False, 4096) == 16 * (4097 * kv + 257 * 4)
    assert kc.decode_bytes(1, 4096, 128, 2, False, 4096) == kc.decode_bytes(1, 4096, 128, 2, False)
    # int8 scales: one fp32 per token and kv head, for K and V
    assert kc.decode_bytes(1, 16, 64, 1, True) == 16 * (2 * 8 * 64 + 2 * 8 * 4) + 4


def test_chunk_flops_sum_to_the_committed_and_one_pass_flops():
    doc = _committed()
    row = next(r for r in doc["rows"] if r["case"]["kind"] == "prefill")
    prompt, chunk = row["case"]["context"], row["case"]["chunk"]
    starts = range(0, prompt, chunk)
    total = sum(kc.chunk_flops(s, e) for s, e in zip(starts, kc.chunk_ends(prompt, chunk)))
    assert total == row["flops"]
    assert total == 4 * kc.H * kc.D * prompt * (prompt + 1) // 2  # the causal triangle
    assert kc.chunk_ends(20000, 8192) == [8192, 16384, 20000]
    assert kc.chunk_flops(0, 1, heads=1, hdim=1) == 4
    assert kc.chunk_flops(3, 5, heads=1, hdim=1) == 4 * (2 * 3 + 3)


def test_mixed_batch_packing():
    c = kc.MixedCase("bf16", 15, 32768, 8192, 16384)
    assert c.q_lens() == [1] * 15 + [8192]
    assert c.cache_lens() == [32768] * 15 + [16384]
    cu = kc.cu_seqlens(c.q_lens())
    assert cu == list(range(16)) + [15 + 8192]
    assert kc.cu_seqlens([]) == [0]
    # the decode rows are rows 0..14 of the packed queries, the chunk the last 8192
    assert [cu[i + 1] - cu[i] for i in range(16)] == c.q_lens()
    for bad in ((15, 32768, 8192, 4096), (15, 16384, 8192, 32768), (15, 32768, 0, 16384)):
        with pytest.raises(ValueError, match="chunk <= prefill_context <= decode_context"):
            kc.MixedCase("bf16", *bad)


def test_plain_decode_ms_pairs_the_window_rows():
    plain = kc.DecodeCase("window", "bf16", 4096, 16, window=(-1, -1))
    win = kc.DecodeCase("window", "bf16", 131072, 16, window=(4096, 0))
    rows = [{"case": kc.DecodeCase("window", "bf16", 4096, 1, window=(-1, -1)).case(),
             "ours_ms": 0.01},
            {"case": kc.DecodeCase("decode", "bf16", 4096, 16).case(), "ours_ms": 0.5},
            {"case": plain.case(), "error": "RuntimeError('x')"},
            {"case": plain.case(), "ours_ms": 0.2}]
    assert kc.plain_decode_ms(rows, win) == 0.2
    assert kc.plain_decode_ms(rows[:3], win) is None


# ---- results: merge and markdown -----------------------------------------------------------

def _fabricated():
    """Results with a row of every kind the suite writes, a failed hdim 256 case included."""
    res = Results("kvcache", gpu="h200", copy_gbps=4250.0, matmul_tflops=800.0)
    peers = {"sdpa_cudnn": 0.05, "sdpa_flash": 0.06}
    mode = {"sdpa_cudnn": "enable_gqa", "sdpa_flash": "enable_gqa"}

    def decode(case, ms, **extra):
        return {"case": case.case(), "ours_ms": ms, "ours_eager_ms": ms * 1.1, "bytes": 1000,
                "gbps": 1234.5, "frac_copy": 0.29, "append_ms": None, "alternatives": {},
                "peers": peers, "peer_mode": mode, "ratio_cudnn": ms / 0.05, **extra}
    res.add({"case": {"kind": "error", "format": "int8", "context": 32768, "batch": 1},
             "max_abs_vs_bf16_cache": 0.46, "rel_vs_bf16_cache": 0.13, "max_abs_vs_fp64": 0.46,
             "rel_vs_fp64": 0.13})
    res.add(decode(kc.DecodeCase("decode", "fp8", 32768, 1), 0.0302))
    res.add(decode(kc.DecodeCase("window", "bf16", 4096, 1, window=(-1, -1)), 0.0100))
    res.add(decode(kc.DecodeCase("window", "bf16", 131072, 1, window=(4096, 0)), 0.0115,
                   ratio_plain=1.15))
    res.add(decode(kc.DecodeCase("hdim", "bf16", 131072, 16, hdim=64), 1.5))
    res.add(decode(kc.DecodeCase("hdim", "int8", 131072, 16, hdim=96), 0.9))
    res.add({"case": kc.DecodeCase("hdim", "int8", 131072, 16, hdim=256).case(),
             "error": "OutOfMemoryError('CUDA out of memory. Tried to allocate 4.00 GiB')"})
    res.add({"case": kc.PrefillCase("int8", 131072, 8192, (32768, 131072)).case(),
             "ours_ms": 237.5, "fwd_ms": 233.3, "one_pass_fwd_ms": 226.5, "append_ms": 1.9,
             "flops": 1, "tflops": 592.6, "fwd_tflops": 603.1, "frac_fwd": 0.9825,
             "chunk_ms": [1.0], "chunk_fwd_ms": [1.0], "max_abs_diff_chunked_vs_one_pass": 0.0,
             "max_abs_diff_vs_fwd_on_unquantized": 0.027,
             "extra_bytes": {"131072": 520 * 2**20, "32768": 136 * 2**20}})
    res.add({"case": kc.MixedCase("int8", 15, 32768, 8192, 16384).case(), "ours_ms": 3.1,
             "separate_ms": 3.5, "decode_ms": 0.4, "prefill_ms": 3.0,
             "ratio_separate": 3.1 / 3.5, "append_ms": 2.0, "timing": "eager",
             "max_abs_diff_vs_separate": 0.0078125})
    return res


def _table_rows(md, title):
    return [line for line in _section(md, title) if line.startswith("| ") and "---" not in line]


def test_markdown_of_fabricated_results():
    md = kr.markdown(_fabricated())
    decode = _table_rows(md, "Decode (")
    assert len(decode) == 2 and decode[1].startswith("| fp8 | 32768 | 1 | 0.0302 |")
    window = _table_rows(md, "Sliding-window decode")
    assert window[0].endswith("| x plain 4K |")
    assert window[1].startswith("| bf16 | 4096 | 1 | -1 |") and window[1].endswith("| - |")
    assert window[2].startswith("| bf16 | 131072 | 1 | 4096 | 0.0115 |")
    assert window[2].endswith("| 0.230 | 1.150 |")
    hdim = _table_rows(md, "Decode at other head dims")
    assert len(hdim) == 3 and hdim[1].startswith("| bf16 | 64 | 131072 | 16 | 1.5000 |")
    assert hdim[2].startswith("| int8 | 96 | 131072 | 16 | 0.9000 |")
    prefill = _table_rows(md, "Chunked prefill")
    assert prefill[0].endswith("| extra MiB |")
    assert prefill[1].startswith("| int8 | 131072 | 8192 | 237.50 |")
    assert prefill[1].endswith("| 32K: 136.0, 128K: 520.0 |")
    mixed = _table_rows(md, "Mixed batch")
    assert mixed[1] == ("| int8 | 15 x 32768 | 8192 of 16384 | 3.100 | 3.500 | 0.886 | 0.400 "
                        "| 3.000 | 7.81e-03 |")
    assert len(_table_rows(md, "Output error")) == 2
    failed = _section(md, "Failed cases")
    assert any("hdim 256" in line and "out of memory" in line for line in failed)
    assert "Rows from several runs" not in md


def test_markdown_of_the_committed_run_keeps_its_tables():
    """The committed results render to the committed markdown's tables, line for line."""
    doc = _committed()
    committed_md = COMMITTED.with_suffix(".md").read_text()
    md = kr.markdown(_results(doc))
    for title in ("Decode (", "Sliding-window decode", "Decode at other head dims",
                  "Chunked prefill", "Mixed batch", "Output error"):
        assert _section(md, title), title
        assert _section(md, title) == _section(committed_md, title), title


def test_markdown_lists_failed_rows_of_older_runs():
    """A failed decode row written before the cases carried hdim still renders."""
    res = _fabricated()
    res.add({"case": {"kind": "decode", "format": "int8", "context": 131072, "batch": 16},
             "error": "OutOfMemoryError()"})
    md = kr.markdown(res)
    assert "OutOfMemoryError()" in "\n".join(_section(md, "Failed cases"))


def test_merge_runs_keeps_other_rows_and_stamps_dates():
    old = _fabricated()
    old.meta["date"] = "2026-12-01T00:00:00+00:00"
    previous = json.loads(json.dumps(old.as_dict()))
    assert kr.merge_runs(None, old) is old
    new = Results("kvcache", gpu="h200", copy_gbps=4300.0, matmul_tflops=810.0)
    new.meta["date"] = "2026-12-02T00:00:00+00:00"
    replaced = {**old.rows[-1], "ours_ms": 2.9}  # the int8 mixed row, measured again
    added = {**old.rows[-1], "case": kc.MixedCase("bf16", 15, 32768, 8192, 16384).case()}
    new.add(replaced)
    new.add(added)
    merged = kr.merge_runs(previous, new)
    assert [r["case"] for r in merged.rows] == [r["case"] for r in old.rows] + [added["case"]]
    mixed_int8 = [r for r in merged.rows if r["case"] == replaced["case"]]
    assert mixed_int8 == [{**replaced, "run_date": new.meta["date"]}]
    assert all(r["run_date"] == old.meta["date"] for r in merged.rows[:-2])
    assert set(merged.meta["runs"]) == {old.meta["date"], new.meta["date"]}
    assert merged.meta["runs"][new.meta["date"]]["copy_gbps"] == 4300.0
    assert merged.meta["copy_gbps"] == 4300.0 and new.rows == [replaced, added]  # res untouched
    # a third run over the merged file keeps the stamps; runs whose rows are all replaced go
    third = Results("kvcache", gpu="h200", copy_gbps=4200.0)
    third.meta["date"] = "2026-12-03T00:00:00+00:00"
    third.rows = [{**r, "ours_ms": 1.0} for r in old.rows]
    third.rows = [{k: v for k, v in r.items() if k != "run_date"} for r in third.rows]
    again = kr.merge_runs(json.loads(json.dumps(merged.as_dict())), third)
    assert [r["run_date"] for r in again.rows] == [third.meta["date"]] * len(old.rows) + \
        [new.meta["date"]]
    assert set(again.meta["runs"]) == {new.meta["date"], third.meta["date"]}
    assert "Rows from several runs" in kr.markdown(again)


def test_results_write_with_the_suite_columns(tmp_path):
    res = _fabricated()
    path = res.write(tmp_path, ks.COLUMNS)
    assert json.loads(path.read_text())["rows"][3]["case"]["window"] == [4096, 0]
    generic = path.with_suffix(".md").read_text()
    assert "| decode | bf16 | 131072 | 1 | 128 | [4096, 0] |" in generic


# ---- command line --------------------------------------------------------------------------

def test_command_line_selection():
    import argparse

    ap = argparse.ArgumentParser()
    ks.add_arguments(ap)
    args = ap.parse_args(["--groups", "window,hdim,prefill", "--only", "batch=16,int8",
                          "--merge", "--no-prefill"])
    assert ks._selection(args) == (["window", "hdim"], ["batch=16", "int8"]) and args.merge
    args = ap.parse_args([])
    assert ks._selection(args) == (list(kc.GROUPS), []) and not args.merge


def test_case_listing(capsys):
    assert ks.main(["--quick", "--groups", "mixed"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [c.tag for c in kc.mixed_plan(quick=True)] + [f"{len(out) - 1} cases"]
    ks.main(["--only", "hdim=96,window=4096"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(kc.FORMATS) + 2 + 1
    with pytest.raises(SystemExit):
        ks.main(["--groups", "nope"])


# ---- on a GPU ------------------------------------------------------------------------------

@pytest.mark.gpu
def test_quick_suite_runs_on_gpu(tmp_path):
    """The --quick suite end to end: a row for every case, no failure but the head dims the CUDA
    op does not take (96 today), and the new columns filled."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the kvcache kernels need a Hopper GPU (sm_90)")
    from longctx.bench.suites import SUITES

    if "kvcache" not in SUITES:
        pytest.skip("kvcache CUDA kernels not compiled in this build")
    seen = []
    res = ks.run_kvcache(quick=True, progress=seen.append)
    assert seen == [c.tag for c in kc.plan(quick=True)]
    failed = [r for r in res.rows if "error" in r]
    for r in failed:
        assert r["case"]["kind"] == "decode" and r["case"]["hdim"] == 96, r
        assert "head_dim" in r["error"], r
    kinds = {r["case"]["kind"] for r in res.rows if "error" not in r}
    assert kinds == {"error", "decode", "prefill", "mixed"}
    windowed = [r for r in res.rows if r["case"].get("window", [-1])[0] >= 0]
    assert windowed and all(r["ratio_plain"] > 0 for r in windowed)
    for r in res.rows:
        if r["case"]["kind"] == "prefill":
            assert set(r["extra_bytes"]) == {"8192", "16384"}
            assert all(v >= 0 for v in r["extra_bytes"].values())
            assert r["max_abs_diff_chunked_vs_one_pass"] <= 2 ** -8
        if r["case"]["kind"] == "mixed":
            assert r["ours_ms"] > 0 and r["separate_ms"] > 0
            assert r["max_abs_diff_vs_separate"] <= 2 ** -6
    kr.markdown(res)
    res.write(tmp_path, ks.COLUMNS)
