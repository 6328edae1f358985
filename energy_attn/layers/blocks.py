"""Optimizer-inspired pre-norm transformer blocks (Ren et al.; docs/math.md §5).

The residual stream is the iterate and ``a_l(x) = MHA_l(LN(x))`` is layer ``l``'s step:

    mha          x_{l+½} = x_l + a_l(x_l)
    momen        m_l = ρ_l m_{l−1} + a_l(x_l);            x_{l+½} = x_l + m_l;   m_{−1} = 0
    nag          y_l = x_l + ρ_l m_{l−1};  m_l = ρ_l m_{l−1} + a_l(y_l);  x_{l+½} = x_l + m_l
    2nd1st       x_{l+½} = x_l + a_l(x_l), a_l with the full Newton correction (per head γ_h)
    light2nd1st  x_{l+½} = x_l + a_l(x_l), a_l with the diagonal Newton correction

followed by the plain FFN residual ``x_{l+1} = x_{l+½} + FFN(LN(x_{l+½}))``. One class,
:class:`OptimizerBlock`, parameterised by the variant; ``MHA``, ``MomenMHA``, ``NagMHA``,
``MHA2nd1st`` and ``LightMHA2nd1st`` are thin subclasses. ``ρ_l = sigmoid(θ_l)`` is learnable by
default (or fixed); ``γ_h = softplus(φ_h)`` per head. Every block's attention is one
:class:`~energy_attn.layers.self_attention.MultiHeadSelfAttention`. The concrete forms are this
project's reading of the paper (its body was unavailable).
"""

from __future__ import annotations

import torch
from torch import nn

from .._utils import (
    check_finite_number,
    check_float_tensor,
    check_module_input,
    check_positive_int,
)
from .self_attention import ConstrainedScalars, MultiHeadSelfAttention

VARIANTS = ("mha", "momen", "nag", "2nd1st", "light2nd1st")
_SECOND_ORDER = {"2nd1st": "2nd1st", "light2nd1st": "light"}


class FeedForward(nn.Sequential):
    """``Linear(d, ratio·d) → GELU → Linear(ratio·d, d) → Dropout``."""

    def __init__(self, d_model: int, mlp_ratio: int = 4, dropout: float = 0.0, bias: bool = True):
        mlp_ratio = check_positive_int("mlp_ratio", mlp_ratio)
        super().__init__(
            nn.Linear(d_model, mlp_ratio * d_model, bias=bias),
            nn.GELU(),
            nn.Linear(mlp_ratio * d_model, d_model, bias=bias),
            nn.Dropout(dropout),
        )


