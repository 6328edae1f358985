"""Fixtures shared by the training tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A ~6 kB text file (deterministic), its path as ``str``: one file, so the split is by
    bytes."""
    words = ("the energy of attention is a sum of log sum exp terms over keys and queries "
             "def step(x): return x - eta * grad(x)").split()
    picks = torch.randint(0, len(words), (1200,), generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(" ".join(words[i] for i in picks.tolist()))
    return str(path)
