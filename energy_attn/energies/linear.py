"""Linear and gated linear energies (Ren et al.; docs/math.md §3; the gating is this project's).

    F(ξ_i) = −(β/2) Σ_j w_ij (ξ_i·k_j)²          ∇F(ξ_i) = −β Σ_j w_ij (ξ_i·k_j) k_j

``w_ij`` is 1 for an unmasked pair and 0 otherwise; ``causal`` keeps ``j <= i``; per-token gates
``g_s ∈ [0, 1]`` decay a term by the gates between query and key:

    causal:      w_ij = Π_{s=j+1..i} g_s             (j <= i)
    non-causal:  w_ij = Π_{s=j+1..i} g_s (j <= i),   Π_{s=i+1..j} g_s (j > i)   [project's choice]

One GD step with η is ``ξ⁺ = ξ + ηβ Σ_j w_ij (ξ·k_j) k_j``: unnormalised (gated) linear attention
with values = keys; :func:`energy_attn.ops.linear_attention` is its untied form with its
prefix-sum (recurrent) evaluation ``S_t = g_t S_{t−1} + v_t k_tᵀ``, ``o_t = β S_t q_t``.
The energy is unbounded below (it is concave): descent grows ‖ξ‖, so use few steps.

Shapes: ``state`` ``[..., n, d]``, ``stored`` ``[..., m, d]``, ``mask`` boolean broadcastable to
``[..., n, m]`` (True = may attend), ``gates`` ``[..., n]`` (gated and ``causal`` need ``n == m``:
a gate belongs to a token). Energies are ``[..., n]`` in float32 (float64 stays float64).
"""

from __future__ import annotations

import torch

from .. import masks
from .._moments import acc_dtype, no_autocast
from .._utils import (
    broadcasts_to,
    check_bool_mask,
    check_finite_number,
    check_float_tensor,
    check_same_device,
    exists,
)
from .hopfield import _batch_shape, _check_patterns, _seen_keys


def gate_weights(gates: torch.Tensor, causal: bool) -> torch.Tensor:
    """Decay matrix ``γ [..., n, n]`` from per-token gates ``[..., n]`` (exact products).

    ``γ_ij = Π_{s=j+1..i} g_s`` for ``j <= i`` (an empty product is 1); for ``j > i`` it is
    ``Π_{s=i+1..j} g_s`` (non-causal) or 0 (causal).
    """
    n = gates.shape[-1]
    idx = torch.arange(n, device=gates.device)
    # a[..., s, j] = g_s if s > j else 1 ; cumprod over s gives Π_{j<s<=i} g_s at [i, j]
    after = idx[:, None] > idx[None, :]  # [s, j]
    a = torch.where(after, gates.unsqueeze(-1), torch.ones((), dtype=gates.dtype,
                                                          device=gates.device))
    lower = a.cumprod(dim=-2).tril()  # [..., i, j], j <= i
    if causal:
        return lower
    return lower + lower.transpose(-1, -2).triu(1)


def linear_weights(n: int, m: int, mask=None, causal: bool = False, gates=None,
                   dtype=torch.float32, device=None):
    """``w [..., n, m]`` of the module docstring, or None when every weight is 1."""
    w = None
    if exists(gates):
        w = gate_weights(gates.to(dtype), causal)
    elif causal:
        w = masks.causal(n, m, device).to(dtype)
    if exists(mask):
        w = mask.to(dtype) if w is None else w * mask
    return w


def _check(state, stored, scale, mask, gates, causal):
    _check_patterns(state, stored)
    check_finite_number("scale", scale, positive=True, allow_tensor=True)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    n, m = state.shape[-2], stored.shape[-2]
    batch = _batch_shape(state, stored)
    if (causal or exists(gates)) and n != m:
        raise ValueError(f"causal or gated linear energies need n == m, got n={n}, m={m}")
    if exists(mask):  # a weight of 0 or 1: an additive float mask has no meaning here
        check_bool_mask("mask", mask, (*batch, n, m))
    if exists(gates):
        check_float_tensor("gates", gates)
        if gates.shape[-1] != n or not broadcasts_to(gates.shape[:-1], batch):
            raise ValueError(f"gates must have shape [..., n] = {(*batch, n)} (or broadcast "
                             f"to it), got {tuple(gates.shape)}")
    check_same_device(state_patterns=state, mask=mask, gates=gates)


