"""The one owner of mask semantics: every user convention in, one canonical form out.

Users write masks in several conventions; each is one function here, and everything else in the
package (ops, layers, adapters, kernels) consumes the canonical form :class:`Masks`:

* ``allowed``: boolean, broadcastable to ``[B, H, N, M]``, **True = may attend** (SDPA's
  convention), or None (every key allowed). Causality is *not* folded in.
* ``bias``: a finite additive logit bias ``b_ij`` broadcastable to ``[B, H, N, M]`` (0 wherever
  ``allowed`` is False), or None.
* ``is_causal``: query ``i`` may attend key ``j <= i`` (top-left aligned, like SDPA).

Conventions (docs/zoo.md, "Masks"):

* :func:`from_allowed`: boolean, True = may attend (SDPA, this package's ops and layers).
* :func:`from_blocked`: boolean, True = blocked (``nn.MultiheadAttention``, hopfield-layers).
* :func:`from_additive`: float, added to the logits (``nn.MultiheadAttention`` and SDPA float
  masks, Hugging Face 4-D masks). An additive mask is a logit bias *in the energy*
  ``E(ξ_i) = ½‖ξ_i‖² − (1/β) log Σ_j exp(β ξ_i·k_j + b_ij)`` (docs/math.md §1), so it acts in
  every descent step and in the read-out alike. ``−inf`` and any entry at or below the mask
  dtype's lowest finite value (``finfo.min``, which users write for "blocked") block the key;
  any other entry (``−1e4``, ``−1e9``) weighs the key down by exactly that much.

A query with every key blocked has an empty memory: its read-out is 0 and everything stays
finite (docs/math.md §1). :func:`sdpa` is the one call of ``F.scaled_dot_product_attention``
in the package; it enforces what CUDA's SDPA backends impose on masks (see there).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._utils import broadcasts_to

__all__ = [
    "Masks",
    "as_masks",
    "causal",
    "check",
    "combine",
    "from_additive",
    "from_allowed",
    "from_blocked",
    "from_tokens",
    "from_user",
    "full_allowed",
    "is_key_padding",
    "key_padding",
    "logits_mask",
    "readout_args",
    "sdpa",
    "sdpa_keys",
    "sdpa_mask",
    "to_sdpa_mask",
    "with_key_bias",
]


class Masks(NamedTuple):
    """The canonical form (see the module docstring)."""

    allowed: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    is_causal: bool = False


def _require_tensor(name: str, mask) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")


def from_allowed(mask: torch.Tensor | None, is_causal: bool = False) -> Masks:
    """Boolean mask, True = may attend (SDPA's convention)."""
    return Masks(mask, None, is_causal)


def from_blocked(mask: torch.Tensor | None, is_causal: bool = False) -> Masks:
    """Boolean mask, True = blocked (``nn.MultiheadAttention``'s and hopfield-layers')."""
    return Masks(None if mask is None else ~mask, None, is_causal)


def from_additive(mask: torch.Tensor, is_causal: bool = False) -> Masks:
    """Additive float mask -> allowed (``mask > finfo.min``) and the finite bias.

    ``−inf``, ``finfo(mask.dtype).min`` and anything below it block the key (so does a NaN
    entry: it is never read); the remaining entries are kept as a finite logit bias (0 where
    blocked; ``+inf``, the limit of a key that outweighs all others, is the largest finite value).
    """
    allowed = mask > torch.finfo(mask.dtype).min
    bias = mask.masked_fill(~allowed, 0.0).clamp(max=torch.finfo(mask.dtype).max)
    return Masks(allowed, bias, is_causal)


def from_tokens(mask: torch.Tensor) -> Masks:
    """Boolean token mask ``[B, N]``, True = real token (the Energy Transformer's): a pair may
    interact when both are real tokens, ``allowed [B, N, N]``."""
    return Masks(mask.unsqueeze(-1) & mask.unsqueeze(-2), None, False)


def from_user(name: str, mask, *, blocked: bool = False, is_causal: bool = False) -> Masks:
    """Any user mask -> :class:`Masks`: float masks are additive; boolean ones are True = may
    attend, or True = blocked with ``blocked=True``. Raises ``TypeError`` naming ``name``."""
    if mask is None:
        return Masks(None, None, is_causal)
    _require_tensor(name, mask)
    if mask.dtype == torch.bool:
        return (from_blocked if blocked else from_allowed)(mask, is_causal)
    if mask.is_floating_point():
        return from_additive(mask, is_causal)
    meaning = "True = blocked" if blocked else "True = may attend"
    raise TypeError(f"{name} must be a bool ({meaning}) or floating-point (additive) mask, "
                    f"got {mask.dtype}")


def check(name: str, mask, target_shape: tuple[int, ...]) -> None:
    """``mask`` is a bool or float tensor broadcastable to ``target_shape`` (ValueError/TypeError
    naming ``name`` otherwise). Values are not inspected (that would sync with the host)."""
    _require_tensor(name, mask)
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be bool (True = may attend) or floating-point (additive), "
                        f"got {mask.dtype}")
    if not broadcasts_to(mask.shape, target_shape):
        raise ValueError(
            f"{name} of shape {tuple(mask.shape)} is not broadcastable to {tuple(target_shape)}"
        )


