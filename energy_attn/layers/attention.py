"""The blog's two modules: explicit softmax attention and implicit energy-based attention.

Constructor and forward signatures follow the blog post (``[b, n, d]`` inputs, heads folded
into the batch with einops), so its code and ``load_state_dict(..., strict=False)`` between the
two modules work unchanged. Two blog details are kept on purpose: ``to_out`` is skipped for a
single head, and ``bare_attn`` disables every linear map.
"""

from __future__ import annotations

import functools

import torch
from einops import rearrange
from torch import nn

from .. import masks
from .._moments import centred, key_rows
from .._utils import (
    check_finite_number,
    check_float_tensor,
    check_module_input,
    check_positive_int,
    default,
    exists,
)
from ..descent import check_optimizer, minimize_energy
from ..energies.hopfield import elastic_energy, elastic_key_bias, hopfield_energy
from ..ops.hopfield import hopfield_descent


def _check_bare(heads, x, context):
    if heads != 1:
        raise ValueError(f"bare_attn=True needs heads=1, got heads={heads}")
    if exists(context) and x.shape[-1] != context.shape[-1]:
        raise ValueError(
            f"bare_attn=True needs x and context of one pattern size, got x {tuple(x.shape)} "
            f"and context {tuple(context.shape)}"
        )


def _check_forward(x, context, mask, query_dim, context_dim, bare_attn):
    check_float_tensor("x", x, ndim=3)
    if exists(context):
        check_float_tensor("context", context, ndim=3)
        if context.shape[0] != x.shape[0]:
            raise ValueError(
                f"x and context must share the batch size, got {tuple(x.shape)} and "
                f"{tuple(context.shape)}"
            )
        if context.device != x.device:
            raise ValueError(f"context is on {context.device} but x is on {x.device}")
    if not bare_attn:
        if x.shape[-1] != query_dim:
            raise ValueError(f"x must have last dim query_dim={query_dim}, got {tuple(x.shape)}")
        if exists(context) and context.shape[-1] != context_dim:
            raise ValueError(
                f"context must have last dim context_dim={context_dim}, got {tuple(context.shape)}"
            )
    if exists(mask):
        b, n = x.shape[:2]
        m = context.shape[1] if exists(context) else n
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a boolean tensor (True = may attend)")
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but x is on {x.device}")
        if tuple(mask.shape) not in ((b, m), (b, n, m)):
            raise ValueError(
                f"mask must have shape (b, m) = {(b, m)} (key padding) or (b, n, m) = "
                f"{(b, n, m)}, got {tuple(mask.shape)}"
            )


def _mask_to_bhnm(mask):
    """``(b, m)`` or ``(b, n, m)`` -> broadcastable ``[b, 1, n|1, m]`` (True = may attend)."""
    if mask is None:
        return None
    if mask.dim() == 2:
        return rearrange(mask, "b m -> b 1 1 m")
    return rearrange(mask, "b n m -> b 1 n m")


def _about_keys_centre(q, k, mask):
    """``(q − c, K − c, c)`` for descending the elastic energy on the fused op (docs/math.md
    §2.1): ``F*`` depends on ``ξ − k_j`` only and every optimizer step commutes with a
    translation, so descending ``q − c`` against ``K − c`` (key bias ``elastic_key_bias(K − c)``)
    and adding ``c`` back is exact for any ``c``, and so is the gradient (``c`` is detached).
    About the origin the logits ``β ξ·k − ½β‖k‖²`` subtract two terms of size ``β‖k‖²`` (float32
    outputs 0.1 off for patterns near 1000). ``c`` is the mean of the keys every query may
    attend, and keys no query may attend are set to 0 (:func:`energy_attn._moments.centred`),
    so a blocked key reaches no output; a query with an empty memory (``F* = ½‖ξ‖²``, not
    translation invariant) is not shifted (its ``c`` is 0). ``mask``: boolean
    ``[b, 1, n|1, m]`` (True = may attend) or None. The shifted patterns keep their dtype."""
    kc, c = centred(k, *key_rows(mask))
    if exists(mask):
        c = torch.where(mask.any(dim=-1, keepdim=True), c, 0.0)  # [b, h, n, d]
    return (q.to(c.dtype) - c).to(q.dtype), kc.to(k.dtype), c


