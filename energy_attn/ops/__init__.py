"""Functional entry points (SDPA layout ``[B, H, N, D]``) with backend dispatch."""

from .hopfield import BACKENDS, hopfield_descent

__all__ = ["BACKENDS", "hopfield_descent"]