def causal(n: int, m: int, device) -> torch.Tensor:
    """``[n, m]`` boolean, True where key ``j <= i`` (top-left aligned, like SDPA)."""
    return torch.ones(n, m, dtype=torch.bool, device=device).tril()


def _and(a, b):
    return b if a is None else a if b is None else a & b


def combine(*masks: Masks) -> Masks:
    """Intersection of the allowed sets, sum of the biases, causal if any is. A sum of finite
    biases that reaches ``finfo.min`` (or overflows to ``−inf``) blocks its key."""
    out = Masks()
    for m in masks:
        allowed, bias = _and(out.allowed, m.allowed), m.bias
        if out.bias is not None and m.bias is not None:
            summed = from_additive(out.bias + m.bias)
            allowed, bias = _and(allowed, summed.allowed), summed.bias
        elif bias is None:
            bias = out.bias
        out = Masks(allowed, bias, out.is_causal or m.is_causal)
    return out


def full_allowed(m: Masks, n: int, k: int, device) -> torch.Tensor | None:
    """``allowed`` with causality folded in (True = may attend); None if neither."""
    return _and(m.allowed, causal(n, k, device)) if m.is_causal else m.allowed


def to_sdpa_mask(m: Masks) -> torch.Tensor | None:
    """One SDPA-convention tensor for a public ``mask`` argument (causality not included):
    the boolean ``allowed`` if there is no bias, else the float bias with ``−inf`` where
    blocked."""
    if m.bias is None:
        return m.allowed
    return m.bias if m.allowed is None else m.bias.masked_fill(~m.allowed, float("-inf"))


def with_key_bias(m: Masks, key_bias: torch.Tensor | None) -> Masks:
    """Add a per-key bias ``[B, H, M]`` as ``b_ij = b_j`` (docs/math.md §2). It is an additive
    mask: ``−inf`` (or ``<= finfo.min``) there blocks the key, as in :func:`from_additive`."""
    return m if key_bias is None else combine(m, from_additive(key_bias.unsqueeze(-2)))


def zero_unseen_keys(m: Masks, k: torch.Tensor) -> torch.Tensor:
    """``k [B, Hk, M, D]`` with every key that no query of its group may attend set to 0.

    A blocked key gets probability 0, but ``0 · inf`` is NaN: without this, ``inf`` or NaN
    behind a key padding mask reached every output through the read-out ``P K``. ``m.allowed``
    broadcasts to ``[B, H, N, M]``; keys blocked for some queries only are left as they are.
    Causality counts: a key that ``m.allowed`` leaves only to earlier queries is unseen too.
    """
    if m.allowed is None:
        return k
    allowed = m.allowed.reshape((1,) * (4 - m.allowed.dim()) + tuple(m.allowed.shape))
    if m.is_causal and allowed.shape[-2] > 1:
        # Query i sees key j only if j <= i. (A mask with one query row broadcasts to every
        # query, and query j sees key j since N == M: causality then hides no key.)
        allowed = allowed & causal(allowed.shape[-2], k.shape[-2], allowed.device)
    used = allowed.any(dim=-2)  # [B|1, H|1, M]
    if used.shape[-2] not in (1, k.shape[1]):  # grouped heads: used by any head of the group
        used = used.unflatten(-2, (k.shape[1], -1)).any(dim=-2)
    return k.masked_fill(~used.unsqueeze(-1), 0.0)


def is_key_padding(mask: torch.Tensor | None) -> bool:
    """Whether ``mask`` broadcasts as ``[B, 1, 1, M]`` (a per-key mask)."""
    if mask is None:
        return True
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    return shape[1] == 1 and shape[2] == 1


