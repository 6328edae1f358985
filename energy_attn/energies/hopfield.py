"""Modern Hopfield energy and the elastic Helmholtz free energy (docs/math.md §1, §2, §4).

Both are one energy with an optional per-key bias ``b_j`` on the logits:

    E(ξ_i) = ½‖ξ_i‖² − (1/β) log Σ_j exp(β ξ_i·k_j + b_j)        (masked j dropped)
    ∇E(ξ_i) = ξ_i − μ_i,   μ_i = Σ_j p_ij k_j,   p_i = softmax_j(β ξ_i·k_j + b_j)

``b = 0`` is the Hopfield energy; ``b_j = −½β‖k_j‖²`` is the Helmholtz free energy of the
elastic local energy ``½‖z − k_j‖²`` at temperature ``1/β``. A query that may attend to nothing
has an empty memory: potential 0, ``μ = 0``, ``∇E = ξ`` (finite, never NaN).

Shapes: ``state`` ``[..., n, d]``, ``stored`` ``[..., m, d]`` (leading dims broadcast), ``mask``
broadcastable to ``[..., n, m]``: boolean (True = may attend) or an additive float mask, a
logit bias ``b_ij`` in the energy (``−inf`` / ``<= finfo.min`` blocks; see
:mod:`energy_attn.masks`), ``key_bias`` ``[..., m]``.
Energies are returned per query, ``[..., n]``, accumulated in float32 (float64 stays float64).
"""

from __future__ import annotations

import torch

from .. import masks
from .._moments import acc_dtype, centred, key_rows, no_autocast
from .._utils import (
    broadcasts_to,
    check_finite_number,
    check_float_tensor,
    check_same_device,
    exists,
)


def _check_patterns(state, stored):
    """The patterns are float tensors ``[..., n, d]``, ``[..., m, d]`` on one device sharing the
    pattern size ``d`` (ValueError/TypeError naming the argument otherwise)."""
    for name, t in (("state_patterns", state), ("stored_patterns", stored)):
        check_float_tensor(name, t)
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape [..., n, d] (at least 2 dimensions), got "
                             f"{tuple(t.shape)}")
    check_same_device(state_patterns=state, stored_patterns=stored)
    if state.shape[-1] != stored.shape[-1]:
        raise ValueError(
            f"state_patterns and stored_patterns must share the last (pattern) dimension d, got "
            f"{tuple(state.shape)} and {tuple(stored.shape)}"
        )


def _resolve_scale(state, stored, scale):
    """Check the patterns (:func:`_check_patterns`); return ``β`` (``d ** -0.5`` when ``scale``
    is None, as everywhere in the package)."""
    _check_patterns(state, stored)
    if scale is None:
        return state.shape[-1] ** -0.5
    return check_finite_number("scale", scale, positive=True, allow_tensor=True)


def _batch_shape(state, stored):
    """The broadcast batch dims of ``[..., n, d]`` and ``[..., m, d]`` patterns (ValueError
    naming both if they do not broadcast)."""
    try:
        return torch.broadcast_shapes(state.shape[:-2], stored.shape[:-2])
    except RuntimeError:
        raise ValueError(f"state_patterns {tuple(state.shape)} and stored_patterns "
                         f"{tuple(stored.shape)} have batch dims that do not broadcast")


def _check_masks(state, stored, mask, key_bias):
    """``mask`` (a tensor) broadcasts to ``[..., n, m]`` and ``key_bias`` to ``[..., m]``, on
    the patterns' device (ValueError/TypeError naming the argument)."""
    if not (isinstance(mask, torch.Tensor) or exists(key_bias)):
        return
    batch = _batch_shape(state, stored)
    n, m = state.shape[-2], stored.shape[-2]
    if isinstance(mask, torch.Tensor):
        masks.check("mask", mask, (*batch, n, m))
    if exists(key_bias):
        check_float_tensor("key_bias", key_bias)
        if not broadcasts_to(key_bias.shape, (*batch, m)):
            raise ValueError(f"key_bias of shape {tuple(key_bias.shape)} is not "
                             f"broadcastable to [..., m] = {(*batch, m)}")
    check_same_device(state_patterns=state, mask=mask, key_bias=key_bias)


def _with_key_bias(state, stored, mask, key_bias):
    """Check ``mask`` and ``key_bias`` (:func:`_check_masks`) and fold the key bias into the
    mask as the additive mask ``b_ij = b_j`` (:func:`energy_attn.masks.with_key_bias`,
    docs/math.md §1.2): ``−inf`` or an entry ``<= finfo.min`` blocks its key, so a row whose
    keys it blocks entirely has an empty memory, as in ``hopfield_descent``. Added raw, such a
    row was a softmax over ``−inf`` (NaN)."""
    _check_masks(state, stored, mask, key_bias)
    return mask if key_bias is None else masks.with_key_bias(masks.as_masks(mask), key_bias)


