"""The CPU benchmarks under benchmarks/ run, print their table and write JSON with its provenance
(machine, command, commit); bad arguments are refused with a message. No timing is asserted."""

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _load_machine():
    spec = importlib.util.spec_from_file_location("_machine", BENCH / "_machine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_machine = _load_machine()


def run(script, *args, env=None):
    """``python benchmarks/<script> args...`` from the repository root."""
    return subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env=env)


def load_results(path, script):
    """The JSON a benchmark wrote, after checking the provenance every result file carries."""
    data = json.loads(path.read_text())
    assert data["machine"]["cpu"] and data["machine"]["torch_threads"] >= 1
    assert len(data["machine"]["load_average"]) == 3
    assert data["command"].startswith(f"python benchmarks/{script} ")
    assert "commit" in data and data["date"].endswith("UTC")
    return data


def test_descent_cpu_benchmark_runs(tmp_path):
    out = tmp_path / "descent.json"
    res = run("descent_cpu.py", "--quick", "--out", out)
    assert res.returncode == 0, res.stderr
    data = load_results(out, "descent_cpu.py")
    assert {r["provider"] for r in data["rows"]} == {"reference", "autograd"}
    assert data["sizes"] == {"B": 1, "H": 2, "N": 128, "D": 32, "T": 2}
    assert "reference (SDPA)" in res.stdout and "machine:" in res.stdout


def test_fixed_point_memory_benchmark_runs(tmp_path):
    out = tmp_path / "fp.json"
    res = run("fixed_point_memory.py", "--quick", "--out", out)
    assert res.returncode == 0, res.stderr
    rows = load_results(out, "fixed_point_memory.py")["rows"]
    saved = {(r["solver"], r["T"]): r["saved_for_backward_mib"] for r in rows}
    assert saved[("fixed_point", 2)] == saved[("fixed_point", 8)]
    assert saved[("unrolled", 2)] < saved[("unrolled", 8)]
    assert "fixed_point" in res.stdout


def test_mha_cpu_benchmark_runs(tmp_path):
    out = tmp_path / "mha.json"
    res = run("mha_cpu.py", "--quick", "--out", out)
    assert res.returncode == 0, res.stderr
    rows = load_results(out, "mha_cpu.py")["rows"]
    assert [r["layer"] for r in rows] == ["nn.MultiheadAttention"] + [
        f"EnergyMultiheadAttention T={t}" for t in (1, 2, 4)]
    saved = [r["saved_for_backward_mib"] for r in rows]
    assert saved[1] <= saved[0] * 1.01 and saved[1] < saved[2] < saved[3]  # T=1 costs no more
    assert "machine:" in res.stdout


@pytest.mark.slow
def test_blocks_cpu_benchmark_runs(tmp_path):
    out = tmp_path / "blocks.json"
    res = run("blocks_cpu.py", "--batch", 1, "--seq", 8, "--d-model", 8, "--heads", 2, "--reps", 1,
              "--no-peak", "--out", out)
    assert res.returncode == 0, res.stderr
    data = load_results(out, "blocks_cpu.py")
    assert [r["block"] for r in data["rows"]] == ["MHA", "MomenMHA", "NagMHA", "MHA2nd1st",
                                                  "LightMHA2nd1st"]
    assert data["rows"][0]["time_x"] == 1.0 and all(r["flops"] > 0 for r in data["rows"])
    assert data["config"]["threads"] == 1 and "LightMHA2nd1st" in res.stdout


def test_optimizer_steps_benchmark_runs(tmp_path):
    out = tmp_path / "steps.json"
    res = run("optimizer_steps.py", "--quick", "--out", out)
    assert res.returncode == 0, res.stderr
    data = load_results(out, "optimizer_steps.py")
    assert len(data["rows"]) == 7 and {(r["beta"], r["eta"]) for r in data["rows"]} == {(1, 1)}
    assert {r["optimizer"] for r in data["rows"]} == {"gd", "momentum", "nesterov",
                                                      "newton_2nd1st", "newton_light"}
    assert all(1 <= r["median_steps"] <= 101 for r in data["rows"])
    assert res.stdout.startswith("# median steps")


