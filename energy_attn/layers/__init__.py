"""Thin nn.Modules: projections -> rearrange -> op -> output map."""

from .attention import EnergyBasedAttention, VanillaSoftmaxAttention
from .energy_transformer import EnergyTransformerAttention
from .hopfield import Hopfield, HopfieldLayer, HopfieldPooling

__all__ = [
    "EnergyBasedAttention",
    "VanillaSoftmaxAttention",
    "EnergyTransformerAttention",
    "Hopfield",
    "HopfieldLayer",
    "HopfieldPooling",
]