def _allowed(mask, n, m, device):
    """The boolean mask (True = may attend) of any mask, ``[..., n|1, m]`` (a query dim it
    broadcasts stays 1: a per-key mask costs no N×M pass), or None."""
    if mask is None:
        return None
    allowed = masks.full_allowed(masks.as_masks(mask), n, m, device)
    if allowed is None:
        return None
    allowed = allowed.reshape((1,) * (2 - allowed.dim()) + tuple(allowed.shape))
    return allowed.expand(*allowed.shape[:-1], m)


def _seen_keys(state, stored, mask):
    """``stored`` with the keys no query may attend (padding) set to 0 (docs/math.md §1.2):
    their probability is 0, but ``0 · inf`` is NaN, so inf or NaN behind a padding mask would
    reach the read-out and every gradient. Their gradient is 0. (``mask`` checked by the
    caller.)"""
    allowed = _allowed(mask, state.shape[-2], stored.shape[-2], stored.device)
    if allowed is None:
        return stored
    return torch.where(allowed.any(dim=-2).unsqueeze(-1), stored, stored.new_zeros(()))


def _centred_keys(state, stored, mask):
    """``(kc, c)``: the keys about ``c``, the detached mean of the keys every query may attend,
    with keys no query may attend set to 0 (:func:`energy_attn._moments.centred`), in the
    accumulation dtype (docs/math.md §4.4). Logits ``β ξ·(k_j − c)`` differ from ``β ξ·k_j``
    by a per-query constant, which the softmax ignores, but not by the keys' common offset:
    formed about the origin, their float32 rounding (``β ξ·k ≈ 4·10⁴`` for keys and queries
    near 100, d = 16) put errors of 5·10⁻⁴ into ``p`` and the gradient. (``mask`` checked by
    the caller.)"""
    allowed = _allowed(mask, state.shape[-2], stored.shape[-2], stored.device)
    return centred(stored.to(acc_dtype(state, stored)), *key_rows(allowed))


def _centred_readout(logits, valid, kc, c):
    """``p``, ``μ − c = p (K − c)`` and ``μ`` (0 on fully masked rows) from logits about ``c``
    and the centred keys of :func:`_centred_keys`."""
    p, mc = _readout(logits, valid, kc)
    return p, mc, mc + (c if valid is None else c * valid)


def _logits(state, stored, scale, mask=None):
    """Masked logits ``β ξ·k + b`` in the accumulation dtype and the row-validity mask (a key
    bias comes folded into ``mask``: :func:`_with_key_bias`).

    Fully masked rows get all-zero logits (so softmax/lse stay finite) and ``valid = False``;
    callers zero their read-out and potential. Callers check ``mask`` (:func:`_check_masks`):
    the Hopfield layer calls this in every step.
    """
    dt = acc_dtype(state, stored)
    with no_autocast(state):  # autocast would run the einsum in 16 bits again
        logits = torch.einsum("...id,...jd->...ij", state.to(dt), stored.to(dt)) * scale
    return masks.logits_mask(logits, mask)  # blocked: −inf; fully masked rows: 0, valid False


def _logsumexp(logits):
    """``lse_j logits_j`` shifted by the detached row maximum (docs/math.md §1.1): the value is
    the same, but autograd's ``p = exp(logits − lse)`` then subtracts two small numbers instead
    of two large ones, so ``p`` stays accurate when the logits are large (an elastic key bias,
    keys far from the origin), and with it every autograd gradient and Hessian-vector product."""
    top = logits.amax(dim=-1, keepdim=True).detach()
    return top.squeeze(-1) + torch.logsumexp(logits - top, dim=-1)


def _readout(logits, valid, stored):
    """``p = softmax(logits)``, ``μ = p K`` (zero on fully masked rows)."""
    p = logits.softmax(dim=-1)
    if exists(valid):
        p = p * valid
    with no_autocast(p):
        return p, p @ stored.to(p.dtype)


