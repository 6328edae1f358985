"""energy_attn: a zoo of energy-based attention layers for PyTorch.

Attention is one gradient step on an energy; the layers here minimise that energy for T steps
with a chosen optimizer. See ``docs/math.md`` for every formula.
"""

from .descent import OPTIMIZERS, minimize_energy
from .energies import (
    elastic_energy,
    elastic_energy_grad,
    hopfield_energy,
    hopfield_energy_grad,
)
from .energies.energy_transformer import energy_transformer_energy, energy_transformer_energy_grad
from .layers import EnergyBasedAttention, VanillaSoftmaxAttention
from .layers.energy_transformer import EnergyTransformerAttention
from .layers.hopfield import Hopfield, HopfieldLayer, HopfieldPooling
from .ops import hopfield_descent

__version__ = "0.1.0"

__all__ = [
    "OPTIMIZERS",
    "EnergyBasedAttention",
    "VanillaSoftmaxAttention",
    "elastic_energy",
    "elastic_energy_grad",
    "hopfield_descent",
    "hopfield_energy",
    "hopfield_energy_grad",
    "minimize_energy",
    "Hopfield",
    "HopfieldLayer",
    "HopfieldPooling",
    "EnergyTransformerAttention",
    "energy_transformer_energy",
    "energy_transformer_energy_grad",
]
