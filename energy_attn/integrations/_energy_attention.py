"""The one computation behind every drop-in adapter: descend, then read out with the values.

``T − 1`` Hopfield descent steps move the queries ``ξ`` against the keys (docs/math.md §1, §10, via
:func:`energy_attn.ops.hopfield_descent`), then one softmax read-out with the values,

    ξ_0 = q,   ξ_{t+1} = step(ξ_t; K, b),   out = softmax(β ξ_{T−1} Kᵀ + b) V,

where ``b`` (an additive mask) is a logit bias of the energy, in every step and the read-out,

so ``T = 1`` is exactly scaled-dot-product attention. Adapters (``nn.MultiheadAttention``,
Hugging Face) convert their own mask conventions once, through :mod:`energy_attn.masks`, to the
canonical :class:`~energy_attn.masks.Masks`, then call :func:`descend_and_read_out`.
"""

from __future__ import annotations

import torch

from .. import masks
from ..masks import Masks
from ..ops.hopfield import hopfield_descent


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
    mask: Masks = Masks(),
    dropout_p: float = 0.0,
    need_weights: bool = False,
):
    """``num_steps − 1`` descent steps of ``q`` on the keys, then ``softmax(β ξ Kᵀ + b) V``.

    Args:
        q: queries ``[B, H, N, D]``.
        k: keys ``[B, Hk, M, D]`` (``Hk`` divides ``H``: grouped-query heads).
        v: values ``[B, Hk, M, Dv]``.
        scale: ``β``. num_steps: ``T >= 1``. step_size, optimizer, momentum: the descent's.
        mask: the canonical :class:`energy_attn.masks.Masks` (allowed ``[B|1, H|1, N|1, M]``
            bool, additive ``bias`` broadcastable to ``[B, H, N, M]``, ``is_causal``). The bias
            is a logit bias of the energy: it acts in every descent step and in the read-out
            (docs/math.md §1).
        dropout_p: dropout on the read-out's attention weights (pass 0 in eval).
        need_weights: also return the read-out's attention weights ``[B, H, N, M]``.

    Returns:
        ``(out [B, H, N, Dv], weights [B, H, N, M] or None)``. Rows with no key to attend
        read out 0 (weights 0): finite, never NaN.
    """
    xi = q
    if num_steps > 1:
        xi = hopfield_descent(
            q, k, scale=scale, step_size=step_size, num_steps=num_steps - 1,
            mask=masks.to_sdpa_mask(mask), is_causal=mask.is_causal, optimizer=optimizer,
            momentum=momentum,
        )

    H, Hk = q.shape[1], k.shape[1]
    if need_weights:
        if Hk != H:  # [B, Hk, M, D] -> [B, H, M, D]; head h reads group h // (H // Hk)
            k, v = (t.repeat_interleave(H // Hk, dim=1) for t in (k, v))
        logits = (xi * scale) @ k.transpose(-2, -1)  # [B, H, N, M]
        logits, valid = masks.logits_mask(logits, mask)
        weights = logits.softmax(dim=-1)
        if valid is not None:
            weights = weights * valid
        if dropout_p > 0:  # like nn.MultiheadAttention, the returned weights are the dropped ones
            weights = torch.nn.functional.dropout(weights, p=dropout_p)
        return weights @ v, weights

    attn_mask, valid, causal = masks.readout_args(mask, q.shape[2], k.shape[2], q.device)
    out = masks.sdpa(xi, k, v, attn_mask=attn_mask, valid=valid, dropout_p=dropout_p,
                     is_causal=causal, scale=scale, enable_gqa=Hk != H)
    return out, None