class VanillaSoftmaxAttention(nn.Module):
    """Vanilla softmax attention (the blog's reference module).

    Args:
        query_dim: size of the input patterns ``x``.
        context_dim: size of the context patterns (default ``query_dim``).
        heads: number of heads; ``inner_dim = heads * dim_head``.
        dim_head: size of each head.
        scale: inverse temperature ``β`` (default ``dim_head ** -0.5``).

    ``forward(x [b, n, query_dim], context [b, m, context_dim] = x, mask [b, m] | [b, n, m]
    (True = may attend), scale=None, bare_attn=False) -> [b, n, query_dim]``. With
    ``bare_attn=True`` (single head) the patterns are used raw: ``softmax(β x cᵀ) c``.
    """

    def __init__(self, query_dim, context_dim=None, heads=1, dim_head=64, scale=None):
        super().__init__()
        query_dim, heads, dim_head = (check_positive_int(n, v) for n, v in (
            ("query_dim", query_dim), ("heads", heads), ("dim_head", dim_head)))
        context_dim = check_positive_int("context_dim", default(context_dim, query_dim))
        inner_dim = dim_head * heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, query_dim)
        self.heads, self.dim_head = heads, dim_head
        self.query_dim, self.context_dim = query_dim, context_dim
        self.scale = (check_finite_number("scale", scale, positive=True) if exists(scale)
                      else dim_head**-0.5)

    def extra_repr(self) -> str:
        return (f"query_dim={self.query_dim}, context_dim={self.context_dim}, heads={self.heads}, "
                f"dim_head={self.dim_head}, scale={self.scale:.4g}")

    def forward(self, x, context=None, mask=None, scale=None, bare_attn=False):
        _check_forward(x, context, mask, self.query_dim, self.context_dim, bare_attn)
        if not bare_attn:
            check_module_input(self, x=x, context=context)
        if bare_attn:
            _check_bare(self.heads, x, context)
        scale = check_finite_number("scale", scale, positive=True) if exists(scale) else self.scale
        context = default(context, x)
        q = x if bare_attn else self.to_q(x)
        k = context if bare_attn else self.to_k(context)
        v = context if bare_attn else self.to_v(context)
        h = self.heads
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=h) for t in (q, k, v))
        # fully masked rows read nothing (finite): see masks.readout_args
        attn_mask, valid, _ = masks.readout_args(masks.from_allowed(_mask_to_bhnm(mask)),
                                                 q.shape[-2], k.shape[-2], q.device)
        out = masks.sdpa(q, k, v, attn_mask=attn_mask, valid=valid, scale=scale)
        out = rearrange(out, "b h n d -> b n (h d)")
        return out if bare_attn or h == 1 else self.to_out(out)


