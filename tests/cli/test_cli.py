"""The `longctx` command: `python -m longctx info|plan|bench` run as subprocesses (exit codes,
key lines, one-line errors without tracebacks), and the bench registry and reporting in process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import longctx

# The subprocess must import the same longctx as this process (the installed package in CI, the
# source tree in a development checkout built in place), not whatever the source tree holds.
LONGCTX_PARENT = str(Path(longctx.__file__).resolve().parents[1])


def run_cli(*args, cwd=None, timeout=240):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([LONGCTX_PARENT] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("LONGCTX_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "longctx", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)


class InProcess:
    """The result of longctx.cli.main run in this process (fast: no interpreter start); the exit
    status of a SystemExit (argparse) as returncode."""

    def __init__(self, capsys, *args):
        from longctx.cli import main

        try:
            self.returncode = main(list(args))
        except SystemExit as e:  # argparse's errors, --help, --version
            self.returncode = e.code
        captured = capsys.readouterr()
        self.stdout, self.stderr = captured.out, captured.err


def assert_one_line_error(proc, code, *fragments):
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("longctx ")
    for f in fragments:
        assert f in lines[0], lines[0]


# ------------------------------------------------------------------------------------- info


def test_info():
    p = run_cli("info")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "longctx 0.1.0" in out
    assert f"torch       {torch.__version__}" in out
    assert "rope" in out and "features" in out
    if torch.cuda.is_available():
        assert "SMs" in out
    else:
        assert "no CUDA GPU found" in out


def test_info_json():
    p = run_cli("info", "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["build"]["torch_runtime"] == torch.__version__
    assert info["features"]["rope"]["cpu"] is True
    assert "flash_bwd" in info["planned_not_built"] or "flash_bwd" in info["features"]
    # ring attention is listed where the forward and backward both are
    assert ("ring" in info["features"]) == ("flash_fwd" in info["features"]
                                            and "flash_bwd" in info["features"])
    if "ring" in info["features"]:
        assert info["features"]["ring"]["cpu"] == info["features"]["flash_bwd"]["cpu"]


def test_arch_compatibility():
    from longctx.cli.info import arch_runs_on, peak_bandwidth_gbps

    assert arch_runs_on("90a", (9, 0))
    assert not arch_runs_on("90a", (10, 0))
    assert arch_runs_on("80", (8, 6)) and not arch_runs_on("86", (8, 0))
    assert arch_runs_on("100a", (10, 0)) and not arch_runs_on("100a", (9, 0))
    # H100 SXM: 2619 MHz HBM3 on a 5120-bit bus: 2 x 2.619e9 x 640 B = 3352 GB/s
    assert round(peak_bandwidth_gbps(2_619_000, 5120)) == 3352
    assert peak_bandwidth_gbps(None, 5120) is None


def test_feature_availability_reads_build_info():
    from longctx.cli.info import feature_availability

    build = {"cuda_archs": ["90a"], "kernels": [
        {"family": "rope", "device": "cpu"}, {"family": "rope", "device": "cuda"},
        {"family": "flash_fwd", "device": "cuda"}, {"family": "kvcache", "device": "cpu"}]}
    h100 = {"index": 0, "capability": [9, 0]}
    b200 = {"index": 1, "capability": [10, 0]}
    f = feature_availability(build, [h100, b200])
    assert f["rope"]["cpu"] and f["rope"]["cuda"] == {0: True, 1: False}
    assert "built for 90a, the GPU is sm_100" in f["rope"]["why"]
    assert not f["flash_fwd"]["cpu"] and f["flash_fwd"]["cuda"][0]
    assert f["kvcache"]["cuda"] == {0: False, 1: False}
    assert f["kvcache"]["why"] == "no CUDA kernel compiled"
    assert feature_availability(build, [])["flash_fwd"]["why"] == "no CUDA GPU"


# ------------------------------------------------------------------------------------- plan


def test_plan_llama31_70b_128k_on_8_gpus():
    p = run_cli("plan", "--model", "llama-3.1-70b", "--context", "128K", "--gpus", "8")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "131,072 (128K) tokens" in out
    assert "per token, all layers  327,680 B (320.00 KiB)" in out
    assert "per sequence           42.95 GB (40.00 GiB)" in out
    assert "fits" in out and "DOES NOT FIT" not in out
    assert "minimum GPUs 3" in out
    assert "llama3, factor 8" in out
    assert "transfer hidden behind compute" in out


def test_plan_json_and_minimum_gpus_by_default():
    p = run_cli("plan", "--model", "llama-3.1-70b", "--context", "131072", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["gpus"] == 3 and d["gpus_given"] is False and d["fits"] is True
    assert d["kv_bytes_per_token"] == 327_680
    assert d["kv_bytes_per_sequence"] == 42_949_672_960
    assert d["params"]["total"] == 70_553_706_496
    assert d["attention_fwd_flops_per_layer"] == 281_477_124_194_304
    assert d["rope"]["rope_type"] == "llama3"


def test_plan_int8_and_h200():
    p = run_cli("plan", "--model", "llama-3.1-8b", "--context", "1M", "--kv-dtype", "int8",
                "--gpu", "h200", "--gpus", "4", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    # 32 layers x (2 x 8 x 128 x 1 + 2 x 8 x 4) = 32 x 2112 = 67,584 B per token
    assert d["kv_bytes_per_token"] == 67_584
    assert d["memory"]["capacity"] == 143771 << 20


def test_plan_from_config_json(tmp_path):
    from test_plan import LLAMA31_8B_JSON

    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA31_8B_JSON))
    p = run_cli("plan", "--model", str(path), "--context", "64k")
    assert p.returncode == 0, p.stderr
    assert "per token, all layers  131,072 B (128.00 KiB)" in p.stdout


def test_plan_does_not_fit():
    p = run_cli("plan", "--model", "llama-3.1-70b", "--context", "128k", "--gpus", "1")
    assert_one_line_error(p, 1, "does not fit on 1 x H100", "the fewest that fit: 3")
    assert "DOES NOT FIT" in p.stdout  # the report is still printed


def test_plan_never_fits():
    p = run_cli("plan", "--model", "llama-3.1-405b", "--context", "1M", "--replicate-weights")
    assert_one_line_error(p, 1, "does not fit on any number")


@pytest.mark.parametrize("args,fragments", [
    (["--model", "llama-9b", "--context", "128k"], ["unknown model", "llama-3.1-8b", "qwen2.5-7b"]),
    (["--model", "llama-3.1-8b", "--context", "-5"], ["must be positive"]),
    (["--model", "llama-3.1-8b", "--context", "0"], ["must be positive"]),
    (["--model", "llama-3.1-8b", "--context", "12q"], ["cannot read '12q'"]),
    (["--model", "llama-3.1-8b", "--context", "128k", "--gpus", "0"], ["--gpus"]),
    (["--model", "llama-3.1-8b", "--context", "8", "--gpus", "16"], ["at least one token"]),
    (["--model", "llama-3.1-8b", "--context", "128k", "--gpu", "x1"], ["unknown GPU"]),
    (["--model", "llama-3.1-8b", "--context", "128k", "--batch", "0"], ["--batch"]),
    (["--model", "missing/config.json", "--context", "128k"], ["no such file"]),
])
def test_plan_errors(capsys, args, fragments):
    assert_one_line_error(InProcess(capsys, "plan", *args), 2, *fragments)


def test_plan_error_as_subprocess():
    assert_one_line_error(run_cli("plan", "--model", "llama-9b", "--context", "128k"), 2,
                          "unknown model")


def test_plan_malformed_config(capsys, tmp_path):
    from test_plan import LLAMA31_8B_JSON

    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in LLAMA31_8B_JSON.items()
                                if k != "num_attention_heads"}))
    assert_one_line_error(InProcess(capsys, "plan", "--model", str(path), "--context", "1k"), 2,
                          "missing field 'num_attention_heads'")
    path.write_text('{"hidden_size": 4096,')
    assert_one_line_error(InProcess(capsys, "plan", "--model", str(path), "--context", "1k"), 2,
                          "not valid JSON")
    bad_rope = {**LLAMA31_8B_JSON, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    path.write_text(json.dumps(bad_rope))
    assert_one_line_error(InProcess(capsys, "plan", "--model", str(path), "--context", "1k"), 2,
                          "rope_scaling", "low_freq_factor")


def test_no_subcommand_is_a_usage_error():
    p = run_cli()
    assert p.returncode == 2 and "usage: longctx" in p.stderr


# ------------------------------------------------------------------------------------ bench


def test_bench_quick(tmp_path):
    p = run_cli("bench", "--quick", "--out", str(tmp_path), "--no-progress")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    if torch.cuda.is_available():
        pytest.skip("the GPU suites ran; their content is the harness's to test")
    # labelled a correctness smoke test every time, not only on a busy machine
    assert out.startswith("longctx bench: CPU correctness smoke test")
    assert "no speedup or throughput" in out
    assert "rope on cpu: correctness smoke test" in out
    header = next(line for line in out.splitlines() if "max error" in line)
    assert header.split() == ["case", "max", "error", "tolerance", "check", "ours", "ms",
                              "torch_eager", "ms"]
    assert " vs " not in out and "GB/s" not in out and "TFLOP/s" not in out
    assert "FAILED" not in out
    assert "skipped: GPU benchmarks: no CUDA GPU found" in out
    result = json.loads((tmp_path / "cpu" / "rope.json").read_text())
    assert result["gpu"] == "cpu" and result["smoke_test"] is True and result["rows"]
    for row in result["rows"]:
        assert row["ok"] is True and 0 <= row["max_abs_err"] <= row["tolerance"]
        assert row["ours_ms"] > 0 and "torch_eager" in row["peers"]
        assert "gbps" not in row and "tflops" not in row
    md = (tmp_path / "cpu" / "rope.md").read_text()
    assert md.startswith("# rope on cpu: correctness smoke test") and "float64 reference" in md
    assert not (tmp_path / "cpu" / "rope.png").exists()  # a smoke test has no rate to plot


def test_cpu_smoke_test_fails_on_a_wrong_output(monkeypatch, capsys, tmp_path):
    """An output outside its tolerance is a FAILED line and exit status 1."""
    from longctx.cli import bench_cpu

    real = bench_cpu._check

    def off_by_one(ours, ref, dtype):
        return real(ours + 1, ref, dtype)

    monkeypatch.setattr(bench_cpu, "_check", off_by_one)
    p = InProcess(capsys, "bench", "--quick", "--out", str(tmp_path), "--no-progress",
                  "--no-plot")
    if torch.cuda.is_available():
        pytest.skip("the GPU suites ran")
    assert p.returncode == 1
    assert "FAILED: rope seqlen=512" in p.stdout and "> tolerance" in p.stdout


def test_bench_json_output(tmp_path):
    p = run_cli("bench", "--quick", "--out", str(tmp_path), "--json", "--no-plot")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["results"] and all("rows" in r for r in d["results"])
    assert isinstance(d["skipped"], list) and d["failed"] == []


def test_gpu_suite_registry(monkeypatch, tmp_path):
    """The contract with longctx.bench.suites: SUITES maps names to fn(quick=, [progress=]),
    returning a results dict, an object with as_dict(), or a list; a failing suite is reported
    and does not hide the others."""
    import types

    from longctx.cli import bench as cli_bench

    class FakeResults:
        name = "attn_fwd"

        def as_dict(self):
            return {"gpu": "h100", "rows": [{"case": {"seqlen": 1024}, "ours_ms": 1.0,
                                             "peers": {"sdpa_flash": 2.0}, "tflops": 100.0}]}

    calls = []

    def ok(quick, progress):
        calls.append(quick)
        progress("case 1")
        return FakeResults()

    def boom(quick):
        raise RuntimeError("kernel exploded")

    mod = types.ModuleType("longctx.bench.suites")
    mod.SUITES = {"attn_fwd": ok, "broken": boom}
    monkeypatch.setitem(sys.modules, "longctx.bench.suites", mod)
    suites, why = cli_bench.load_gpu_suites()
    assert suites is mod.SUITES and why == ""
    results, failed = cli_bench.run_gpu_suites(suites, True, cli_bench.Progress(2, enabled=False))
    assert calls == [True]
    assert results[0]["name"] == "attn_fwd" and results[0]["rows"][0]["tflops"] == 100.0
    assert failed == ["broken: RuntimeError: kernel exploded"]
    table = cli_bench.format_table(results[0])
    assert "sdpa_flash ms" in table and "2.00x" in table
    path = cli_bench.write_results(results[0], tmp_path)
    assert path == tmp_path / "h100" / "attn_fwd.json"


def test_gpu_suite_registry_absent():
    from longctx.cli import bench as cli_bench

    try:
        import longctx.bench.suites  # noqa: F401
        pytest.skip("longctx.bench.suites is installed")
    except ImportError:
        pass
    suites, why = cli_bench.load_gpu_suites()
    assert suites is None and "longctx.bench.suites" in why


def test_cpu_attention_cases_run_when_a_cpu_kernel_exists():
    """With a CPU kernel for flash_attn_fwd (here a stand-in built on SDPA, registered only for
    this test when the build has none), the CPU bench times attention and reports TFLOP/s."""
    from longctx.cli import bench_cpu

    lib = None
    if not bench_cpu.attention_cpu_kernel_available():
        lib = torch.library.Library("longctx", "IMPL")

        def stand_in(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, wl, wr):
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                scale=scale, enable_gqa=True).transpose(1, 2)
            return out, q.new_zeros(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)

        lib.impl("flash_attn_fwd", stand_in, "CPU")
    try:
        cases, skipped = bench_cpu.cpu_cases(quick=True)
        assert [c for c in cases if c[0] == "attn_fwd"] and not skipped
        row = bench_cpu._attn_case(64, "fp32", reps=1)
        assert row["ok"] is True and row["max_abs_err"] <= row["tolerance"]
        assert "tflops" not in row  # toy sizes on a CPU measure no rate
        assert "sdpa_cpu" in row["peers"] and row["case"]["causal"] is True
    finally:
        if lib is not None:
            lib._destroy()


# ------------------------------------------------------------------- help, version, wording


def run_console_script(*args, timeout=60):
    """The `longctx` console script's module (_longctx_cli) in a fresh interpreter; its stderr
    ends with whether torch was imported."""
    code = ("import sys, _longctx_cli\n"
            "try:\n    rc = _longctx_cli.main(sys.argv[1:])\n"
            "except SystemExit as e:\n    rc = e.code\n"
            "print('torch imported:', 'torch' in sys.modules, file=sys.stderr)\n"
            "sys.exit(rc)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [LONGCTX_PARENT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.mark.parametrize("args", [["--help"], ["plan", "--help"], ["bench", "-h"], ["--version"],
                                  ["plan", "--gpus", "x", "--help"], []])
def test_help_and_version_do_not_import_torch(args):
    p = run_console_script(*args)
    assert p.returncode == (2 if args in ([], ["plan", "--gpus", "x", "--help"]) else 0), p.stderr
    assert p.stderr.splitlines()[-1] == "torch imported: False"


def test_console_script_runs_commands():
    p = run_console_script("plan", "--model", "llama-3.1-8b", "--context", "8k", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["context"] == 8192


def test_version(capsys):
    p = InProcess(capsys, "--version")
    assert p.returncode == 0 and p.stdout == f"longctx {longctx.__version__}\n"
    assert run_console_script("--version").stdout == f"longctx {longctx.__version__}\n"


def test_plan_help_lists_the_presets(capsys):
    from longctx.planner import PRESETS

    p = InProcess(capsys, "plan", "--help")
    assert p.returncode == 0
    text = " ".join(p.stdout.split())  # argparse wraps lines
    for name in PRESETS:
        assert name in text
    assert "h100, h200" in text


def test_bare_command_prints_the_help(capsys):
    p = InProcess(capsys)
    assert p.returncode == 2 and "usage: longctx" in p.stderr and "plan" in p.stderr


@pytest.mark.parametrize("gpus,transfers,on", [
    ("2", "1 transfer per layer", "on 2 GPUs"), ("4", "3 transfers per layer", "on 4 GPUs"),
    ("1", None, "on 1 GPU at"),
])
def test_plan_pluralizes(capsys, gpus, transfers, on):
    p = InProcess(capsys, "plan", "--model", "llama-3.1-8b", "--context", "32k", "--gpus", gpus)
    assert p.returncode == 0, p.stderr
    assert on in p.stdout and "GPU(s)" not in p.stdout
    if transfers:
        assert transfers in p.stdout
    assert "1 transfers" not in p.stdout


def test_info_short_is_one_line(capsys):
    p = InProcess(capsys, "info", "--short")
    assert p.returncode == 0
    assert p.stdout.count("\n") == 1
    line = p.stdout.strip()
    assert line.startswith(f"longctx {longctx.__version__}: ")
    assert "switches " in line and "kernels cpu: " in line and "rope" in line
    assert ("CPU-only build" in line) != longctx.build_info()["with_cuda"]


def test_info_shows_the_switches(capsys):
    p = InProcess(capsys, "info")
    assert f"  switches    {longctx.build_info()['switches']}\n" in p.stdout


# ------------------------------------------------------------------ the model's context (RoPE)


# Qwen2.5-7B-Instruct's config.json with the rope_scaling its model card says to add for 128K:
# max_position_embeddings stays 32,768, YaRN factor 4 over 32,768 makes it a 128K model.
QWEN25_7B_YARN_JSON = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
    "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 152064,
    "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"},
}


def test_plan_yarn_config_is_a_128k_model(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(QWEN25_7B_YARN_JSON))
    p = InProcess(capsys, "plan", "--model", str(path), "--context", "128k")
    assert p.returncode == 0, p.stderr
    assert "longer than the model" not in p.stdout
    assert ("max context 131,072 (128K) tokens of the model (yarn factor 4 x "
            "original_max_position_embeddings 32,768)") in p.stdout
    longer = InProcess(capsys, "plan", "--model", str(path), "--context", "256k")
    assert "the context (262,144) is longer than the model's (131,072, yarn factor 4" in (
        longer.stdout)
