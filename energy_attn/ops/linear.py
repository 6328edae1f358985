"""``linear_attention``: unnormalised (gated) linear attention, the untied GD step of the linear
energies (docs/math.md §3; weights in :mod:`energy_attn.energies.linear`).

    o_i = β Σ_j w_ij (q_i·k_j) v_j

Two evaluations of the same sum:

* ``quadratic``: ``β (w ⊙ QKᵀ) V``, O(N·M·D) time, an N×M matrix; takes any mask.
* ``recurrent``: prefix sums, O(N·D·Dv) time and no N×M matrix —
  causal ``S_t = g_t S_{t−1} + v_t k_tᵀ, o_t = β S_t q_t``; non-causal ungated
  ``o = β Q (Kᵀ V)``; non-causal gated adds the mirror scan from the right.
  The causal/gated scans loop over tokens in Python (a readable reference, not a kernel).

``form="auto"`` uses ``recurrent`` for the non-causal ungated case without a mask (one matmul
pair) and ``quadratic`` otherwise.

Both run in float32 for 16-bit inputs (float64 stays float64; also under ``torch.autocast``)
and round once, at the output: the unscaled sums and the scan's state overflow float16 (to
``inf``, and ``inf · 0`` = NaN where a weight is 0) long before the output does, and a
16-bit scan state gains one rounding per token.
"""

from __future__ import annotations

import torch

from .. import masks
from .._moments import acc_dtype, no_autocast
from .._utils import check_bool_mask, check_finite_number, check_float_tensor, check_same_device
from ..energies.linear import linear_weights

FORMS = ("auto", "quadratic", "recurrent")


def _recurrent(q, k, v, scale, causal, gates):
    N = q.shape[-2]
    if (not causal and gates is None) or N == 0:  # (no tokens: nothing to scan)
        return scale * (q @ (k.transpose(-1, -2) @ v))  # [.., N, D] @ [.., D, Dv]

    def scan(order, include_self):
        s = q.new_zeros(*q.shape[:-2], v.shape[-1], q.shape[-1])  # S [.., Dv, D]
        out = [None] * N
        for t in order:
            if not include_self:  # right scan: S_t = g_{t+1} (v_{t+1} k_{t+1}ᵀ + S_{t+1})
                out[t] = s @ q[..., t, :, None]
            g = 1.0 if gates is None else gates[..., t, None, None]
            kv = v[..., t, :, None] * k[..., t, None, :]  # v_t k_tᵀ  [.., Dv, D]
            s = g * s + kv if include_self else g * (s + kv)
            if include_self:  # left scan: S_t = g_t S_{t−1} + v_t k_tᵀ
                out[t] = s @ q[..., t, :, None]
        return torch.stack(out, dim=-3)[..., 0]  # [.., N, Dv]

    o = scan(range(N), include_self=True)
    if not causal:
        o = o + scan(range(N - 1, -1, -1), include_self=False)
    return scale * o


def linear_attention(q, k, v, *, scale: float = 1.0, causal: bool = False, gates=None,
                     mask=None, form: str = "auto"):
    """Unnormalised (gated) linear attention ``o_i = β Σ_j w_ij (q_i·k_j) v_j``.

    Args:
        q: queries ``[B, H, N, D]``.
        k: keys ``[B, H, M, D]``; v: values ``[B, H, M, Dv]``; one dtype.
        scale: ``β > 0`` (default 1).
        causal: ``j <= i`` only (needs ``N == M``).
        gates: per-token gates ``[B, H, N]`` in ``[0, 1]`` (needs ``N == M``); a term is
            decayed by the gates between query and key (module docstring of
            :mod:`energy_attn.energies.linear`).
        mask: boolean, broadcastable to ``[B, H, N, M]``, True = may attend (quadratic form).
        form: ``"auto" | "quadratic" | "recurrent"``.

    Returns ``[B, H, N, Dv]`` in ``q``'s dtype (accumulated in float32). Fully masked rows
    give 0.

    Raises:
        TypeError: a non-float ``q``/``k``/``v``/``gates``, ``q``/``k``/``v`` of different
            dtypes, a non-boolean ``mask``, a non-bool ``causal``, a non-number ``scale``.
        ValueError: shapes as above violated, ``causal`` or ``gates`` with ``N != M``, inputs
            on different devices, a non-finite or non-positive ``scale``, an unknown ``form``,
            a ``mask`` with ``form="recurrent"``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t, ndim=4)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, N, D = q.shape
    M = k.shape[2]
    if k.shape[:2] != (B, H) or k.shape[-1] != D or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"expected k [B, H, M, D] and v [B, H, M, Dv] matching q "
                         f"{tuple(q.shape)}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    check_same_device(q=q, k=k, v=v, gates=gates, mask=mask)
    scale = check_finite_number("scale", scale, positive=True)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if (causal or gates is not None) and N != M:
        raise ValueError(f"causal or gated linear attention needs N == M, got N={N}, M={M}")
    if gates is not None:
        check_float_tensor("gates", gates, ndim=3)
        if tuple(gates.shape) != (B, H, N):
            raise ValueError(f"gates must have shape [B, H, N] = {(B, H, N)}, got "
                             f"{tuple(gates.shape)}")
    if mask is not None:
        check_bool_mask("mask", mask, (B, H, N, M))
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if form == "recurrent" and mask is not None:
        raise ValueError("form='recurrent' takes no mask (use causal/gates, or form='quadratic')")
    if form == "auto":
        form = "recurrent" if not causal and gates is None and mask is None else "quadratic"
    if mask is not None:  # keys no query may attend: weight 0, but inf · 0 would be NaN
        m = masks.from_allowed(mask, causal)  # causality hides keys too
        k, v = (masks.zero_unseen_keys(m, t) for t in (k, v))
    dt = acc_dtype(q)
    qa, ka, va = q.to(dt), k.to(dt), v.to(dt)
    gates = None if gates is None else gates.to(dt)
    with no_autocast(qa):  # autocast would run the products in 16 bits again
        if form == "recurrent":
            out = _recurrent(qa, ka, va, scale, causal, gates)
        else:
            w = linear_weights(N, M, mask, causal, gates, dt, q.device)
            s = qa @ ka.transpose(-1, -2)  # [B, H, N, M]
            out = scale * ((s if w is None else s * w) @ va)
    return out.to(q.dtype)
