"""Shifted attention-weighted first and second moments, stable for 16-bit inputs.

The Newton steps (docs/math.md §4) and the Newton blocks (§5) need an attention-weighted
variance ``Σ_j p_ij x_j⊙x_j − μ_i⊙μ_i``. Formed from raw 16-bit values that one-pass form
cancels catastrophically (keys or values sharing an offset) and ``x⊙x`` overflows float16 for
``|x| > 256`` (masked-out rows included, since ``0 · inf = NaN``). The variance is
shift-invariant, so the callers

* shift by ``c``, the mean of the rows (keys) that every query with a non-empty memory may
  attend (float32 accumulation, float64 stays float64): a shift built from a key that some
  query may not see would carry that key into its output at rounding level, so causality stays
  exact (for a causal mask ``c`` is the first key; when no key is shared, ``c = 0``);
* zero the rows no query may use (garbage there is never read or squared);
* square and read out in float32: probabilities and values rounded to 16 bits would leave an
  error of ``2^-11·(k − c)²`` in the second moment, which the subtraction of ``(μ − c)²``
  exposes whenever a query attends a key far from ``c``.

``c`` is detached: the moments are exact identities in it. See docs/math.md §4.

Under ``torch.autocast`` a matmul, einsum or SDPA call runs in the autocast dtype whatever its
inputs' dtype, which would undo the upcast: the callers run the products they upcast inside
:func:`no_autocast`.
"""

from __future__ import annotations

import contextlib

import torch


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The accumulation dtype: float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def no_autocast(t: torch.Tensor):
    """A context in which ``torch.autocast`` is off on ``t``'s device (a no-op where it is off
    already): matmuls of operands upcast to :func:`acc_dtype` then really run in that dtype."""
    device_type = t.device.type
    if not autocast_on(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def autocast_on(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type``; False for a device type autocast
    does not know (``meta``), where ``torch.is_autocast_enabled`` raises."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def key_rows(allowed: torch.Tensor | None, is_causal: bool = False, m: int = 0, device=None):
    """``(used, shared)``, boolean ``[..., m, 1]`` or None (= every row).

    ``used``: rows some query may attend; ``shared``: rows every query that may attend anything
    may attend. ``allowed`` is the boolean ``[..., n, m]`` mask (True = may attend) with
    causality already folded in; pass ``allowed=None, is_causal=True, m, device`` for a purely
    causal mask (no N×M mask is built).
    """
    if allowed is None:
        if not is_causal:
            return None, None
        shared = torch.zeros(m, 1, dtype=torch.bool, device=device)
        shared[0] = True
        return None, shared
    valid = allowed.any(dim=-1, keepdim=True)  # [..., n, 1]
    used = allowed.any(dim=-2).unsqueeze(-1)
    shared = (allowed | ~valid).all(dim=-2).unsqueeze(-1)
    return used, shared


def centred(x: torch.Tensor, used: torch.Tensor | None = None,
            shared: torch.Tensor | None = None):
    """``(x_c, c)`` for ``x [..., m, d]``: ``c [..., 1, d]`` the mean of the ``shared`` rows
    (0 if there are none) and ``x_c = x − c`` with rows outside ``used`` set to 0, both in the
    accumulation dtype (see :func:`key_rows`; None = every row)."""
    xa = x.detach().to(acc_dtype(x))
    zero = xa.new_zeros(())
    if shared is None:
        c = xa.mean(dim=-2, keepdim=True)
    else:
        count = shared.sum(dim=-2, keepdim=True).clamp_min(1).to(xa.dtype)
        c = torch.where(shared, xa, zero).sum(dim=-2, keepdim=True) / count
    xc = x.to(xa.dtype) - c
    return (xc if used is None else torch.where(used, xc, zero)), c


def moment_values(xc: torch.Tensor) -> torch.Tensor:
    """Values ``[x_c, x_c⊙x_c]`` (accumulation dtype) for one attention read-out of both
    moments, ``[..., m, 2d]``."""
    return torch.cat([xc, xc.square()], dim=-1)
