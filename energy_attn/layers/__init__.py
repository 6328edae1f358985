"""Thin nn.Modules: projections -> rearrange -> op -> output map."""

from .attention import EnergyBasedAttention, VanillaSoftmaxAttention

__all__ = ["EnergyBasedAttention", "VanillaSoftmaxAttention"]
