"""Thin nn.Modules: projections -> rearrange -> op -> output map."""

from .attention import EnergyBasedAttention, VanillaSoftmaxAttention
from .hopfield import Hopfield, HopfieldLayer, HopfieldPooling

__all__ = [
    "EnergyBasedAttention",
    "VanillaSoftmaxAttention",
    "Hopfield",
    "HopfieldLayer",
    "HopfieldPooling",
]
