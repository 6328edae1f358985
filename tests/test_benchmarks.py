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
