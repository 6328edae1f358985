"""Energy attention as a drop-in ``torch.nn.MultiheadAttention``, and a model-wide swap.

:class:`EnergyMultiheadAttention` *is* an ``nn.MultiheadAttention`` (a subclass: same
constructor, same parameters and ``state_dict`` keys, same ``forward`` signature and returns);
only the attention itself changes: ``num_steps − 1`` Hopfield descent steps of the projected
queries against the projected keys, then the usual softmax read-out with the values. With
``num_steps=1`` it computes exactly what ``nn.MultiheadAttention`` computes.

:func:`swap_attention` replaces every ``nn.MultiheadAttention`` of a model in place, keeping
the very same parameter tensors (an optimizer built before the swap still updates them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .. import masks
from .._utils import (
    check_finite_number,
    check_float_tensor,
    check_module_input,
    check_num_steps,
    check_positive_int,
    check_step_size,
    exists,
)
from ..descent import check_optimizer
from ._energy_attention import descend_and_read_out


def _keep_energy_forward(module, args):
    """A no-op forward pre-hook. ``nn.TransformerEncoderLayer`` has an inference fast path
    (``torch._transformer_encoder_layer_fwd``) that reads the attention's weights and never
    calls its ``forward``; it is disabled for any layer holding a module with hooks, so this
    hook guarantees the energy forward always runs."""


def _check_energy_options(num_steps=2, step_size=1.0, optimizer="gd", momentum=0.0, scale=None):
    num_steps = check_num_steps(num_steps)
    if num_steps < 1:
        raise ValueError(
            f"num_steps must be >= 1 (num_steps=1 is standard attention), got {num_steps}")
    step_size = check_step_size(step_size)
    momentum = check_optimizer(optimizer, momentum)
    scale = check_finite_number("scale", scale, positive=True) if exists(scale) else None
    return {"num_steps": num_steps, "step_size": step_size, "optimizer": optimizer,
            "momentum": momentum, "scale": scale}


def _mha_mask(name: str, mask, shape: tuple[int, ...]) -> masks.Masks:
    """One nn.MultiheadAttention mask (bool True = blocked, or additive float) -> canonical,
    reshaped to ``shape``."""
    m = masks.from_user(name, mask, blocked=True)
    return masks.Masks(*(None if t is None else t.reshape(shape) for t in m[:2]))


class EnergyMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose queries first descend the Hopfield energy of the keys.

    Per head, with projected queries ``q`` (rows ``ξ``), keys ``K`` and values ``V``:
    ``num_steps − 1`` optimizer steps ``ξ ← ξ − η ∇E(ξ)``, ``E(ξ) = ½‖ξ‖² − (1/β) lse(β ξ Kᵀ)``
    (docs/math.md §1, §4, §10; an additive mask enters ``E`` as a logit bias), then
    ``softmax(β ξ Kᵀ + mask) V``. ``num_steps=1`` is exactly
    ``nn.MultiheadAttention``; a ``state_dict`` loads unchanged both ways.

    Args:
        embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
            batch_first, device, dtype: as ``nn.MultiheadAttention``.
        num_steps: ``T >= 1``; ``T − 1`` descent steps before the read-out.
        step_size: ``η`` of the descent steps.
        optimizer: ``"gd" | "momentum" | "nesterov" | "newton_2nd1st" | "newton_light"``.
        momentum: ``ρ`` in ``[0, 1)`` (momentum/Nesterov only).
        scale: ``β`` for the descent and the read-out; default ``head_dim ** -0.5`` (MHA's).

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` as ``nn.MultiheadAttention``: inputs
    ``[L, B, E]`` (``[B, L, E]`` with ``batch_first``, or unbatched ``[L, E]``), keys/values
    ``[S, B, kdim|vdim]``; ``key_padding_mask [B, S]`` and ``attn_mask [L, S] | [B·H, L, S]``,
    bool (True = blocked) or float (additive). ``is_causal=True`` with no ``attn_mask`` means
    the causal mask (nn.MultiheadAttention requires the mask as well).
    Returns ``(out [L, B, E], weights [B, L, S] | [B, H, L, S] | None)``: the weights are the
    final read-out's. A float mask is a logit bias of the energy (docs/math.md §1): it acts in
    every descent step and in the read-out, so ``−1e9`` above the diagonal is causal in every
    step, as in nn.MultiheadAttention; ``−inf`` and entries ``<= finfo.min`` block the key. A
    query with every key blocked reads out 0: finite (where nn.MultiheadAttention returns NaN).
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None, *, num_steps=2, step_size=1.0, optimizer="gd", momentum=0.0,
                 scale=None):
        embed_dim = check_positive_int("embed_dim", embed_dim)
        num_heads = check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        opts = _check_energy_options(num_steps, step_size, optimizer, momentum, scale)
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias,
                         add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, kdim=kdim,
                         vdim=vdim, batch_first=batch_first, device=device, dtype=dtype)
        self.num_steps, self.step_size = opts["num_steps"], opts["step_size"]
        self.optimizer, self.momentum = opts["optimizer"], opts["momentum"]
        self.scale = opts["scale"] if exists(opts["scale"]) else self.head_dim**-0.5
        self.register_forward_pre_hook(_keep_energy_forward)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, **energy_options) -> EnergyMultiheadAttention:
        """An energy version of ``mha`` that takes over its parameters and its ``out_proj``
        module as they are (the same objects: not copies; ``requires_grad``, a parametrization
        or hooks on ``out_proj`` included) and its training mode.

        Raises:
            TypeError: ``mha`` is not an ``nn.MultiheadAttention``, or a subclass with other
                parameters or submodules (e.g. ``torch.ao.nn.quantizable.MultiheadAttention``).
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout,
                  bias=mha.in_proj_bias is not None, add_bias_kv=mha.bias_k is not None,
                  add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim,
                  batch_first=mha.batch_first, device="meta", **energy_options)
        odd = sorted(set(new._parameters).symmetric_difference(mha._parameters)
                     | set(new._modules).symmetric_difference(mha._modules))
        if odd:
            cls_name = f"{type(mha).__module__}.{type(mha).__qualname__}"
            raise TypeError(f"mha is a {cls_name} whose parameters/submodules differ from "
                            f"nn.MultiheadAttention's in {odd}; only those can be taken over")
        for name, p in mha._parameters.items():  # same order: named_parameters() unchanged
            new.register_parameter(name, p)
        new.out_proj = mha.out_proj
        return new.train(mha.training)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}, "
                f"num_steps={self.num_steps}, step_size={self.step_size}, "
                f"optimizer={self.optimizer!r}, momentum={self.momentum}, scale={self.scale:.4g}")

    def _check_inputs(self, query, key, value):
        for name, t in (("query", query), ("key", key), ("value", value)):
            check_float_tensor(name, t)
            check_module_input(self, **{name: t})
            if t.is_nested:
                raise ValueError(
                    f"{name} is a nested tensor; energy attention takes padded tensors (build "
                    "nn.TransformerEncoder with enable_nested_tensor=False, as swap_attention does)"
                )
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"query, key and value must all be 3-D (batched) or 2-D (unbatched), got "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        if key.dtype != query.dtype or value.dtype != query.dtype:
            raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, "
                            f"{key.dtype}, {value.dtype}")
        for name, t, dim in (("query", query, self.embed_dim), ("key", key, self.kdim),
                             ("value", value, self.vdim)):
            if t.shape[-1] != dim:
                raise ValueError(f"{name} must have last dim {dim}, got {tuple(t.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key and value must share batch and length, got {tuple(key.shape)} "
                             f"and {tuple(value.shape)}")

    def _masks(self, key_padding_mask, attn_mask, is_causal, B, L, S, device) -> masks.Masks:
        """nn.MultiheadAttention's masks -> canonical (allowed ``[B|1, H|1, L, S']`` ...)."""
        H = self.num_heads
        m = masks.Masks()
        if exists(attn_mask):
            if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (L, S):
                shape = (1, 1, L, S)
            elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (B * H, L, S):
                shape = (B, H, L, S)
            else:
                raise ValueError(f"attn_mask must have shape (L, S) = {(L, S)} or (B*H, L, S) = "
                                 f"{(B * H, L, S)}, got {tuple(attn_mask.shape)}")
            m = _mha_mask("attn_mask", attn_mask, shape)
        if exists(key_padding_mask):
            if tuple(key_padding_mask.shape) != (B, S):
                raise ValueError(f"key_padding_mask must have shape (B, S) = {(B, S)}, got "
                                 f"{tuple(key_padding_mask.shape)}")
            m = masks.combine(m, _mha_mask("key_padding_mask", key_padding_mask, (B, 1, 1, S)))
        for name, t in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
            if exists(t) and t.device != device:
                raise ValueError(f"{name} is on {t.device} but query is on {device}")
        causal = bool(is_causal) and attn_mask is None  # with a mask, is_causal is only a hint
        if causal and L != S:
            raise ValueError(f"is_causal=True without attn_mask needs L == S, got L={L}, S={S}")
        extra = int(self.bias_k is not None) + int(self.add_zero_attn)
        if not extra:
            return masks.Masks(m.allowed, m.bias, causal)
        # The appended bias_k / zero keys may always be attended (as in nn.MHA): fold causality
        # over the S real keys first, then pad.
        allowed = masks.full_allowed(masks.Masks(m.allowed, None, causal), L, S, device)
        allowed = None if allowed is None else F.pad(allowed, (0, extra), value=True)
        bias = None if m.bias is None else F.pad(m.bias, (0, extra), value=0.0)
        return masks.Masks(allowed, bias, False)

    def _project(self, query, key, value, packed):
        """Input projections: ``[B, L, E] -> [B, L, E]`` (and ``[B, S, kdim|vdim] -> [B, S, E]``).

        ``packed`` (self-attention, one input tensor): one ``[E, 3E]`` matmul, as nn.MHA does.
        """
        E = self.embed_dim
        if packed:
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        b_q = b_k = b_v = None
        if exists(self.in_proj_bias):
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.split(E)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        self._check_inputs(query, key, value)
        for name, t in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if exists(t):
                masks._require_tensor(name, t)
        packed = self._qkv_same_embed_dim and query is key and key is value
        batched = query.dim() == 3
        if not batched:  # [L, E] -> [1, L, E]
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if exists(key_padding_mask):
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # [L, B, E] -> [B, L, E]
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, L, _ = query.shape
        S = key.shape[1]
        if key.shape[0] != B:
            raise ValueError(f"query and key must share the batch size, got {B} and {key.shape[0]}")
        mask = self._masks(key_padding_mask, attn_mask, is_causal, B, L, S, query.device)

        q, k, v = self._project(query, key, value, packed)
        if exists(self.bias_k):  # one learned key/value appended: [B, S, E] -> [B, S+1, E]
            k = torch.cat([k, self.bias_k.expand(B, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(B, 1, -1)], dim=1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.num_heads) for t in (q, k, v))
        if self.add_zero_attn:  # one zero key/value appended: [B, H, S', D] -> [B, H, S'+1, D]
            k, v = (F.pad(t, (0, 0, 0, 1)) for t in (k, v))

        out, weights = descend_and_read_out(
            q, k, v, scale=self.scale, num_steps=self.num_steps, step_size=self.step_size,
            optimizer=self.optimizer, momentum=self.momentum, mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            need_weights=need_weights,
        )
        out = self.out_proj(rearrange(out, "b h n d -> b n (h d)"))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)  # [B, L, E] -> [L, B, E]
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)  # [B, H, L, S] -> [B, L, S]
            if not batched:
                weights = weights.squeeze(0)
        return out, weights