def hopfield_energy(state_patterns, stored_patterns, scale=None, mask=None, key_bias=None):
    """Modern Hopfield energy per state pattern (the blog's ``hopfield_energy``).

    Args:
        state_patterns: queries ``ξ``, ``[..., n, d]``.
        stored_patterns: keys ``K``, ``[..., m, d]``; held fixed (differentiate w.r.t. state).
        scale: inverse temperature ``β``; default ``d ** -0.5`` (as the blog uses).
        mask: optional mask broadcastable to ``[..., n, m]``: boolean (True = may attend) or
            additive float (a logit bias ``b_ij``; ``−inf`` / ``<= finfo.min`` blocks).
        key_bias: optional per-key logit bias ``[..., m]`` (see :func:`elastic_energy`).

    Raises:
        TypeError: a pattern argument is not a floating-point tensor; a mask neither boolean
            nor float; a non-float ``key_bias``; a ``scale`` that is not a real number or
            float tensor.
        ValueError: a pattern argument with fewer than 2 dimensions; the two pattern sets
            differ in their last dimension ``d``; batch dims, ``mask`` or ``key_bias`` do not
            broadcast; patterns, ``mask`` or ``key_bias`` on different devices; a non-finite
            or non-positive ``scale``.

    Returns:
        ``[..., n]`` energies ``½‖ξ‖² − (1/β) lse_j(β ξ·k_j + b_j)`` (float32 accumulation).
        Works under autograd exactly like the blog's function; its closed-form gradient is
        :func:`hopfield_energy_grad` (found by :func:`energy_attn.minimize_energy`).
    """
    scale = _resolve_scale(state_patterns, stored_patterns, scale)
    mask = _with_key_bias(state_patterns, stored_patterns, mask, key_bias)
    stored_patterns = _seen_keys(state_patterns, stored_patterns, mask)
    logits, valid = _logits(state_patterns, stored_patterns, scale, mask)
    return _energy(state_patterns, logits, valid, scale)


def _energy(state, logits, valid, scale):
    """``½‖ξ‖² − (1/β) lse(logits)`` per query (potential 0 on rows ``valid`` marks empty)."""
    kinetic = 0.5 * state.to(logits.dtype).pow(2).sum(dim=-1)
    lse = _logsumexp(logits)
    if exists(valid):
        lse = lse * valid.squeeze(-1)
    return kinetic - lse / scale


def hopfield_energy_grad(state_patterns, stored_patterns, scale=None, mask=None, key_bias=None):
    """Closed-form ``∇_ξ E = ξ − softmax(β ξ Kᵀ + b) K`` (``ξ`` on fully masked rows).

    Same arguments as :func:`hopfield_energy`; returns ``[..., n, d]`` in the state's dtype.
    """
    scale = _resolve_scale(state_patterns, stored_patterns, scale)
    mask = _with_key_bias(state_patterns, stored_patterns, mask, key_bias)
    kc, c = _centred_keys(state_patterns, stored_patterns, mask)
    logits, valid = _logits(state_patterns, kc, scale, mask)
    _, _, mu = _centred_readout(logits, valid, kc, c)
    return (state_patterns.to(mu.dtype) - mu).to(state_patterns.dtype)


def hopfield_energy_self_grad(state_patterns, stored_patterns, scale=None, mask=None,
                              key_bias=None):
    """Gradient of the *self-consistent* global energy (docs/math.md §1.4, the blog's footnote 3).

    When the stored patterns are the state patterns and move with them,
    ``E(Ξ) = Σ_i ½‖ξ_i‖² − (1/β) Σ_i lse_j(β ξ_i·ξ_j + b_j)`` and every pattern is also a key:

        ∇_i E = ξ_i − Σ_j p_ij ξ_j − Σ_j p_ji ξ_j

    (``key_bias`` held constant). ``stored_patterns`` must be ``state_patterns`` itself (the
    signature matches :func:`hopfield_energy_grad` so the descent engine binds it alike).
    """
    scale = _resolve_scale(state_patterns, stored_patterns, scale)
    if stored_patterns is not state_patterns:
        raise ValueError("the self-consistent gradient needs stored_patterns is state_patterns")
    mask = _with_key_bias(state_patterns, state_patterns, mask, key_bias)
    logits, valid = _logits(state_patterns, state_patterns, scale, mask)
    p, mu = _readout(logits, valid, state_patterns)
    xi = state_patterns.to(p.dtype)
    with no_autocast(p):
        return (xi - mu - p.transpose(-1, -2) @ xi).to(state_patterns.dtype)


