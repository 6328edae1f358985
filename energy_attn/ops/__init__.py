"""Functional entry points (SDPA layout ``[B, H, N, D]``) with backend dispatch."""

from .hopfield import BACKENDS, hopfield_descent, hopfield_fixed_point
from .linear import linear_attention

__all__ = ["BACKENDS", "hopfield_descent", "hopfield_fixed_point", "linear_attention"]
