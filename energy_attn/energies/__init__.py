"""Energy functions: one per file, each with its value and closed-form gradient."""

from .hopfield import (
    elastic_energy,
    elastic_energy_grad,
    elastic_key_bias,
    elastic_newton_direction,
    hopfield_energy,
    hopfield_energy_grad,
    hopfield_newton_direction,
)
from .linear import (
    gated_linear_energy,
    gated_linear_energy_grad,
    linear_energy,
    linear_energy_grad,
)

__all__ = [
    "elastic_energy",
    "elastic_energy_grad",
    "elastic_key_bias",
    "elastic_newton_direction",
    "hopfield_energy",
    "hopfield_energy_grad",
    "hopfield_newton_direction",
    "gated_linear_energy",
    "gated_linear_energy_grad",
    "linear_energy",
    "linear_energy_grad",
]
