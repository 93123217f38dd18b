"""A new user's first hour: scripts/common.sh (the progress of setup's long steps, the CPU-only
default without a GPU), setup.py's one-line answer when torch is missing, and no test printing
into pytest's progress line."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMON = ROOT / "scripts" / "common.sh"


def bash(script, env=None, timeout=60):
    return subprocess.run(["bash", "-c", f'set -euo pipefail; source "{COMMON}"; {script}'],
                          capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=timeout)


# ------------------------------------------------------------------------------------ run_step


def test_run_step_shows_progress_lines_heartbeat_and_time(tmp_path):
    log = tmp_path / "step.log"
    work = ("for i in 1 2 3; do echo \"noise $i\"; echo \"[$i/3] c++ -O3 -c /src/f$i.cpp -o x\"; "
            "sleep 1.2; done")
    p = bash(f'run_step "compile" "{log}" "^\\[[0-9]+/[0-9]+\\] " '
             f'"s#^(\\[[0-9]+/[0-9]+\\]) .* -c ([^ ]+) .*#   \\1 \\2#" bash -c \'{work}\'',
             env={"HEARTBEAT_S": "1"})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "== compile"
    assert [line for line in lines if "[" in line] == [
        "   [1/3] /src/f1.cpp", "   [2/3] /src/f2.cpp", "   [3/3] /src/f3.cpp"]
    assert any(re.fullmatch(r"   \.\.\. \d+ s", line) for line in lines)  # the heartbeat
    assert re.fullmatch(r"   done in \d+ s", lines[-1])
    assert "noise" not in p.stdout and "noise 3" in log.read_text()  # all of it in the log


def test_run_step_failure_shows_the_end_of_the_log(tmp_path):
    log = tmp_path / "step.log"
    p = bash(f'run_step "build" "{log}" "^never" "s/x/x/" bash -c "echo first; echo boom; '
             f'exit 3" || echo "rc=$?"')
    assert "   FAILED (exit code 3) after" in p.stdout
    assert p.stdout.rstrip().endswith("first\nboom\nrc=3")


# ------------------------------------------------------------------ CPU-only without a GPU


@pytest.fixture
def fake_nvidia_smi(tmp_path):
    """A PATH whose nvidia-smi prints `listing` and exits with `code`."""
    def make(listing, code=0):
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        tool = bin_dir / "nvidia-smi"
        tool.write_text(f"#!/bin/sh\nprintf '{listing}'\nexit {code}\n")
        tool.chmod(0o755)
        return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return make


def _cpu_only(env):
    env = {"LONGCTX_CPU_ONLY": "", "LONGCTX_REQUIRE_CUDA": "", **env}
    p = bash('[ -z "$LONGCTX_CPU_ONLY" ] && unset LONGCTX_CPU_ONLY; default_to_cpu_only; '
             'echo "LONGCTX_CPU_ONLY=${LONGCTX_CPU_ONLY:-unset}"', env=env)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.parametrize("listing,code", [("", 0), ("", 9), ("No devices were found\\n", 6)])
def test_no_visible_gpu_builds_cpu_only_and_says_how_to_force(fake_nvidia_smi, listing, code):
    out = _cpu_only(fake_nvidia_smi(listing, code))
    assert out.endswith("LONGCTX_CPU_ONLY=1\n")
    assert "no GPU visible" in out and "LONGCTX_CPU_ONLY=0 builds the CUDA kernels" in out


def test_visible_gpu_keeps_the_cuda_build(fake_nvidia_smi):
    out = _cpu_only(fake_nvidia_smi("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\\n"))
    assert out == "LONGCTX_CPU_ONLY=unset\n"


@pytest.mark.parametrize("env", [{"LONGCTX_REQUIRE_CUDA": "1"}, {"LONGCTX_CPU_ONLY": "0"}])
def test_ci_and_an_explicit_choice_keep_the_cuda_build(fake_nvidia_smi, env):
    out = _cpu_only({**fake_nvidia_smi("", 9), **env})
    assert "no GPU visible" not in out
    assert out.endswith(f"LONGCTX_CPU_ONLY={env.get('LONGCTX_CPU_ONLY') or 'unset'}\n")


# ---------------------------------------------------------------------- setup.py without torch


def test_setup_py_without_torch_says_what_to_do(tmp_path):
    """What pip's default build isolation shows: torch is not importable in the build's
    environment. A stand-in torch that cannot be found plays that environment."""
    hide = tmp_path / "hide" / "torch"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    env = dict(os.environ, PYTHONPATH=str(hide.parent))
    p = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True,
                       text=True, env=env, timeout=60)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1
    assert "install torch first" in p.stderr and "pip install --no-build-isolation ." in p.stderr


# ------------------------------------------------------------------- pytest's progress line


def test_no_test_prints_into_pytest_progress_line():
    """A test checks its output with capsys/capfd or lets pytest capture it; none prints past the
    capture into pytest's progress line."""
    offenders = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*.py")
                 if re.search(r"\b(capsys|capfd|capsysbinary|capfdbinary)\.disabled\(\)",
                              p.read_text())}
    assert not offenders, sorted(offenders)
