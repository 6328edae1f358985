import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_descent_cpu_benchmark_runs(tmp_path):
    out = tmp_path / "descent.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "descent_cpu.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert {r["provider"] for r in data["rows"]} == {"reference", "autograd"}
    assert "reference (SDPA)" in res.stdout


def test_fixed_point_memory_benchmark_runs(tmp_path):
    out = tmp_path / "fp.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fixed_point_memory.py"), "--quick", "--out",
         str(out)],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())["rows"]
    saved = {(r["solver"], r["T"]): r["saved_for_backward_mib"] for r in rows}
    assert saved[("fixed_point", 2)] == saved[("fixed_point", 8)]
    assert saved[("unrolled", 2)] < saved[("unrolled", 8)]
    assert "fixed_point" in res.stdout
