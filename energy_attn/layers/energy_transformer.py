"""``EnergyTransformerAttention``: T descent steps on the Energy Transformer attention energy.

The tokens themselves are the iterate (Hoover et al., 2023): ``x_{t+1} = x_t − α ∇E(x_t)`` with
``E`` of :func:`energy_attn.energies.energy_transformer_energy` (queries and keys both computed
from the moving tokens), run by the package's one descent loop
(:func:`energy_attn.descent.descend`), so the other optimizers of docs/math.md §4.1 that need only a
gradient (momentum, Nesterov) work too. Defaults follow the original: ``T = 12``, ``α = 0.1``,
``β = dim_head ** -0.5``. This is the attention part of an Energy Transformer block only (no
Hopfield-network term). The attention energy of raw tokens is unbounded below (longer tokens
always lower it), so the plain descent lets tokens grow; ``normalize=True`` uses the original's
layer-norm dynamics instead: the energy is evaluated on ``g = LayerNorm(x)`` and the tokens move
by ``x ← x − α ∂E/∂g``, which still descends ``E(g(x))`` for small ``α`` because the layer
norm's Jacobian is symmetric positive semi-definite.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from .. import masks
from .._utils import (
    check_finite_number,
    check_float_tensor,
    check_module_input,
    check_num_steps,
    check_step_size,
    default,
    exists,
)
from ..descent import check_optimizer, descend
from ..energies.energy_transformer import _grad, energy_transformer_energy


class EnergyTransformerAttention(nn.Module):
    """Energy Transformer attention: descend the tokens on the ET attention energy.

    Args:
        dim: token size ``D``.
        heads: number of heads ``H``.
        dim_head: head size ``Y``.
        scale: inverse temperature ``β`` (default ``dim_head ** -0.5``).
        num_steps: default number of descent steps ``T`` (12).
        step_size: default step size ``α`` (0.1).
        optimizer, momentum: ``"gd" | "momentum" | "nesterov"`` and ``ρ`` (docs/math.md §4.1).
        normalize: evaluate the energy on ``LayerNorm(x)`` (no affine) and step the tokens along
            its gradient, as the original Energy Transformer (default False: the energy of the
            raw tokens, as specified).

    Parameters ``w_q``, ``w_k`` of shape ``[H, Y, D]`` (initialised ``N(0, 1/D)``, this
    project's choice).

    ``forward(x [B, N, D], mask=None, num_steps=None, step_size=None, return_energies=False)``:
    ``mask`` is a ``[B, N]`` boolean token mask, **True = real token** (False = padding: neither
    query nor key; it keeps its value and does not influence the others). Returns ``x_T``
    ``[B, N, D]``, or ``(x_T, energies)`` with the per-token energy of every iterate
    ``[B, N, T + 1]`` (float32, float64 for float64 ``x``; sum over tokens for the global
    energy; of ``LayerNorm(x_t)`` when ``normalize``).

    Raises:
        TypeError: non-int ``dim``/``heads``/``dim_head``/``num_steps``, non-bool
            ``normalize`` (constructor); ``x`` not a float tensor or of another dtype than the
            parameters, a ``mask`` that is not a boolean tensor (forward).
        ValueError: sizes below 1, an unknown ``optimizer``, ``momentum`` outside ``[0, 1)``, a
            non-finite or non-positive ``scale``, a negative or non-finite ``step_size``
            (constructor or forward); ``x`` not ``[B, N, dim]`` or on another device, a
            ``mask`` not of shape ``[B, N]`` or on another device (forward).
    """

    def __init__(self, dim, heads=1, dim_head=64, scale=None, num_steps=12, step_size=0.1,
                 optimizer="gd", momentum=0.0, normalize=False):
        super().__init__()
        for name, v in (("dim", dim), ("heads", heads), ("dim_head", dim_head)):
            if check_num_steps(v, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if optimizer not in ("gd", "momentum", "nesterov"):
            raise ValueError(f"optimizer must be 'gd', 'momentum' or 'nesterov' (the Newton "
                             f"directions are for fixed keys), got {optimizer!r}")
        self.momentum = check_optimizer(optimizer, momentum)
        self.optimizer = optimizer
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        self.normalize = normalize
        self.dim = dim
        self.scale = check_finite_number("scale", scale, positive=True) if exists(scale) \
            else dim_head**-0.5
        self.num_steps = check_num_steps(num_steps)
        self.step_size = check_step_size(step_size)
        self.heads, self.dim_head = heads, dim_head
        self.w_q = nn.Parameter(torch.empty(heads, dim_head, dim))
        self.w_k = nn.Parameter(torch.empty(heads, dim_head, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw ``w_q`` then ``w_k`` from ``N(0, 1/D)`` (the constructor's initialisation)."""
        for w in (self.w_q, self.w_k):
            nn.init.normal_(w, mean=0.0, std=self.dim**-0.5)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}, "
                f"scale={self.scale:.4g}, num_steps={self.num_steps}, step_size={self.step_size}, "
                f"optimizer={self.optimizer!r}, momentum={self.momentum}, "
                f"normalize={self.normalize}")

    def forward(self, x, mask=None, num_steps=None, step_size=None, return_energies=False):
        check_float_tensor("x", x, ndim=3)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dim dim={self.dim}, got {tuple(x.shape)}")
        check_module_input(self, x=x)
        pair = None
        if exists(mask):
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError("mask must be a boolean [B, N] tensor (True = real token)")
            if tuple(mask.shape) != tuple(x.shape[:2]):
                raise ValueError(f"mask must have shape [B, N] = {tuple(x.shape[:2])}, got "
                                 f"{tuple(mask.shape)}")
            if mask.device != x.device:
                raise ValueError(f"mask is on {mask.device} but x is on {x.device}")
            pair = masks.from_tokens(mask).allowed  # [B, N, N]: both real tokens
        num_steps = check_num_steps(default(num_steps, self.num_steps))
        step_size = check_step_size(default(step_size, self.step_size))

        def tokens(x):  # what the energy sees: the tokens, or their layer norm
            return F.layer_norm(x, x.shape[-1:]) if self.normalize else x

        def direction(x):
            return _grad(tokens(x), self.w_q, self.w_k, self.scale, pair)

        traj = defaultdict(list) if return_energies else None
        out = descend(direction, x, num_steps=num_steps, step_size=step_size,
                      optimizer=self.optimizer, momentum=self.momentum, trajectory=traj)
        if not return_energies:
            return out
        energies = torch.stack(
            [energy_transformer_energy(tokens(x), self.w_q, self.w_k, self.scale, pair)
             for x in traj["queries"]], dim=-1)
        return out, energies
