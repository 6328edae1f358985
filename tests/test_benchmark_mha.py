import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mha_cpu_benchmark_runs(tmp_path):
    out = tmp_path / "mha.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "mha_cpu.py"), "--quick", "--out", str(out)],
        check=False, capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["layer"] for r in rows] == ["nn.MultiheadAttention"] + [
        f"EnergyMultiheadAttention T={t}" for t in (1, 2, 4)]
    saved = [r["saved_for_backward_mib"] for r in rows]
    assert saved[1] <= saved[0] * 1.01 and saved[1] < saved[2] < saved[3]  # T=1 costs no more
    assert "machine:" in res.stdout
