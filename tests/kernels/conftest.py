"""Kernel tests run on CUDA when it is available, else on CPU through Triton's interpreter."""

import os

import pytest
import torch

# Must happen before triton or energy_attn.kernels is imported (tests/conftest.py does the same).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

kernels = pytest.importorskip("energy_attn.kernels.hopfield_descent")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def key_path_knobs(short: bool) -> dict:
    """Kernel-module settings that put both query-side kernels on the short-memory path
    (``short``), or every kernel on the streaming path, whatever the sizes."""
    if short:
        return {"SHORT_MAX_KEYS": 1 << 30, "SHORT_MEMORY_BYTES": 1 << 30,
                "DQ_SHORT_MIN_HEAD_DIM": 0}
    return {"SHORT_MAX_KEYS": 0}


@pytest.fixture(params=["short", "stream"])
def key_path(request, monkeypatch):
    """Run the test on the short-memory path (keys loaded once) and on the streaming path."""
    for name, value in key_path_knobs(request.param == "short").items():
        monkeypatch.setattr(kernels, name, value)
    return request.param


#: Under the interpreter, small tiles so that small test sizes cross tile boundaries (the
#: configuration space itself is exercised in test_tile_space.py). On a GPU the kernels run
#: as users get them: autotuned over the space.
SMALL_TILES = {name: (32, 32, 4, 1) for name in ("fwd", "dq", "dk", "dqk")}


@pytest.fixture(autouse=True)
def small_tiles_on_the_interpreter(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setattr(kernels, "FORCE_TILES", SMALL_TILES)
