import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_blocks_cpu_benchmark_runs(tmp_path):
    out = tmp_path / "blocks.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "blocks_cpu.py"), "--batch", "1", "--seq", "8",
         "--d-model", "8", "--heads", "2", "--reps", "1", "--no-peak", "--out", str(out)],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert [r["block"] for r in data["rows"]] == ["MHA", "MomenMHA", "NagMHA", "MHA2nd1st",
                                                  "LightMHA2nd1st"]
    assert data["rows"][0]["time_x"] == 1.0 and all(r["flops"] > 0 for r in data["rows"])
    assert "cpu" in data["machine"] and "LightMHA2nd1st" in res.stdout
