"""``MultiHeadSelfAttention``: the one attention module every block and the GPT share.

One step ``a(x) = W_O · attend(W_Q x, W_K x, W_V x)``, where ``attend`` is, per head:

* ``second_order=None``: softmax attention ``μ = softmax(β QKᵀ) V`` through
  ``F.scaled_dot_product_attention`` (flash/efficient kernels, no N×N matrix saved).
* ``second_order="2nd1st"`` (MHA2nd1st, docs/math.md §5.2): with the same probabilities ``P``,
  ``r_i = μ_i − v_i`` (``v_i`` the token's own value) and ``S_ij = (v_j − μ_i)·r_i``,
  ``o = μ + γ_h (P ⊙ S) V``. ``P`` is built explicitly (one N×N matrix, like a math-path
  attention call, and the only one autograd keeps: ``S`` is recomputed in backward); the
  correction costs two more N×N×d matmuls (``R Vᵀ`` and ``(P⊙S) V``).
* ``second_order="light"`` (LightMHA2nd1st, docs/math.md §5.3): ``o = μ + γ_h (P(V⊙V) − μ⊙μ) ⊙ r``;
  ``μ`` and ``P(V⊙V)`` come from **one** SDPA call with values ``[V, V⊙V]`` (width 2d).

``γ_h = softplus(φ_h)`` per head (learnable) or a fixed non-negative buffer; ``γ = 0`` gives
plain attention exactly. Under dropout (training) the read-out is ``μ' = P'V`` with the kept,
rescaled probabilities ``P'``, as in attention, and the Newton step preconditions its residual
with the curvature of ``P`` itself: ``o = μ' + γ_h Σ_P (μ' − v)`` (``Σ_P`` the full or diagonal
covariance above). ``o`` is affine in ``P'``, so its mean over dropout draws is the eval output;
the covariance of ``P'`` (rows not summing to 1) is not shift-invariant and would grow with the
cube of a value offset. That costs a second N×N matrix (2nd1st) or a second SDPA call (light).

These Newton-inspired forms are this project's reading of Ren et al. (the paper's body was
unavailable; see ``docs/zoo.md``).

``attention="energy"`` makes the read-out follow ``num_steps − 1`` steps of energy descent of
the queries on the Hopfield energy against the keys (:func:`energy_attn.hopfield_descent`, any
optimizer of docs/math.md §4, §10); the last step reads out the values with the new queries. With
``num_steps=1`` it is plain attention exactly.

Masks are boolean, True = may attend, broadcastable to ``[B, H, N, N]``; fully masked rows
read out nothing (output 0, finite).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import masks
from .._moments import acc_dtype, centred, key_rows, moment_values, no_autocast
from .._utils import (
    check_bool_mask,
    check_finite_number,
    check_float_tensor,
    check_module_input,
    check_num_steps,
    check_step_size,
)
from ..descent import check_optimizer
from ..ops.hopfield import hopfield_descent
from ..optim.attention_informed import EnergyRecorder

SECOND_ORDER = (None, "2nd1st", "light")
# whether a torch.func transform is running (PyTorch offers no public query)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
ATTENTIONS = ("softmax", "energy")


def _newton_correction(p, vc, ms, r):
    """``Σ_i r_i = (P ⊙ S) V`` evaluated about the shift ``c`` as ``(P ⊙ S) V_c``.

    ``S_ij = (v_j − μ_i)·r_i = (v_cj − m_i)·r_i`` with ``v_c = v − c``, ``m = μ − c``; the
    rows of ``P`` sum to 1 (or are 0), so ``Σ_j P_ij S_ij = 0`` and ``c`` drops out. Shapes:
    ``p [.., N, N]``, ``vc, ms, r [.., N, d]``, all in the accumulation dtype.
    """
    return (p * (r @ vc.transpose(-1, -2) - (ms * r).sum(-1, keepdim=True))) @ vc


class ConstrainedScalars(nn.Module):
    """``n`` scalars in a constrained range: ``link(θ)`` learnable, or a fixed buffer.

    ``link`` is ``"sigmoid"`` (values in ``[0, 1)``; learnable needs ``(0, 1)``) or
    ``"softplus"`` (values ``>= 0``; learnable needs ``> 0``). A fixed value is stored as is,
    so a fixed 0 is exactly 0.
    """

    def __init__(self, name: str, init: float, n: int, link: str, learnable: bool):
        super().__init__()
        init = check_finite_number(name, init)
        lo_ok = init > 0 if learnable else init >= 0
        hi_ok = init < 1 if link == "sigmoid" else True
        if not (lo_ok and hi_ok):
            rng = {"sigmoid": ("(0, 1)", "[0, 1)"), "softplus": ("> 0", ">= 0")}[link]
            raise ValueError(
                f"{name} must be in {rng[0] if learnable else rng[1]} "
                f"({'learnable' if learnable else 'fixed'}), got {init}"
            )
        self.name, self.link, self.learnable, self.init = name, link, learnable, init
        if learnable:
            self.raw = nn.Parameter(torch.empty(n))
        else:
            self.register_buffer("fixed", torch.empty(n))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every scalar back to its initial value ``init`` (``raw = link⁻¹(init)``)."""
        init, link = self.init, self.link
        with torch.no_grad():
            if self.learnable:
                # softplus⁻¹(y) = log(eᵞ − 1) = y + log(1 − e⁻ʸ): no overflow for a large y
                self.raw.fill_(math.log(init / (1 - init)) if link == "sigmoid"
                               else init + math.log(-math.expm1(-init)))
            else:
                self.fixed.fill_(init)

    def forward(self) -> torch.Tensor:
        if not self.learnable:
            return self.fixed
        return torch.sigmoid(self.raw) if self.link == "sigmoid" else F.softplus(self.raw)

    def extra_repr(self) -> str:
        return f"{self.name}, init={self.init}, link={self.link}, learnable={self.learnable}"


