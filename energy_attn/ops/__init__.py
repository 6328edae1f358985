"""Functional entry points (SDPA layout ``[B, H, N, D]``) with backend dispatch."""

from .hopfield import BACKENDS, hopfield_descent
from .linear import linear_attention

__all__ = ["BACKENDS", "hopfield_descent", "linear_attention"]
