"""The base install is lean: no Triton, and the package still imports and checks itself.

A fresh virtualenv (no system site-packages) gets torch, einops and numpy, then this package
built from a copy of the source tree with ``--no-deps``; Triton must be absent there while
``import energy_attn`` and ``energy-attn check`` work, and forcing ``backend="triton"`` names
the ``[kernels]`` extra. A dry-run install of the package into that venv must ask for nothing
else (its base requirements exclude Triton). About a minute, mostly unpacking torch.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "energy_attn", "energy_attn_kernels")


def run(*cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout}\n{out.stderr}"
    return out


@pytest.mark.slow
def test_base_install_has_no_triton_and_runs_check(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(env_dir)
    py = str(env_dir / "bin" / "python")
    pip = (sys.executable, "-m", "pip", "--python", py)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    run(*pip, "install", "-q", "torch==2.13.0", "einops", "numpy", env=env)
    run(*pip, "install", "-q", "--no-deps", str(src), env=env)

    # Everything the base requirements ask for is installed: a dry run wants only the package.
    run(*pip, "install", "-q", "--dry-run", "--report", str(tmp_path / "r.json"), str(src),
        env=env)
    wanted = [i["metadata"]["name"] for i in json.loads((tmp_path / "r.json").read_text())["install"]]
    assert wanted == ["energy-attn"], wanted

    code = ("import importlib.util, torch, energy_attn\n"
            "from energy_attn import hopfield_descent\n"
            "assert importlib.util.find_spec('triton') is None\n"
            "q = torch.randn(1, 2, 4, 8)\n"
            "assert hopfield_descent(q, q, num_steps=2).isfinite().all()\n"
            "try:\n"
            "    hopfield_descent(q, q, num_steps=2, backend='triton')\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    out = run(py, "-c", code, env=env, cwd=tmp_path)
    assert 'pip install "energy-attn[kernels]"' in out.stdout
    out = run(str(env_dir / "bin" / "energy-attn"), "check", env=env, cwd=tmp_path)
    assert re.search(r"\b[1-9]\d* passed, 0 failed", out.stdout), out.stdout


def test_without_triton_auto_falls_back_and_triton_names_the_extra():
    # Triton hidden in this process (sys.modules entry None): fast, runs in every suite.
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, energy_attn\n"
            "from energy_attn import hopfield_descent\n"
            "q = torch.randn(1, 2, 4, 8)\n"
            "ref = hopfield_descent(q, q, num_steps=2, backend='reference')\n"
            "assert torch.equal(hopfield_descent(q, q, num_steps=2), ref)\n"
            "try:\n"
            "    hopfield_descent(q, q, num_steps=2, backend='triton')\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    out = run(sys.executable, "-c", code, env=env, cwd=ROOT)
    assert 'Triton is not installed: pip install "energy-attn[kernels]"' in out.stdout
