"""``LinearAttention``: a thin multi-head layer on :func:`energy_attn.ops.linear_attention`.

``x [B, N, d_model] -> q, k, v (and gates) -> linear_attention -> W_O``. The unnormalised form
is one GD step on the linear energy (docs/math.md §3); ``gated=True`` adds per-head, per-token gates
``g = sigmoid(x W_g + b_g)`` (``S_t = g_t S_{t−1} + v_t k_tᵀ`` when causal).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .._utils import check_finite_number, check_float_tensor, check_module_input, check_num_steps
from ..ops.linear import FORMS, linear_attention


class LinearAttention(nn.Module):
    """Multi-head unnormalised (gated) linear attention.

    Args:
        d_model: width; ``d_model % n_head == 0``.
        n_head: number of heads.
        gated: learn per-token gates (a ``Linear(d_model, n_head)`` + sigmoid).
        scale: ``β`` (default ``d_head ** -0.5``, which keeps the unnormalised sums O(1)).
        form: ``"auto" | "quadratic" | "recurrent"`` (see :func:`linear_attention`).
        bias: biases in the projections.

    ``forward(x [B, N, d_model], mask=None, is_causal=False) -> [B, N, d_model]``; ``mask``
    boolean broadcastable to ``[B, n_head, N, N]``, True = may attend; ``x`` has the
    parameters' dtype and device (or is 16-bit under ``torch.autocast``); the attention sums
    accumulate in float32 (:func:`linear_attention`).

    Raises:
        TypeError: non-int ``d_model``/``n_head``, non-bool ``gated``, non-number ``scale``
            (constructor); ``x`` not a float tensor or of another dtype than the parameters, a
            non-boolean ``mask``, a non-bool ``is_causal`` (forward).
        ValueError: ``d_model`` not a positive multiple of ``n_head``, a non-finite or
            non-positive ``scale``, an unknown ``form`` (constructor); ``x`` not
            ``[B, N, d_model]`` or on another device, a ``mask`` that does not broadcast, a
            ``mask`` with ``form="recurrent"`` (forward).
    """

    def __init__(self, d_model: int, n_head: int, *, gated: bool = False,
                 scale: float | None = None, form: str = "auto", bias: bool = True):
        super().__init__()
        d_model = check_num_steps(d_model, "d_model")
        n_head = check_num_steps(n_head, "n_head")
        if n_head < 1 or d_model < 1 or d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be a positive multiple of n_head "
                             f"({n_head})")
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if not isinstance(gated, bool):
            raise TypeError(f"gated must be a bool, got {type(gated).__name__}")
        self.d_model, self.n_head, self.form = d_model, n_head, form
        d_head = d_model // n_head
        self.scale = (d_head**-0.5 if scale is None
                      else check_finite_number("scale", scale, positive=True))
        self.to_qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.to_gates = nn.Linear(d_model, n_head) if gated else None
        self.to_out = nn.Linear(d_model, d_model, bias=bias)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_head={self.n_head}, gated={self.to_gates is not None}, "
                f"scale={self.scale:.4g}, form={self.form!r}")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        check_float_tensor("x", x, ndim=3)
        check_module_input(self, x=x)
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have last dim d_model={self.d_model}, got {tuple(x.shape)}")
        # [B, N, 3·d_model] -> 3 × [B, H, N, d_head]
        q, k, v = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d",
                            three=3, h=self.n_head)
        gates = None
        if self.to_gates is not None:
            gates = rearrange(torch.sigmoid(self.to_gates(x)), "b n h -> b h n")
        out = linear_attention(q, k, v, scale=self.scale, causal=is_causal, gates=gates,
                               mask=mask, form=self.form)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))
