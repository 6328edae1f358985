"""Thin nn.Modules: projections -> rearrange -> op -> output map."""

from .attention import EnergyBasedAttention, VanillaSoftmaxAttention
from .blocks import (
    MHA,
    LightMHA2nd1st,
    MHA2nd1st,
    MomenMHA,
    NagMHA,
    OptimizerBlock,
)
from .linear import LinearAttention
from .self_attention import MultiHeadSelfAttention

__all__ = [
    "MHA",
    "EnergyBasedAttention",
    "LightMHA2nd1st",
    "LinearAttention",
    "MHA2nd1st",
    "MomenMHA",
    "MultiHeadSelfAttention",
    "NagMHA",
    "OptimizerBlock",
    "VanillaSoftmaxAttention",
]