class MultiHeadSelfAttention(EnergyRecorder, nn.Module):
    """Multi-head self-attention with optional Newton correction or energy-descent queries.

    Args:
        d_model: model width; ``d_model = n_head · d_head``.
        n_head: number of heads.
        dropout: attention-probability dropout (training only).
        bias: biases in the projections.
        second_order: ``None | "2nd1st" | "light"`` (see the module docstring).
        gamma: initial (or fixed) ``γ_h >= 0`` of the Newton correction (per head).
        learn_gamma: ``γ_h = softplus(φ_h)`` learnable (needs ``gamma > 0``), else a buffer.
        attention: ``"softmax"`` or ``"energy"`` (queries descend the Hopfield energy first).
        num_steps: energy attention: total steps ``T >= 1`` (``T − 1`` descent steps, then
            the read-out of the values).
        step_size, optimizer, momentum: the descent's ``η``, optimizer and ``ρ`` (docs/math.md §4).

    ``forward(x [B, N, d_model], mask=None, is_causal=False) -> [B, N, d_model]``; ``mask``
    boolean broadcastable to ``[B, n_head, N, N]``, True = may attend.

    It is an :class:`~energy_attn.optim.EnergyRecorder`: when a consumer (the
    attention-informed optimizer) switches recording on, each forward records the mean
    pre-softmax energy of the read-out's queries and keys (O(N·d) for causal or unmasked
    attention) and, on request, their free energy.
    """

    def __init__(self, d_model: int, n_head: int, *, dropout: float = 0.0, bias: bool = True,
                 second_order: str | None = None, gamma: float = 0.5, learn_gamma: bool = True,
                 attention: str = "softmax", num_steps: int = 1, step_size: float = 1.0,
                 optimizer: str = "gd", momentum: float = 0.0):
        super().__init__()
        d_model = check_num_steps(d_model, "d_model")
        n_head = check_num_steps(n_head, "n_head")
        if n_head < 1 or d_model < 1 or d_model % n_head:
            raise ValueError(
                f"d_model ({d_model}) must be a positive multiple of n_head ({n_head})")
        dropout = check_finite_number("dropout", dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if second_order not in SECOND_ORDER:
            raise ValueError(f"second_order must be one of {SECOND_ORDER}, got {second_order!r}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        num_steps = check_num_steps(num_steps)
        if num_steps < 1:
            raise ValueError("num_steps must be >= 1 (the last step reads out values), got 0")
        self.momentum = check_optimizer(optimizer, momentum)
        self.step_size = check_step_size(step_size)
        self.optimizer, self.num_steps, self.attention = optimizer, num_steps, attention
        self.d_model, self.n_head, self.d_head = d_model, n_head, d_model // n_head
        self.dropout, self.second_order = dropout, second_order
        self.to_qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.to_out = nn.Linear(d_model, d_model, bias=bias)
        self.gamma = (ConstrainedScalars("gamma", gamma, n_head, "softplus", learn_gamma)
                      if second_order else None)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        check_float_tensor("x", x, ndim=3)
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have last dim d_model={self.d_model}, got {tuple(x.shape)}")
        check_module_input(self, x=x)
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
        B, N, _ = x.shape
        if mask is not None:
            check_bool_mask("mask", mask, (B, self.n_head, N, N))
            if mask.device != x.device:
                raise ValueError(f"mask is on {mask.device} but x is on {x.device}")
        # [B, N, 3·d_model] -> 3 × [B, H, N, d_head]
        q, k, v = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d",
                            three=3, h=self.n_head)
        if self.attention == "energy" and self.num_steps > 1:
            q = hopfield_descent(q, k, step_size=self.step_size, num_steps=self.num_steps - 1,
                                 mask=mask, is_causal=is_causal, optimizer=self.optimizer,
                                 momentum=self.momentum)
        self.record_energy(q, k, self.d_head**-0.5, causal=is_causal, mask=mask)
        out = self.attend(q, k, v, mask, is_causal)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))

    def attend(self, q, k, v, mask=None, is_causal=False):
        """Per-head read-out ``[B, H, N, d]`` from ``q, k, v`` ``[B, H, N, d]`` (trusted)."""
        p_drop = self.dropout if self.training else 0.0
        if self.second_order == "2nd1st":
            return self._attend_2nd1st(q, k, v, mask, is_causal, p_drop)
        n = q.shape[-2]
        m = masks.from_allowed(mask, is_causal)
        attn_mask, valid, sdpa_causal = masks.readout_args(m, n, n, q.device)
        if self.second_order is None:
            return masks.sdpa(q, k, v, attn_mask=attn_mask, valid=valid, dropout_p=p_drop,
                              is_causal=sdpa_causal)
        # light: both moments from one float32 SDPA call about c, a mean of values every query
        # may see (docs/math.md §4, energy_attn/_moments.py: never square raw 16-bit values).
        allowed = None if mask is None else masks.full_allowed(m, n, n, q.device)
        vc, c = centred(v, *key_rows(allowed, is_causal, n, q.device))
        acc, d = vc.dtype, v.shape[-1]
        with no_autocast(vc):  # autocast would run the upcast SDPA calls in 16 bits
            q, k = q.to(acc), k.to(acc)
            out = masks.sdpa(q, k, moment_values(vc), attn_mask=attn_mask, valid=valid,
                             is_causal=sdpa_causal)
            if p_drop > 0:  # μ' − c = P'(V − c) + (ρ' − 1) c, ρ' the row sums of P' (ones)
                read = masks.sdpa(q, k, torch.cat([vc, vc.new_ones(vc.shape[:-1] + (1,))], -1),
                                  attn_mask=attn_mask, valid=valid, dropout_p=p_drop,
                                  is_causal=sdpa_causal)
        mc, m2 = out[..., :d], out[..., d:]  # Σ_j P_ij (v_j − c), Σ_j P_ij (v_j − c)²
        var = m2 - mc.square()  # diag Σ_P (P's rows sum to 1; fully masked rows: all 0)
        if p_drop > 0:
            mu = read[..., :d] + c * read[..., d:]
        else:
            mu = mc + c * (1.0 if valid is None else valid.to(acc))
        gamma = self.gamma().to(acc).view(-1, 1, 1)  # [H, 1, 1]
        return (mu + gamma * var * (mu - v.to(acc))).to(v.dtype)

    def _attend_2nd1st(self, q, k, v, mask, is_causal, p_drop):
        with no_autocast(v):  # autocast would run the upcast matmuls below in 16 bits
            return self._attend_2nd1st_acc(q, k, v, mask, is_causal, p_drop)

    def _attend_2nd1st_acc(self, q, k, v, mask, is_causal, p_drop):
        acc = acc_dtype(v)
        n = q.shape[-2]
        # P in float32 (logits of large keys must not round to 16 bits): the one N×N matrix
        # autograd keeps, as a math-path attention call does.
        logits = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, H, N, N]
        allowed = masks.full_allowed(masks.from_allowed(mask, is_causal), n, n, q.device)
        # blocked: −inf; fully masked rows: finite logits, valid False (zeroed below)
        logits, valid = masks.logits_mask(logits, masks.Masks(allowed))
        p = logits.softmax(dim=-1)
        if valid is not None:
            p = p * valid
        # About c, a mean of values every query may see (docs/math.md §4).
        vc, c = centred(v, *key_rows(allowed))
        ms = p @ vc + (0.0 if valid is None else c * (valid.to(acc) - 1.0))  # μ − c
        read = ms  # μ' − c: the read-out; under dropout P' (row sums ρ') in place of P
        if p_drop > 0:
            pd = F.dropout(p, p_drop)
            read = pd @ vc + c * (pd.sum(-1, keepdim=True) - 1.0)
        r = read - (v.to(acc) - c)  # μ' − v
        # S and P ⊙ S are recomputed in backward: autograd keeps P alone. Not under torch.func
        # transforms (grad, vjp, ...), which do not run checkpoint's saved-tensor hooks.
        if torch.is_grad_enabled() and (p.requires_grad or vc.requires_grad) and \
                not _functorch_active():
            corr = checkpoint(_newton_correction, p, vc, ms, r, use_reentrant=False)
        else:
            corr = _newton_correction(p, vc, ms, r)
        gamma = self.gamma().to(acc).view(-1, 1, 1)
        return (read + c + gamma * corr).to(v.dtype)

    def extra_repr(self) -> str:
        text = (f"d_model={self.d_model}, n_head={self.n_head}, dropout={self.dropout}, "
                f"second_order={self.second_order!r}, attention={self.attention!r}")
        if self.attention == "energy":
            text += (f", num_steps={self.num_steps}, step_size={self.step_size}, "
                     f"optimizer={self.optimizer!r}, momentum={self.momentum}")
        return text
