"""The compute-sanitizer case list (sanitize_cases.py, run under scripts/gpu_sanitize.sh on a
GPU) runs on the CPU twins: every case is a valid call that gives finite outputs, the list
reaches every kernel family, and a case that fails is reported as failed."""
import subprocess
import sys
from pathlib import Path

import torch

import sanitize_cases

SCRIPT = Path(sanitize_cases.__file__)


def test_every_case_runs_on_cpu():
    assert sanitize_cases.run(list(sanitize_cases.CASES), torch.device("cpu")) == []


def test_the_cases_cover_every_family_and_head_dim():
    names = " ".join(sanitize_cases.CASES)
    for part in ("attn d=64", "attn d=128", "attn d=256", "d=96", "tall", "varlen",
                 "deterministic", "window softcap sinks", "fp16",
                 "kvcache bf16", "kvcache int8", "kvcache fp8", "pages of 8", "chunked prefill",
                 "rope"):
        assert part in names, part


def test_a_failing_case_is_reported(monkeypatch, capsys):
    monkeypatch.setitem(sanitize_cases.CASES, "nan case",
                        lambda device: [torch.tensor([1.0, float("nan")])])
    monkeypatch.setitem(sanitize_cases.CASES, "raising case",
                        lambda device: longctx_error())
    assert sanitize_cases.run(["nan case", "raising case"], torch.device("cpu")) == [
        "nan case", "raising case"]
    out = capsys.readouterr().out
    assert "FAILED  nan case" in out and "FAILED  raising case" in out


def longctx_error():
    raise ValueError("longctx.flash_attn_func: q must be a tensor")


def test_command_line():
    def cli(*args):
        return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                              text=True, timeout=300)
    listed = cli("--list", "--only", "both layouts,int8 decode pages")
    assert listed.returncode == 0
    assert listed.stdout.splitlines() == ["kvcache int8 decode pages of 8 (CUDA-core kernel)",
                                          "rope forward and backward, both layouts"]
    ran = cli("--device", "cpu", "--only", "both layouts")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "1 of 1 cases passed" in ran.stdout
    none = cli("--device", "cpu", "--only", "no such case")
    assert none.returncode == 1 and "no case matches" in none.stderr