def key_padding(mask: torch.Tensor | None, batch: int, keys: int) -> torch.Tensor | None:
    """A mask broadcastable as ``[B, 1, 1, M]`` -> a contiguous ``[B, M]`` tensor (None stays
    None). Callers check :func:`is_key_padding` first."""
    if mask is None:
        return None
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    return mask.expand(batch, 1, 1, keys).reshape(batch, keys).contiguous()


def as_masks(mask) -> Masks:
    """A :class:`Masks` as it is, else a user mask read by :func:`from_user` (name "mask")."""
    return mask if isinstance(mask, Masks) else from_user("mask", mask)


def logits_mask(logits: torch.Tensor, mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply a mask (None, bool True = may attend, additive float, or :class:`Masks` with its
    causality) to explicit logits ``[..., n, m]``.

    Returns ``(logits, valid)``: blocked entries are ``−inf``; fully masked rows get all-zero
    logits (softmax and log-sum-exp stay finite) and ``valid [..., n, 1]`` False, so callers
    zero their read-out and potential. ``valid`` is None without a mask.
    """
    if mask is None:
        return logits, None
    m = as_masks(mask)
    if m.bias is not None:
        logits = logits + _cast_bias(m.bias, logits.dtype)
    allowed = full_allowed(m, logits.shape[-2], logits.shape[-1], logits.device)
    if allowed is None:
        return logits, None
    valid = allowed.any(dim=-1, keepdim=True)
    # One pass over the logits: blocked entries are −inf, or 0 on a row with none allowed.
    fill = torch.zeros(valid.shape, dtype=logits.dtype, device=logits.device)
    return torch.where(allowed, logits, fill.masked_fill_(valid, float("-inf"))), valid


def readout_args(m: Masks, n: int, k: int, device):
    """SDPA arguments of a read-out: ``(attn_mask, valid, is_causal)``.

    ``attn_mask`` is None, boolean (True = may attend) or the float bias with ``−inf`` where
    blocked. Fully masked rows would be NaN in SDPA: they are let through to every key (with
    bias 0) and ``valid`` (``[..., n, 1]`` bool, or None) zeroes their read-out afterwards
    (docs/math.md §1), which also keeps gradients finite. With no mask and no bias, causality
    stays SDPA's ``is_causal`` flag (its fast path).
    """
    if m.allowed is None and m.bias is None:
        return None, None, m.is_causal
    full = full_allowed(m, n, k, device)
    if full is None:  # a bias and no blocked entry: every row is valid
        return m.bias, None, False
    valid = full.any(dim=-1, keepdim=True)  # [..., n, 1]
    if m.bias is None:
        return full | ~valid, valid, False
    # Rows with every key blocked attend everything with bias 0 (then zeroed).
    bias = m.bias.masked_fill(~valid, 0.0)
    return bias.masked_fill(~(full | ~valid), float("-inf")), valid, False


def _cast_bias(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float bias in ``dtype``: entries outside its range become its lowest or largest value
    (in float16 ``−1e9`` would otherwise overflow to ``−inf`` and block the key, ``1e5`` to
    ``+inf`` and make the row NaN; ``+inf`` too becomes the largest value); ``−inf`` stays."""
    if bias.dtype == dtype:
        return bias
    info = torch.finfo(dtype)
    if torch.finfo(bias.dtype).max > info.max:
        bias = torch.where(bias.isneginf(), bias, bias.clamp(info.min, info.max))
    return bias.to(dtype)


def sdpa_mask(attn_mask: torch.Tensor, dtype: torch.dtype, keys: int) -> torch.Tensor:
    """The mask as every CUDA SDPA backend takes it, for queries of ``dtype`` and ``keys`` keys.

    Idempotent and free on a mask already in that form (prepare once, call SDPA many times).

    * the last dimension is materialised (size ``M``, stride 1): a broadcast last dimension
      (``[B, 1, 1, 1]``, ``[B, 1, N, 1]``, or any expanded view) makes the memory-efficient
      kernel fail with "(*bias): last dimension must be contiguous". Other dims may broadcast
      (they stay broadcast: only one row per distinct mask row is materialised).
    * a float mask has the query's dtype; finite entries outside that dtype's range are clamped
      to its lowest or largest value instead of overflowing to ``∓inf`` (``−1e9``, ``1e5`` in
      float16), so a row whose every key is weighed down (not blocked) stays finite, and so
      does a row with a key weighed up.
    * a boolean mask becomes the additive mask SDPA would make of it (0 where allowed, ``−inf``
      where blocked, in ``dtype``): SDPA converts a boolean mask on every call, and saves each
      converted copy for backward, so a read-out repeated T times with an N×M boolean mask would
      keep T float N×M masks; converted here once, every call shares one. (The memory-efficient
      kernel's alignment of the other strides is done by PyTorch itself: it pads a misaligned
      mask; broadcast strides are 0.)
    """
    if attn_mask.dim() == 0 or attn_mask.shape[-1] != keys:
        attn_mask = attn_mask.expand(*attn_mask.shape[:-1], keys)
    if attn_mask.dtype == dtype and attn_mask.stride(-1) == 1:
        return attn_mask
    # Convert and lay out the distinct rows only: leading broadcast (stride-0) dims stay broadcast.
    base = attn_mask[tuple(slice(0, 1) if st == 0 else slice(None)
                           for st in attn_mask.stride()[:-1])]
    if base.dtype == torch.bool:
        base = torch.full(base.shape, float("-inf"), dtype=dtype,
                          device=base.device).masked_fill_(base, 0.0)
    else:
        base = _cast_bias(base, dtype)
    return base.contiguous().expand(attn_mask.shape)


def _pads_for_cpu(device, dk: int, dv: int, dropout_p: float = 0.0, attn_mask=None) -> bool:
    """Whether :func:`sdpa` zero-pads head dims ``dk`` (q, k) and ``dv`` (v) to one width.

    On CPU, PyTorch's fused kernel needs one head dim for ``q``, ``k`` and ``v``; otherwise SDPA
    takes its math path, which keeps the N×M attention matrix for backward and is slower. Only
    where the fused kernel could otherwise run: no dropout, no mask that needs a gradient.
    """
    return (dk != dv and device.type == "cpu" and dropout_p == 0.0
            and not (attn_mask is not None and attn_mask.requires_grad))


def sdpa_keys(k: torch.Tensor, dv: int, attn_mask=None) -> torch.Tensor:
    """Keys ``[..., M, D]`` prepared once for many :func:`sdpa` calls with values of head dim
    ``dv``: zero-padded to ``dv`` where :func:`sdpa` would pad them on every call (see there),
    else ``k`` itself."""
    if k.shape[-1] < dv and _pads_for_cpu(k.device, k.shape[-1], dv, 0.0, attn_mask):
        return F.pad(k, (0, dv - k.shape[-1]))
    return k


def sdpa(q, k, v, *, attn_mask=None, valid=None, is_causal=False, scale=None, dropout_p=0.0,
         enable_gqa=False):
    """``F.scaled_dot_product_attention`` with a mask every backend accepts (the package's only
    call of it). ``attn_mask``: None, bool (True = may attend) or float (additive), broadcastable
    to ``[B, H, N, M]``; ``valid`` (``[..., N, 1]`` bool, from :func:`readout_args`) zeroes the
    rows that may attend nothing. Returns ``[B, H, N, Dv]`` in ``q``'s dtype.

    On CPU, a call whose values are wider or narrower than ``q`` and ``k`` runs the fused kernel
    on zero-padded operands (exact: zero columns add nothing; see :func:`_pads_for_cpu`). Keys
    wider than ``q`` are taken as zero-padded by :func:`sdpa_keys`: ``q`` is padded to match."""
    if attn_mask is not None:
        attn_mask = sdpa_mask(attn_mask, q.dtype, k.shape[-2])
    kwargs = {"enable_gqa": True} if enable_gqa else {}
    dq, dk, dv = q.shape[-1], k.shape[-1], v.shape[-1]
    if _pads_for_cpu(q.device, dk, dv, dropout_p, attn_mask):
        if dk < dv:
            k = F.pad(k, (0, dv - dk))
        else:
            v = F.pad(v, (0, dk - dv))
    if dq < k.shape[-1]:
        scale = 1.0 / math.sqrt(dq) if scale is None else scale  # SDPA's default, unpadded
        q = F.pad(q, (0, k.shape[-1] - dq))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                         is_causal=is_causal, scale=scale, **kwargs)
    if out.shape[-1] != dv:
        out = out[..., :dv]
    return out if valid is None else out * valid
