"""The `longctx` command on bad input: every case below is answered by one line on stderr,
"longctx <command>: error: ...", naming what is wrong, and exit status 2 (docs/cli.md), never an
"internal error"; `bench --out` is checked before any benchmark runs."""
import json

import pytest

from test_cli import InProcess, assert_one_line_error
from test_plan import LLAMA31_8B_JSON

PLAN = ["plan", "--model", "llama-3.1-8b"]
DIGITS_400 = "9" * 400


@pytest.mark.parametrize("args,fragments", [
    (["--context", DIGITS_400], ["--context", "at most 1,099,511,627,776"]),
    (["--context", "1" + "0" * 5000], ["--context", "at most", "5,003 characters"]),
    (["--context", "1." + "0" * 5000 + "k"], ["--context", "too many digits"]),
    (["--context", "2048G"], ["--context", "at most"]),
    (["--context", "1e300"], ["--context", "cannot read"]),
    (["--context", "128k", "--gpu", "1e308"], ["--gpu", "up to 1,048,576"]),
    (["--context", "128k", "--gpu", "inf"], ["--gpu", "positive number of GiB"]),
    (["--context", "128k", "--gpu", "nan"], ["--gpu"]),
    (["--context", "128k", "--gpu", "1e-300"], ["--gpu"]),
    (["--context", "128k", "--reserve-gib", "inf"], ["--reserve-gib", "from 0 to"]),
    (["--context", "128k", "--reserve-gib", "nan"], ["--reserve-gib", "got nan"]),
    (["--context", "128k", "--reserve-gib", "-1"], ["--reserve-gib"]),
    (["--context", "128k", "--reserve-gib", "1e300"], ["--reserve-gib"]),
    (["--context", "128k", "--link-gbps", "inf"], ["--link-gbps"]),
    (["--context", "128k", "--link-gbps", "1e-320"], ["--link-gbps"]),
    (["--context", "128k", "--tflops", "1e308"], ["--tflops"]),
    (["--context", "128k", "--tflops", "-0"], ["--tflops"]),
    (["--context", "128k", "--batch", DIGITS_400], ["--batch", "from 1 to 2,147,483,647"]),
    (["--context", "128k", "--gpus", DIGITS_400], ["--gpus", "from 1 to 65,536"]),
    (["--context", "128k", "--gpus", "-3"], ["--gpus"]),
    (["--context", "128k", "--gpus", "1.5"], ["argument --gpus: invalid int value",
                                              "longctx plan --help"]),
    (["--context", "128k", "--kv-dtype", "fp4"], ["argument --kv-dtype: invalid choice"]),
    (["--context", "128k", "--bogus"], ["unrecognized arguments: --bogus"]),
])
def test_plan_option_out_of_range(capsys, args, fragments):
    assert_one_line_error(InProcess(capsys, *PLAN, *args), 2, *fragments)


def test_missing_required_option_is_one_line(capsys):
    assert_one_line_error(InProcess(capsys, "plan", "--model", "llama-3.1-8b"), 2,
                          "the following arguments are required: --context")


def _config_error(capsys, path, *fragments):
    assert_one_line_error(InProcess(capsys, "plan", "--model", str(path), "--context", "1k"), 2,
                          str(path), *fragments)


def test_config_not_utf8(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b'{"hidden_size": 4096, "name": "\xff\xfe"}')
    _config_error(capsys, path, "not UTF-8 text", "byte 0xff at offset 31")


def test_config_with_byte_order_mark_is_read(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(LLAMA31_8B_JSON).encode())
    assert InProcess(capsys, "plan", "--model", str(path), "--context", "1k").returncode == 0


def test_config_nested_100000_deep(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    _config_error(capsys, path, "nested too deeply")


def test_config_number_too_long(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"num_hidden_layers": ' + "9" * 5000 + "}")
    _config_error(capsys, path, "not a config.json", "4300 digits")


def test_config_too_large(capsys, tmp_path):
    path = tmp_path / "config.json"
    with open(path, "wb") as f:  # sparse: no 16 MiB written
        f.truncate((16 << 20) + 1)
    _config_error(capsys, path, "larger than 16 MiB")


@pytest.mark.parametrize("field,value,fragment", [
    ("num_hidden_layers", int("9" * 400), "positive integer up to 2^40"),
    ("vocab_size", 1e400, "positive integer up to 2^40"),  # json writes Infinity
    ("hidden_size", 1 << 41, "positive integer up to 2^40"),
    ("head_dim", 1 << 20, "head_dim"),
    ("rope_theta", float("nan"), "rope_theta"),
])
def test_config_field_out_of_range(capsys, tmp_path, field, value, fragment):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA31_8B_JSON, field: value}))
    _config_error(capsys, path, fragment)


def test_config_huge_head_dim_from_hidden_size(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA31_8B_JSON, "hidden_size": 1 << 30,
                                "num_attention_heads": 8, "num_key_value_heads": 8}))
    _config_error(capsys, path, "head_dim (134,217,728) must be at most 65,536")


def test_model_name_too_long_for_a_path(capsys):
    p = InProcess(capsys, "plan", "--model", "x" * 5000, "--context", "1k")
    assert_one_line_error(p, 2, "not a preset and not a usable path", "5,002 characters")
    assert len(p.stderr) < 300


def test_long_values_are_shortened_in_errors(capsys):
    p = InProcess(capsys, *PLAN, "--context", "x" * 5000)
    assert_one_line_error(p, 2, "--context", "cannot read", "5,002 characters")
    assert len(p.stderr) < 300


# ------------------------------------------------------------------------------------ bench


@pytest.mark.parametrize("make", [
    lambda tmp: tmp / "a_file" / "results",  # under a regular file
    lambda tmp: tmp / "a_file",  # a regular file itself
])
def test_bench_out_not_writable_fails_before_running(capsys, tmp_path, monkeypatch, make):
    from longctx.cli import bench_cpu

    (tmp_path / "a_file").write_text("")

    def must_not_run(*a, **k):
        raise AssertionError("a benchmark ran before --out was checked")

    monkeypatch.setattr(bench_cpu, "run_cpu_benchmarks", must_not_run)
    out = make(tmp_path)
    p = InProcess(capsys, "bench", "--quick", "--out", str(out), "--no-progress")
    assert_one_line_error(p, 2, f"--out {out}: cannot write results there")
    assert p.stdout == ""


def test_bench_out_check_leaves_nothing_behind(tmp_path):
    from longctx.cli.bench import check_out_dir

    out = tmp_path / "new" / "results"
    check_out_dir(out)
    assert out.is_dir() and list(out.iterdir()) == []