def swap_attention(model: nn.Module, *, return_report: bool = False, **energy_options):
    """Replace every ``nn.MultiheadAttention`` in ``model`` by :class:`EnergyMultiheadAttention`.

    In place; each new module takes over the old one's parameters (the same objects,
    ``requires_grad`` included), its ``out_proj`` module and its training mode. It is a new
    module object: hooks or attributes set on the old ``nn.MultiheadAttention`` itself are not
    carried over (register them after the swap).
    ``nn.TransformerEncoder``\\ s holding a swapped layer get ``use_nested_tensor = False``
    (their inference fast path would otherwise bypass the attention's ``forward``).

    Args:
        model: any module (if it *is* an ``nn.MultiheadAttention``, the returned module is the
            replacement).
        return_report: also return the report: the qualified names of the replaced modules.
        **energy_options: ``num_steps``, ``step_size``, ``optimizer``, ``momentum``, ``scale``
            (see :class:`EnergyMultiheadAttention`).

    Returns:
        ``model``, or ``(model, replaced_names)`` with ``return_report=True``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, an unknown option, or an
            ``nn.MultiheadAttention`` subclass with other parameters (see
            :meth:`EnergyMultiheadAttention.from_mha`). ValueError: a bad option value.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_energy_options(**energy_options)  # fail early, even if nothing gets replaced

    def swappable(m):
        return isinstance(m, nn.MultiheadAttention) and not isinstance(m, EnergyMultiheadAttention)

    if swappable(model):
        model = EnergyMultiheadAttention.from_mha(model, **energy_options)
        return (model, [""]) if return_report else model
    replaced, new = [], {}  # new: id(old module) -> its replacement (a shared module stays shared)
    for name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent._modules.items()):  # duplicates included
            if swappable(child):
                if id(child) not in new:
                    new[id(child)] = EnergyMultiheadAttention.from_mha(child, **energy_options)
                setattr(parent, child_name, new[id(child)])
                replaced.append(f"{name}.{child_name}" if name else child_name)
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(
            isinstance(sub, EnergyMultiheadAttention) for sub in m.modules()
        ):
            m.use_nested_tensor = False
    return (model, replaced) if return_report else model
