"""bench/transformers.py end to end: its CPU smoke run (tiny fp32 models) writes the results format
of docs/design.md with every case measured for longctx and each peer the model allows, and
longctx's outputs agree with the peers'; and the eager memory estimate that decides which eager
rows the GPU run measures on an H200."""
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_transformers",
                                                  ROOT / "bench" / "transformers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run")
def test_cpu_smoke_run_writes_every_case(tmp_path, capsys):
    bench = _bench()
    assert bench.main(["--out", str(tmp_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    res = json.loads((tmp_path / "cpu" / "transformers.json").read_text())
    assert res["smoke_test"] is True and (tmp_path / "cpu" / "transformers.md").exists()
    want = [{"model": m, "tokens": t, "kind": k} for m, t, k in bench.cases(False, tiny=True)]
    assert [r["case"] for r in res["rows"]] == want
    for r in res["rows"]:
        what = r["case"]
        assert "errors" not in r, (what, r.get("errors"))
        assert r["ours_ms"] > 0, what
        assert r["peers"]["eager"] > 0, what
        if what["model"] == "gpt-oss":  # transformers refuses sdpa for gpt-oss
            assert r["peers"]["sdpa"] is None and "does not allow" in r["skipped"]["sdpa"]
            assert r["sdpa_backend"] is None
        else:
            assert r["peers"]["sdpa"] > 0 and r["sdpa_backend"] == "flash_cpu", what
        # fp32 on both sides: the same function up to rounding
        assert r["check"]["vs"] == "eager"
        assert r["check"]["max_abs_diff"] <= 1e-5 * max(1.0, r["check"]["ref_max_abs"]), what


def test_eager_memory_estimate_on_an_h200():
    """Which eager peers the full GPU run measures with ~135 GiB free: Gemma-2-shaped at 32K and
    at 8K, gpt-oss-shaped at 8K; not the Llama-shaped rows nor gpt-oss at 32K (64 heads)."""
    bench = _bench()
    cfg = bench.model_configs(tiny=False)
    free = 135 * 2**30
    fits = {(m, t, k): bench.eager_fits(cfg[m], t, k, free) is None
            for m, t, k in bench.cases(False, tiny=False)}
    assert fits == {("llama", 32768, "prefill"): False, ("llama", 131072, "prefill"): False,
                    ("llama", 16384, "train_step"): False, ("gemma2", 32768, "prefill"): True,
                    ("gemma2", 8192, "prefill"): True, ("gpt-oss", 32768, "prefill"): False,
                    ("gpt-oss", 8192, "prefill"): True}
    assert "GiB" in bench.eager_fits(cfg["llama"], 32768, "prefill", free)
