"""energy_attn: a zoo of energy-based attention layers for PyTorch.

Attention is one gradient step on an energy; the layers here minimise that energy for T steps
with a chosen optimizer. See ``docs/math.md`` for every formula.
"""

from .descent import OPTIMIZERS, minimize_energy
from .energies import (
    elastic_energy,
    elastic_energy_grad,
    gated_linear_energy,
    hopfield_energy,
    hopfield_energy_grad,
    linear_energy,
)
from .energies.energy_transformer import energy_transformer_energy, energy_transformer_energy_grad
from .integrations import EnergyMultiheadAttention, swap_attention
from .layers import (
    MHA,
    EnergyBasedAttention,
    EnergyTransformerAttention,
    Hopfield,
    HopfieldLayer,
    HopfieldPooling,
    LightMHA2nd1st,
    LinearAttention,
    MHA2nd1st,
    MomenMHA,
    MultiHeadSelfAttention,
    NagMHA,
    OptimizerBlock,
    VanillaSoftmaxAttention,
)
from .models import GPT, GPTConfig
from .ops import hopfield_descent, linear_attention
from .optim import AttentionInformedAdam

__version__ = "0.1.0"

__all__ = [
    "OPTIMIZERS",
    "AttentionInformedAdam",
    "EnergyBasedAttention",
    "EnergyMultiheadAttention",
    "VanillaSoftmaxAttention",
    "elastic_energy",
    "elastic_energy_grad",
    "hopfield_descent",
    "hopfield_energy",
    "hopfield_energy_grad",
    "minimize_energy",
    "GPT",
    "GPTConfig",
    "LightMHA2nd1st",
    "MHA",
    "MHA2nd1st",
    "MomenMHA",
    "MultiHeadSelfAttention",
    "NagMHA",
    "OptimizerBlock",
    "LinearAttention",
    "gated_linear_energy",
    "linear_attention",
    "linear_energy",
    "Hopfield",
    "HopfieldLayer",
    "HopfieldPooling",
    "EnergyTransformerAttention",
    "energy_transformer_energy",
    "energy_transformer_energy_grad",
    "swap_attention",
]