class EnergyBasedAttention(nn.Module):
    """Implicit attention: descend an energy with respect to the queries (the blog's module).

    Args:
        query_dim, context_dim, heads, dim_head, scale: as :class:`VanillaSoftmaxAttention`
            (there is no ``to_v``: the descent reads out keys).
        energy_func: ``energy_func(state, stored, scale, mask=None) -> [..., n]``; default
            :func:`hopfield_energy`. Closed-form energies (``hopfield_energy``,
            ``elastic_energy``) run on the fused op :func:`hopfield_descent` (the elastic one
            about the keys' centre, docs/math.md §2.1); any other callable is descended with
            autograd like the blog.
        optimizer, momentum: default descent optimizer (docs/math.md §4), overridable per call.

    ``forward(x, context=None, mask=None, scale=None, bare_attn=False, step_size=1.0,
    num_steps=1, return_trajs=False, optimizer=None, momentum=None, self_consistent=False)``
    returns ``[b, n, query_dim]``, or with ``return_trajs`` the trajectory dict of
    :func:`minimize_energy` with heads folded into the batch (``(b h) n d``).

    ``self_consistent=True`` (self-attention only, ``context=None``): the stored patterns are
    the moving state patterns themselves (docs/math.md §1.4, the blog's footnote 3), and each step
    follows the true gradient of the global energy ``Σ_i E(ξ_i; Ξ)``. The state starts at the
    queries ``to_q(x)`` (``x`` itself with ``bare_attn``); ``to_k`` is not used.
    """

    def __init__(self, query_dim, context_dim=None, heads=1, dim_head=64, scale=None,
                 energy_func=None, optimizer="gd", momentum=0.0):
        super().__init__()
        query_dim, heads, dim_head = (check_positive_int(n, v) for n, v in (
            ("query_dim", query_dim), ("heads", heads), ("dim_head", dim_head)))
        context_dim = check_positive_int("context_dim", default(context_dim, query_dim))
        inner_dim = dim_head * heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, query_dim)
        if exists(energy_func) and not callable(energy_func):
            raise TypeError(f"energy_func must be callable, got {type(energy_func).__name__}")
        self.energy_func = default(energy_func, hopfield_energy)
        self.heads, self.dim_head = heads, dim_head
        self.query_dim, self.context_dim = query_dim, context_dim
        self.scale = (check_finite_number("scale", scale, positive=True) if exists(scale)
                      else dim_head**-0.5)
        self.momentum = check_optimizer(optimizer, momentum)
        self.optimizer = optimizer

    def extra_repr(self) -> str:
        f = self.energy_func
        name = getattr(f, "__name__", None) or type(f).__name__
        return (f"query_dim={self.query_dim}, context_dim={self.context_dim}, heads={self.heads}, "
                f"dim_head={self.dim_head}, scale={self.scale:.4g}, energy_func={name}, "
                f"optimizer={self.optimizer!r}, momentum={self.momentum}")

    def forward(self, x, context=None, mask=None, scale=None, bare_attn=False, step_size=1.0,
                num_steps=1, return_trajs=False, optimizer=None, momentum=None,
                self_consistent=False):
        _check_forward(x, context, mask, self.query_dim, self.context_dim, bare_attn)
        if not bare_attn:
            check_module_input(self, x=x, context=context)
        if self_consistent and exists(context):
            raise ValueError("self_consistent=True is self-attention: pass context=None")
        if bare_attn:
            _check_bare(self.heads, x, context)
        scale = check_finite_number("scale", scale, positive=True) if exists(scale) else self.scale
        optimizer = default(optimizer, self.optimizer)
        momentum = default(momentum, self.momentum if optimizer == self.optimizer else 0.0)
        context = default(context, x)
        q = x if bare_attn else self.to_q(x)
        k = q if self_consistent else context if bare_attn else self.to_k(context)
        h = self.heads

        if return_trajs or self_consistent or \
                self.energy_func not in (hopfield_energy, elastic_energy):
            # The blog's path: heads folded into the batch, any energy, full trajectories.
            q, k = (rearrange(t, "b n (h d) -> (b h) n d", h=h) for t in (q, k))
            k = None if self_consistent else k
            m = None
            if exists(mask):
                m = _mask_to_bhnm(mask).expand(-1, h, -1, -1)
                m = rearrange(m, "b h n m -> (b h) n m")
            out = minimize_energy(
                functools.partial(self.energy_func, scale=scale), q, k, mask=m,
                step_size=step_size, num_steps=num_steps, return_trajs=return_trajs,
                optimizer=optimizer, momentum=momentum, self_consistent=self_consistent,
            )
            if return_trajs:
                return out
            out = rearrange(out, "(b h) n d -> b n (h d)", h=h)
        else:
            q, k = (rearrange(t, "b n (h d) -> b h n d", h=h) for t in (q, k))
            mask = _mask_to_bhnm(mask)
            bias = c = None
            if self.energy_func is elastic_energy:
                q, k, c = _about_keys_centre(q, k, mask)
                bias = elastic_key_bias(k, scale)
            out = hopfield_descent(
                q, k, scale=scale, step_size=step_size, num_steps=num_steps,
                mask=mask, key_bias=bias, optimizer=optimizer, momentum=momentum,
            )
            if exists(c):
                out = (out + c).to(out.dtype)
            out = rearrange(out, "b h n d -> b n (h d)")
        return out if bare_attn or h == 1 else self.to_out(out)
