"""Shared test helpers (import as ``from helpers import tol``; ``tests/`` is on sys.path)."""

import torch


def tol(dtype):
    """(atol, rtol) for comparing two computations that each round in ``dtype``."""
    eps = torch.finfo(dtype).eps
    return 16 * eps, 16 * eps
