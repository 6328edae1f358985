import subprocess
import sys

import pytest

from energy_attn.checks import run_checks
from energy_attn.cli import main


def test_check_command_passes_and_prints_table(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "bare cross-attention" in out and "FAIL" not in out and "7 passed, 0 failed" in out


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_check_other_dtypes(dtype, capsys):
    assert main(["check", "--dtype", dtype, "--seed", "1"]) == 0


def test_checks_fail_when_broken(monkeypatch):
    # A wrong step (values halved) must make the equivalence checks fail, not pass silently.
    import energy_attn.layers.attention as attn

    real = attn.hopfield_descent
    monkeypatch.setattr(attn, "hopfield_descent", lambda *a, **k: 0.5 * real(*a, **k))
    results = run_checks()
    assert not all(r.passed for r in results)


def test_console_script_and_bad_args():
    res = subprocess.run([sys.executable, "-m", "energy_attn.cli", "check", "--dtype", "int8"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "--dtype" in res.stderr
    res = subprocess.run([sys.executable, "-m", "energy_attn.cli"], capture_output=True, text=True)
    assert res.returncode == 2 and "check" in res.stdout