def elastic_energy_self_grad(state_patterns, stored_patterns, scale=None, mask=None):
    """Self-consistent gradient of :func:`elastic_energy` (its key bias moves too).

    With ``b_j = −½β‖ξ_j‖²``: ``∇_i = ξ_i − Σ_j p_ij ξ_j − Σ_j p_ji (ξ_j − ξ_i)``, formed about
    the patterns' mean ``c`` like :func:`elastic_energy` (it depends on differences of patterns
    only, except ``ξ_i`` itself on a row with an empty memory).
    """
    scale = _resolve_scale(state_patterns, stored_patterns, scale)
    if stored_patterns is not state_patterns:
        raise ValueError("the self-consistent gradient needs stored_patterns is state_patterns")
    _check_masks(state_patterns, state_patterns, mask, None)
    n = state_patterns.shape[-2]
    allowed = _allowed(mask, n, n, state_patterns.device)
    x = state_patterns.to(acc_dtype(state_patterns))
    xs = x - centred(x, *key_rows(allowed))[1]
    mask = _with_key_bias(xs, xs, mask, elastic_key_bias(xs, scale))
    logits, valid = _logits(xs, xs, scale, mask)
    p, mu = _readout(logits, valid, xs)
    pt = p.transpose(-1, -2)  # pt[i, j] = p_ji: pattern i read as a key by query j
    own = xs if valid is None else torch.where(valid, xs, x)  # ξ_i − c, or ξ_i if empty
    with no_autocast(p):
        return (own - mu - pt @ xs + pt.sum(-1, keepdim=True) * xs).to(state_patterns.dtype)


def hopfield_newton_direction(
    state_patterns, stored_patterns, scale=None, mask=None, key_bias=None, kind="2nd1st"
):
    """Newton-like preconditioned gradient ``d`` (``ξ⁺ = ξ − η d``), docs/math.md §4.3, §4.4.

    With ``H = I − βΣ`` (``Σ_i`` the attention-weighted key covariance) and ``g = ξ − μ``:

    * ``kind="2nd1st"``: ``d = (I + βΣ) g = 2g − Hg``, using ``Σ r = Σ_j p_ij s_ij k_j`` with
      ``s_ij = (k_j − μ_i)·r_i`` (a second pass over the keys).
    * ``kind="light"``: ``d = (1 + β diag Σ) ⊙ g``, ``diag Σ = Σ_j p_ij k_j⊙k_j − μ⊙μ``.

    ``I + βΣ`` is positive definite, so both are descent directions. Both are formed about the
    mean ``c`` of the keys every query may attend, in float32 (docs/math.md §4): keys sharing a
    large offset do not cancel and masked-out keys are never read.
    """
    scale = _resolve_scale(state_patterns, stored_patterns, scale)
    _check_kind(kind)
    mask = _with_key_bias(state_patterns, stored_patterns, mask, key_bias)
    kc, c = _centred_keys(state_patterns, stored_patterns, mask)
    logits, valid = _logits(state_patterns, kc, scale, mask)
    return _newton_direction(state_patterns, logits, valid, kc, c, scale, kind)


def _check_kind(kind):
    if kind not in ("2nd1st", "light"):
        raise ValueError(f"kind must be '2nd1st' or 'light', got {kind!r}")


def _newton_direction(state, logits, valid, kc, c, scale, kind):
    """:func:`hopfield_newton_direction` from its pieces (internal; the descent builds the keys'
    pieces once per call): masked ``logits`` and ``valid`` as :func:`_logits` gives them (or
    with an additive mask: any rows that ``valid`` zeroes), and ``(kc, c)`` the centred keys
    (:func:`energy_attn._moments.centred`), all in the accumulation dtype."""
    p, mc, mu = _centred_readout(logits, valid, kc, c)
    with no_autocast(p):
        g = state.to(p.dtype) - mu
        if kind == "2nd1st":
            # Σ g = Σ_j p_ij ((k_j − μ_i)·g_i)(k_j − μ_i): about c, and with the μ_i − c part
            # subtracted explicitly (Σ_j p_ij s_ij is 0 in exact arithmetic).
            s = torch.einsum("...jd,...id->...ij", kc, g) - (mc * g).sum(-1, keepdim=True)
            ps = p * s
            sigma_g = ps @ kc - mc * ps.sum(-1, keepdim=True)
            d = g + scale * sigma_g
        else:  # light
            diag = (p @ kc.square() - mc.square()).clamp_min(0)
            d = (1.0 + scale * diag) * g
    return d.to(state.dtype)


def elastic_key_bias(stored_patterns, scale=None):
    """Per-key logit bias ``−½ β ‖k_j‖²`` that turns the Hopfield energy into ``F*``."""
    scale = _resolve_scale(stored_patterns, stored_patterns, scale)
    dt = acc_dtype(stored_patterns)
    return -0.5 * scale * stored_patterns.to(dt).pow(2).sum(dim=-1)