def test_train_step_time_benchmark_runs(tmp_path):
    out = tmp_path / "steps.json"
    res = run("train_step_time.py", "--n-layer", 1, "--d-model", 16, "--context", 8, "--batch",
              2, "--steps", 1, "--repeats", 1, "--out", out)
    assert res.returncode == 0, res.stderr
    data = load_results(out, "train_step_time.py")
    assert data["rows"][0]["variant"] == "mha + adamw"
    assert data["rows"][0]["ratio_to_mha_adamw"] == 1.0 and len(data["rows"]) == 7
    assert data["args"]["d_model"] == 16 and "x mha+AdamW" in res.stdout


def test_hopfield_vs_hflayers_names_the_missing_dependency(tmp_path):
    (tmp_path / "hflayers.py").write_text("raise ImportError('not installed')\n")
    res = run("hopfield_vs_hflayers.py", "--quick", env={"PYTHONPATH": str(tmp_path)})
    assert res.returncode == 2 and "ml-jku/hopfield-layers" in res.stderr
    assert "PYTHONPATH" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("script, args, message", [
    ("descent_cpu.py", ["--quick", "--repeats", "0"], "--repeats: expected an integer >= 1"),
    ("mha_cpu.py", ["--quick", "--H", "3"], "--E (32) must be a multiple of --H (3)"),
    ("blocks_cpu.py", ["--reps", "0"], "--reps: expected an integer >= 1"),
    ("fixed_point_memory.py", ["--quick", "--device", "gpu"], "'gpu' is not a torch device"),
    ("train_step_time.py", ["--d-model", "10"], "must be a multiple of 4"),
    ("optimizer_steps.py", ["--quick", "--betas", "0"], "--betas: expected a number > 0"),
])
def test_bad_arguments_are_refused_with_a_message(script, args, message):
    res = run(script, *args)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


def quick_parser():
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=_machine.positive_int, default=1024)
    return ap


def test_quick_run_writes_only_where_told():
    """A smoke run must not replace the committed JSON the docs quote; a full run writes it."""
    args = _machine.cpu_script_args(quick_parser(), ["--quick"], "x.json", quick=dict(N=8))
    assert args.N == 8 and args.out is None
    args = _machine.cpu_script_args(quick_parser(), [], "x.json", quick=dict(N=8))
    assert args.N == 1024 and args.out == BENCH / "results" / "x.json"
    args = _machine.cpu_script_args(quick_parser(), ["--quick", "--out", "y.json"], "x.json",
                                    quick=dict(N=8))
    assert args.out == Path("y.json")


def test_quick_keeps_arguments_given_explicitly():
    args = _machine.cpu_script_args(quick_parser(), ["--N", "32", "--quick"], "x.json",
                                    quick=dict(N=8))
    assert args.N == 32


def test_write_results_skips_a_smoke_run(capsys):
    _machine.write_results(None, {"rows": []})
    assert "not written" in capsys.readouterr().out


def test_a_failed_measurement_shows_its_error():
    with pytest.raises(SystemExit) as err:
        _machine.run_child([sys.executable, "-c", "import sys; sys.exit('out of memory here')"])
    assert "out of memory here" in str(err.value) and "exit status 1" in str(err.value)


def test_kernel_benchmarks_record_their_command_and_commit():
    record = _machine.provenance()
    assert {"machine", "torch", "triton", "commit", "command"} <= set(record)
    assert record["command"].startswith("python ")


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "steps must be >= 1"),
    (["--grid", "lr=-1"], "lr must be a finite number >= 0"),
    (["--seeds", "0,a"], "--seeds '0,a': expected integers separated by commas"),
])
def test_digits_experiment_refuses_bad_arguments_before_any_run(tmp_path, args, message):
    res = run("experiments/digits.py", "--task", "vit", "--out", tmp_path, *args)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()


def test_commit_says_when_the_tree_differs_from_it(tmp_path, monkeypatch):
    monkeypatch.delenv("BENCH_COMMIT", raising=False)

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                       check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "a")
    clean = _machine.commit(tmp_path)
    assert clean and not clean.endswith("+dirty")
    (tmp_path / "a.py").write_text("x = 2\n")
    assert _machine.commit(tmp_path) == clean + "+dirty"
    monkeypatch.setenv("BENCH_COMMIT", "abc1234")
    assert _machine.commit(tmp_path) == "abc1234"