def _scores(state, stored, scale, mask, causal, gates):
    """``(w ⊙ ξKᵀ)`` in the accumulation dtype, plus the keys in that dtype."""
    _check(state, stored, scale, mask, gates, causal)
    dt = acc_dtype(state, stored)
    # Keys no query may attend (padding, or left by the mask only to queries causality
    # hides them from) have weight 0, but inf · 0 would be NaN: zero them.
    seen = masks.from_allowed(mask, causal) if exists(mask) else None
    keys = _seen_keys(state, stored, seen).to(dt)
    with no_autocast(state):  # autocast would run it in 16 bits again
        s = state.to(dt) @ keys.transpose(-1, -2)  # [..., n, m]
    w = linear_weights(s.shape[-2], s.shape[-1], mask, causal, gates, dt, s.device)
    return s, (s if w is None else s * w), keys


def linear_energy(state_patterns, stored_patterns, scale=1.0, mask=None, *, causal=False,
                  gates=None):
    """Unnormalised linear energy per state pattern, ``−(β/2) Σ_j w_ij (ξ_i·k_j)²``.

    Args:
        state_patterns: ``ξ`` ``[..., n, d]``.
        stored_patterns: keys ``[..., m, d]`` (held fixed).
        scale: inverse temperature ``β > 0`` (default 1, the paper's form).
        mask: optional boolean ``[..., n, m]``-broadcastable, True = may attend.
        causal: keep keys ``j <= i`` (needs ``n == m``).
        gates: optional per-token gates ``[..., n]`` in ``[0, 1]`` (see the module docstring);
            :func:`gated_linear_energy` is the same energy with gates required.

    Returns ``[..., n]``; closed-form gradient :func:`linear_energy_grad`.

    Raises:
        TypeError: a pattern or ``gates`` that is not a floating-point tensor; a non-boolean
            ``mask``; a non-bool ``causal``; a ``scale`` that is not a real number or float
            tensor.
        ValueError: a pattern with fewer than 2 dimensions; patterns that differ in ``d`` or
            whose batch dims do not broadcast; ``causal`` or ``gates`` with ``n != m``; a
            ``mask`` or ``gates`` of the wrong shape; inputs on different devices; a
            non-finite or non-positive ``scale``.
    """
    s, ws, _ = _scores(state_patterns, stored_patterns, scale, mask, causal, gates)
    return -0.5 * scale * (ws * s).sum(dim=-1)


def linear_energy_grad(state_patterns, stored_patterns, scale=1.0, mask=None, *, causal=False,
                       gates=None):
    """Closed-form ``∇F(ξ_i) = −β Σ_j w_ij (ξ_i·k_j) k_j``, ``[..., n, d]`` in ξ's dtype."""
    _, ws, keys = _scores(state_patterns, stored_patterns, scale, mask, causal, gates)
    with no_autocast(ws):
        return (-scale * (ws @ keys)).to(state_patterns.dtype)


def gated_linear_energy(state_patterns, stored_patterns, scale=1.0, mask=None, *, gates,
                        causal=True):
    """Gated linear energy ``−(β/2) Σ_j γ_ij (ξ_i·k_j)²`` (causal by default); see
    :func:`linear_energy` for the arguments. ``gates`` ``[..., n]`` is required."""
    if gates is None:
        raise ValueError("gated_linear_energy needs gates [..., n] (use linear_energy without)")
    return linear_energy(state_patterns, stored_patterns, scale, mask, causal=causal, gates=gates)


def gated_linear_energy_grad(state_patterns, stored_patterns, scale=1.0, mask=None, *, gates,
                             causal=True):
    """Closed-form gradient of :func:`gated_linear_energy`."""
    if gates is None:
        raise ValueError("gated_linear_energy needs gates [..., n] (use linear_energy without)")
    return linear_energy_grad(state_patterns, stored_patterns, scale, mask, causal=causal,
                              gates=gates)


# Closed forms that the descent engine discovers (also through functools.partial).
linear_energy.gradient = linear_energy_grad
gated_linear_energy.gradient = gated_linear_energy_grad