def _elastic_frame(state, stored, scale, mask):
    """The elastic energy's pieces about a centre ``c`` (docs/math.md §2.1).

    ``F*`` depends on ``z`` and the keys only through ``z − k_j``, so for any ``c`` it equals
    ``F*`` of ``z − c`` and ``K − c`` (the key bias moving with the keys), and so do its
    gradient and Newton direction. Formed about the origin, the logits
    ``β z·k_j − ½β‖k_j‖²`` subtract two terms of size ``β‖k‖²`` (float32 gradients 10% off for
    keys near 1000); about ``c``, the (detached) mean of the keys every query may attend
    (:func:`_centred_keys`, which also zeroes keys no query may attend), they do not. The
    exception is a row with an empty memory (``F* = ½‖z‖²``, ``∇F* = z``, not ``z − c``):
    ``valid`` (``[..., n|1, 1]``, None without a mask) marks the others.

    Returns ``(β, z, z − c, K − c, logits, valid)`` in the accumulation dtype: the masked logits
    ``β (z − c)·(k_j − c) − ½β‖k_j − c‖²`` and the row validity as :func:`_logits` gives them.
    """
    scale = _resolve_scale(state, stored, scale)
    _check_masks(state, stored, mask, None)
    kc, c = _centred_keys(state, stored, mask)
    z = state.to(kc.dtype)
    zc = z - c
    # The key bias of finite keys is finite, so it is a plain logit bias (no key to block):
    # without a mask the logits stay unmasked.
    bias = masks.Masks(bias=elastic_key_bias(kc, scale).unsqueeze(-2))  # [..., 1, m]
    logits, valid = _logits(zc, kc, scale, masks.combine(masks.as_masks(mask), bias))
    return scale, z, zc, kc, logits, valid


def elastic_energy(state_patterns, stored_patterns, scale=None, mask=None):
    """Helmholtz free energy with elastic local energy ``E_j(z) = ½‖z − k_j‖²`` (docs/math.md §2.1).

    ``F*(z) = −T log Σ_j exp(−E_j(z)/T) = ½‖z‖² − T lse_j((z·k_j − ½‖k_j‖²)/T)``, ``T = 1/scale``,
    i.e. the Hopfield energy with key bias :func:`elastic_key_bias`, evaluated about the keys'
    mean (translation invariance; see :func:`hopfield_energy` for the arguments and errors).
    Returns ``[..., n]``, accumulated in float32 (float64 stays float64); ``½‖z‖²`` on a row
    with an empty memory.
    """
    scale, z, zc, _, logits, valid = _elastic_frame(state_patterns, stored_patterns, scale, mask)
    e = _energy(zc, logits, valid, scale)
    return e if valid is None else torch.where(valid.squeeze(-1), e, 0.5 * z.square().sum(-1))


def elastic_energy_grad(state_patterns, stored_patterns, scale=None, mask=None):
    """Closed-form ``∇F*(z) = z − Σ_j p_j k_j``, ``p = softmax((z·k_j − ½‖k_j‖²)/T)``, as
    ``(z − c) − Σ_j p_j (k_j − c)`` (:func:`elastic_energy`); ``[..., n, d]`` in the state's
    dtype."""
    _, z, zc, kc, logits, valid = _elastic_frame(state_patterns, stored_patterns, scale, mask)
    _, mc = _readout(logits, valid, kc)  # μ − c
    g = zc - mc
    return (g if valid is None else torch.where(valid, g, z)).to(state_patterns.dtype)


def elastic_newton_direction(state_patterns, stored_patterns, scale=None, mask=None,
                             kind="2nd1st"):
    """Newton-like direction for :func:`elastic_energy` (same Hessian form as Hopfield's),
    ``[..., n, d]`` in the state's dtype."""
    _check_kind(kind)
    scale, z, zc, kc, logits, valid = _elastic_frame(state_patterns, stored_patterns, scale,
                                                     mask)
    # About c, with c = 0: zc and kc are already centred.
    d = _newton_direction(zc, logits, valid, kc, kc.new_zeros(()), scale, kind)
    return (d if valid is None else torch.where(valid, d, z)).to(state_patterns.dtype)


# Closed forms that the descent engine discovers (also through functools.partial).
hopfield_energy.gradient = hopfield_energy_grad
hopfield_energy.newton_direction = hopfield_newton_direction
elastic_energy.gradient = elastic_energy_grad
hopfield_energy.self_gradient = hopfield_energy_self_grad
elastic_energy.self_gradient = elastic_energy_self_grad
elastic_energy.newton_direction = elastic_newton_direction
