"""The one computation behind every drop-in adapter: descend, then read out with the values.

``T − 1`` Hopfield descent steps move the queries ``ξ`` against the keys (docs/math.md §1, §10, via
:func:`energy_attn.ops.hopfield_descent`), then one softmax read-out with the values,

    ξ_0 = q,   ξ_{t+1} = step(ξ_t; K),   out = softmax(β ξ_{T−1} Kᵀ + b) V,

so ``T = 1`` is exactly scaled-dot-product attention. Adapters (``nn.MultiheadAttention``,
Hugging Face) convert their own mask conventions to a boolean ``mask`` (True = may attend) and
an optional finite additive ``bias`` once, then call :func:`descend_and_read_out`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._utils import exists
from ..ops.hopfield import hopfield_descent


def causal_mask(n: int, m: int, device) -> torch.Tensor:
    """``[n, m]`` boolean, True where key ``j <= i`` (top-left aligned, like SDPA)."""
    return torch.ones(n, m, dtype=torch.bool, device=device).tril()


def float_mask_to_bool(mask: torch.Tensor) -> torch.Tensor:
    """Additive float mask -> boolean (True = may attend): entries ``<= finfo.min`` (−inf or the
    dtype's most negative number, both used for "blocked") are blocked."""
    return mask > torch.finfo(mask.dtype).min


def descend_and_read_out(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    num_steps: int,
    step_size: float,
    optimizer: str,
    momentum: float,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    need_weights: bool = False,
):
    """``num_steps − 1`` descent steps of ``q`` on the keys, then ``softmax(β ξ Kᵀ + b) V``.

    Args:
        q: queries ``[B, H, N, D]``.
        k: keys ``[B, Hk, M, D]`` (``Hk`` divides ``H``: grouped-query heads).
        v: values ``[B, Hk, M, Dv]``.
        scale: ``β``. num_steps: ``T >= 1``. step_size, optimizer, momentum: the descent's.
        mask: boolean broadcastable to ``[B, H, N, M]``, True = may attend (or None).
        bias: finite additive logits broadcastable to ``[B, H, N, M]`` applied in the read-out
            only (the descent steps see ``mask``); 0 where ``mask`` is False.
        is_causal: key ``j <= i`` only (needs ``N == M``); combines with ``mask``.
        dropout_p: dropout on the read-out's attention weights (pass 0 in eval).
        need_weights: also return the read-out's attention weights ``[B, H, N, M]``.

    Returns:
        ``(out [B, H, N, Dv], weights [B, H, N, M] or None)``. Rows with no key to attend
        read out 0 (weights 0): finite, never NaN.
    """
    xi = q
    if num_steps > 1:
        xi = hopfield_descent(
            q, k, scale=scale, step_size=step_size, num_steps=num_steps - 1, mask=mask,
            is_causal=is_causal, optimizer=optimizer, momentum=momentum,
        )

    H, Hk = q.shape[1], k.shape[1]
    full = mask
    if is_causal and (exists(mask) or exists(bias) or need_weights):
        c = causal_mask(q.shape[2], k.shape[2], q.device)
        full = c if mask is None else mask & c
        is_causal = False
    # Fully masked rows would be NaN: let them attend all, then zero them (docs/math.md §1.3).
    valid = full.any(dim=-1, keepdim=True) if exists(full) else None
    allowed = full | ~valid if exists(full) else None

    if need_weights:
        if Hk != H:  # [B, Hk, M, D] -> [B, H, M, D]; head h reads group h // (H // Hk)
            k, v = (t.repeat_interleave(H // Hk, dim=1) for t in (k, v))
        logits = (xi * scale) @ k.transpose(-2, -1)  # [B, H, N, M]
        if exists(bias):
            logits = logits + bias
        if exists(allowed):
            logits = logits.masked_fill(~allowed, float("-inf"))
        weights = logits.softmax(dim=-1)
        if exists(valid):
            weights = weights * valid
        if dropout_p > 0:  # like nn.MultiheadAttention, the returned weights are the dropped ones
            weights = F.dropout(weights, p=dropout_p)
        return weights @ v, weights

    attn_mask = allowed
    if exists(bias):
        b = bias.to(q.dtype)
        attn_mask = b if allowed is None else b.masked_fill(~allowed, float("-inf"))
    out = F.scaled_dot_product_attention(
        xi, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=Hk != H,
    )
    return (out if valid is None else out * valid), None
