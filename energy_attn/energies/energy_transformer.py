"""The Energy Transformer's attention energy (Hoover et al., 2023), value and closed form.

Per head ``h``, with queries and keys of the *same* tokens ``g`` (``Q_C = W_Q^h g_C``,
``K_B = W_K^h g_B``) and inverse temperature ``β``:

    E(g) = −(1/β) Σ_h Σ_C log Σ_{B≠C} exp(β ⟨K_B, Q_C⟩)

Every token is a query and a key, so the gradient flows through both:

    P_CB = softmax_{B≠C}(β ⟨K_B, Q_C⟩)
    ∂E/∂Q_C = −Σ_B P_CB K_B,      ∂E/∂K_B = −Σ_C P_CB Q_C
    ∇_g E = Σ_h (∂E/∂Q^h) W_Q^h + (∂E/∂K^h) W_K^h

The diagonal ``B = C`` is always excluded. An optional boolean ``mask`` (True = query ``C`` may
attend key ``B``) drops more pairs; a query with nothing to attend contributes 0. For padding
use ``pad[..., :, None] & pad[..., None, :]`` so padded tokens are neither queries nor keys:
then they do not influence the others at all.

Shapes: ``tokens [..., N, D]``, ``w_q``/``w_k`` ``[H, Y, D]`` (heads, head size, token size:
``nn.Linear``'s ``(out, in)`` order per head), ``mask`` broadcastable to ``[..., N, N]``.
Energies per token ``[..., N]`` (summed over heads), accumulated in float32 (float64 stays),
under ``torch.autocast`` too.
"""

from __future__ import annotations

import torch

from .._moments import acc_dtype, no_autocast
from .._utils import check_bool_mask, check_finite_number, check_float_tensor, exists


def _check(tokens, w_q, w_k, scale, mask):
    check_float_tensor("tokens", tokens)
    if tokens.dim() < 2:
        raise ValueError(f"tokens must be [..., N, D], got shape {tuple(tokens.shape)}")
    for name, w in (("w_q", w_q), ("w_k", w_k)):
        check_float_tensor(name, w, ndim=3)
        if w.shape[-1] != tokens.shape[-1]:
            raise ValueError(f"{name} must be [H, Y, D] with D = {tokens.shape[-1]} (the token "
                             f"size), got {tuple(w.shape)}")
        if w.device != tokens.device:
            raise ValueError(f"{name} is on {w.device} but tokens are on {tokens.device}")
    if w_q.shape != w_k.shape:
        raise ValueError(f"w_q and w_k must have one shape, got {tuple(w_q.shape)} and "
                         f"{tuple(w_k.shape)}")
    check_finite_number("scale", scale, positive=True, allow_tensor=True)
    if exists(mask):
        N = tokens.shape[-2]
        check_bool_mask("mask", mask, (*tokens.shape[:-2], N, N))
        if mask.device != tokens.device:
            raise ValueError(f"mask is on {mask.device} but tokens are on {tokens.device}")


def _attention(tokens, w_q, w_k, scale, mask):
    """Queries, keys ``[..., H, N, Y]``, attention ``P [..., H, N, N]``, row validity, logits."""
    N = tokens.shape[-2]
    allowed = ~torch.eye(N, dtype=torch.bool, device=tokens.device)
    dt = acc_dtype(tokens, w_q, w_k)
    g = tokens.to(dt)
    if exists(mask):
        allowed = allowed & mask.expand(*mask.shape[:-2], N, N)  # [..., N, N]
        # A token in no allowed pair (padding) is never read, but 0 · inf is NaN: zero it.
        used = allowed.any(dim=-1) | allowed.any(dim=-2)  # [..., N]
        g = torch.where(used.unsqueeze(-1), g, g.new_zeros(()))
        allowed = allowed.unsqueeze(-3)  # [..., 1, N, N]: one mask for every head
    with no_autocast(g):  # autocast would run the upcast products in 16 bits
        q = torch.einsum("...nd,hyd->...hny", g, w_q.to(dt))
        k = torch.einsum("...nd,hyd->...hny", g, w_k.to(dt))
        logits = scale * q @ k.transpose(-1, -2)  # [..., H, N(query C), N(key B)]
    logits = logits.masked_fill(~allowed, float("-inf"))
    valid = allowed.any(dim=-1, keepdim=True)  # [..., 1, N, 1]: queries with a key to attend
    logits = logits.masked_fill(~valid, 0.0)
    return q, k, logits, valid


def energy_transformer_energy(tokens, w_q, w_k, scale, mask=None):
    """Energy Transformer attention energy per token, ``[..., N]`` (see the module docstring).

    Args:
        tokens: ``g``, ``[..., N, D]``.
        w_q, w_k: query and key weights ``[H, Y, D]``.
        scale: inverse temperature ``β`` (> 0; the original uses ``Y ** -0.5``).
        mask: optional boolean, broadcastable to ``[..., N, N]``, True = query may attend key.

    Returns:
        ``E_C = −(1/β) Σ_h log Σ_{B≠C, allowed} exp(β ⟨K_B, Q_C⟩)`` per token ``C`` (0 for a
        token with nothing to attend); the global energy is their sum. Its closed-form
        gradient is :func:`energy_transformer_energy_grad` (attached as ``.gradient``).
    """
    _check(tokens, w_q, w_k, scale, mask)
    _, _, logits, valid = _attention(tokens, w_q, w_k, scale, mask)
    lse = torch.logsumexp(logits, dim=-1) * valid.squeeze(-1)  # [..., H, N]
    return -(lse / scale).sum(dim=-2)


def energy_transformer_energy_grad(tokens, w_q, w_k, scale, mask=None):
    """Closed-form ``∇_g E`` of the global energy (through queries *and* keys), ``[..., N, D]``.

    Same arguments as :func:`energy_transformer_energy`; returned in ``tokens``' dtype.
    Tokens that are neither queries nor keys (padding) get a zero gradient.
    """
    _check(tokens, w_q, w_k, scale, mask)
    return _grad(tokens, w_q, w_k, scale, mask)


def _grad(tokens, w_q, w_k, scale, mask=None):
    """:func:`energy_transformer_energy_grad` without input checks (for descent loops)."""
    q, k, logits, valid = _attention(tokens, w_q, w_k, scale, mask)
    p = logits.softmax(dim=-1) * valid  # [..., H, N, N]
    with no_autocast(p):
        d_q = -(p @ k)  # ∂E/∂Q_C = −Σ_B P_CB K_B
        d_k = -(p.transpose(-1, -2) @ q)  # ∂E/∂K_B = −Σ_C P_CB Q_C
        grad = torch.einsum("...hny,hyd->...nd", d_q, w_q.to(p.dtype))
        grad = grad + torch.einsum("...hny,hyd->...nd", d_k, w_k.to(p.dtype))
    return grad.to(tokens.dtype)


energy_transformer_energy.gradient = energy_transformer_energy_grad