class OptimizerBlock(nn.Module):
    """A pre-norm transformer block whose attention residual follows an optimizer.

    Args:
        d_model, n_head: width and number of heads.
        variant: ``"mha" | "momen" | "nag" | "2nd1st" | "light2nd1st"`` (module docstring).
        dropout: dropout on attention probabilities and on both residual branches.
        mlp_ratio: FFN hidden width ``mlp_ratio · d_model``.
        bias: biases in linear maps.
        rho: momentum ``ρ`` (momen/nag): initial value in ``(0, 1)`` if ``learn_rho`` (then
            ``ρ = sigmoid(θ)``), else a fixed value in ``[0, 1)``.
        learn_rho: make ``ρ`` learnable (default True).
        gamma, learn_gamma: Newton variants: per-head ``γ_h`` (``softplus`` of a parameter if
            learnable, needs ``gamma > 0``; fixed ``>= 0`` otherwise).
        **attn_kwargs: forwarded to :class:`MultiHeadSelfAttention` (``attention="energy"``,
            ``num_steps``, ``step_size``, ``optimizer``, ``momentum``).

    ``forward(x [B, N, d_model], state=None, mask=None, is_causal=False) -> (x, state)``:
    ``state`` is the momentum buffer ``m_{l−1}`` ``[B, N, d_model]`` (None = zeros) for
    momen/nag and is passed through unchanged by the other variants.
    """

    def __init__(self, d_model: int, n_head: int, variant: str = "mha", *, dropout: float = 0.0,
                 mlp_ratio: int = 4, bias: bool = True, rho: float = 0.5, learn_rho: bool = True,
                 gamma: float = 0.5, learn_gamma: bool = True, **attn_kwargs):
        super().__init__()
        d_model = check_positive_int("d_model", d_model)  # before the LayerNorm is built
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        dropout = check_finite_number("dropout", dropout)
        self.variant = variant
        self.ln_attn = nn.LayerNorm(d_model, bias=bias)
        self.attn = MultiHeadSelfAttention(
            d_model, n_head, dropout=dropout, bias=bias,
            second_order=_SECOND_ORDER.get(variant), gamma=gamma, learn_gamma=learn_gamma,
            **attn_kwargs,
        )
        self.ln_ffn = nn.LayerNorm(d_model, bias=bias)
        self.ffn = FeedForward(d_model, mlp_ratio, dropout, bias)
        self.drop = nn.Dropout(dropout)
        self.rho = (ConstrainedScalars("rho", rho, 1, "sigmoid", learn_rho)
                    if variant in ("momen", "nag") else None)

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}"

    def step(self, x, mask=None, is_causal=False):
        """Layer ``l``'s attention step ``a_l(x) = MHA_l(LN(x))`` (with residual dropout)."""
        return self.drop(self.attn(self.ln_attn(x), mask=mask, is_causal=is_causal))

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, is_causal: bool = False):
        check_float_tensor("x", x, ndim=3)
        if x.shape[-1] != self.attn.d_model:
            raise ValueError(f"x must have last dim d_model={self.attn.d_model}, got "
                             f"{tuple(x.shape)}")
        if state is not None:
            check_float_tensor("state", state, ndim=3)
        check_module_input(self, x=x, state=state)
        if self.rho is None:
            x = x + self.step(x, mask, is_causal)
        else:
            if state is not None and state.shape != x.shape:
                raise ValueError(
                    f"state (momentum buffer) must have x's shape {tuple(x.shape)}, got "
                    f"{tuple(state.shape)}"
                )
            # m_{−1} = 0. Multiplying ρ by explicit zeros (exact: the result is unchanged) keeps
            # ρ in the graph with a zero gradient, so DDP sees every parameter used.
            state = torch.zeros_like(x) if state is None else state
            carried = self.rho().to(x.dtype) * state  # ρ_l m_{l−1}
            y = x if self.variant == "momen" else x + carried
            state = carried + self.step(y, mask, is_causal)
            x = x + state
        x = x + self.ffn(self.ln_ffn(x))
        return x, state


class MHA(OptimizerBlock):
    """Standard pre-norm block, ``x + a(x)`` (one GD step on F*). Args as
    :class:`OptimizerBlock` without ``variant``."""

    def __init__(self, d_model: int, n_head: int, **kwargs):
        super().__init__(d_model, n_head, "mha", **kwargs)


class MomenMHA(OptimizerBlock):
    """Heavy-ball block, ``m = ρ m_prev + a(x); x + m``. Args as :class:`OptimizerBlock`."""

    def __init__(self, d_model: int, n_head: int, **kwargs):
        super().__init__(d_model, n_head, "momen", **kwargs)


class NagMHA(OptimizerBlock):
    """Nesterov block, ``m = ρ m_prev + a(x + ρ m_prev); x + m``. Args as
    :class:`OptimizerBlock`."""

    def __init__(self, d_model: int, n_head: int, **kwargs):
        super().__init__(d_model, n_head, "nag", **kwargs)


class MHA2nd1st(OptimizerBlock):
    """Newton block (first Neumann term), ``o = μ + γ_h (P ⊙ S) V``. Args as
    :class:`OptimizerBlock`."""

    def __init__(self, d_model: int, n_head: int, **kwargs):
        super().__init__(d_model, n_head, "2nd1st", **kwargs)


class LightMHA2nd1st(OptimizerBlock):
    """Light (diagonal) Newton block, ``o = μ + γ_h (P(V⊙V) − μ⊙μ) ⊙ r``. Args as
    :class:`OptimizerBlock`."""

    def __init__(self, d_model: int, n_head: int, **kwargs):
        super().__init__(d_model, n_head, "light2nd1st", **kwargs)


BLOCKS = {"mha": MHA, "momen": MomenMHA, "nag": NagMHA, "2nd1st": MHA2nd1st,
          "light2nd1st": LightMHA2nd1st}
