"""Optimizers: the attention-informed Adam (docs/math.md §6)."""

from .attention_informed import (
    AttentionInformedAdam,
    EnergyRecorder,
    attention_energy_stats,
    energy_modules,
)

__all__ = ["AttentionInformedAdam", "EnergyRecorder", "attention_energy_stats", "energy_modules"]
