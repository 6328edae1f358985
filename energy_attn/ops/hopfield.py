"""``hopfield_descent``: T optimizer steps on the Hopfield / elastic energy, in SDPA layout.

One public function, three backends (docs/math.md §7 for their memory and cost):

* ``reference``: closed-form steps in plain PyTorch; the read-out ``μ = softmax(β ξ Kᵀ + b) K``
  is one ``F.scaled_dot_product_attention(ξ, K, K)`` call per step (through
  :func:`energy_attn.masks.sdpa`), so autograd saves only
  O(N·D) per step (no N×M matrix on the flash/efficient SDPA kernels). A float32 master copy
  of ξ (and v) is kept across steps; each read-out runs in the input dtype, like the kernel.
* ``autograd``: the blog's semantics, ``torch.autograd.grad(E, ξ, create_graph=True)``.
* ``triton``: the fused kernel from ``energy_attn.kernels`` (CUDA tensors).

``auto`` picks triton only where it was measured faster than the reference (see
:data:`AUTO_TRITON_WINS` and :func:`auto_picks_triton`), else reference.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import NamedTuple

import torch

from .. import masks
from .._moments import centred, key_rows, moment_values, no_autocast
from .._utils import (
    check_finite_number,
    check_float_tensor,
    check_num_steps,
    check_same_device,
    check_step_size,
    exists,
    expand_heads,
)
from ..descent import _NEWTON_KIND, check_optimizer, descend, minimize_energy
from ..energies.hopfield import _newton_direction, hopfield_energy
from ..fixed_point import _hopfield_fixed_point, check_solver

BACKENDS = ("auto", "reference", "autograd", "triton")


def _check_inputs(q, k, scale, step_size, num_steps, mask, is_causal, key_bias, optimizer,
                  momentum, backend):
    check_float_tensor("q", q, ndim=4)
    check_float_tensor("k", k, ndim=4)
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must share a dtype, got q {q.dtype} and k {k.dtype}")
    B, H, N, D = q.shape
    Bk, Hk, M, Dk = k.shape
    if Dk != D:
        raise ValueError(f"q and k must share the head dim D, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if Bk != B:
        raise ValueError(f"q and k must share the batch size, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if Hk < 1 or H % Hk != 0:
        raise ValueError(f"k's head count ({Hk}) must divide q's ({H}) for grouped-query descent")
    if D == 0 or M == 0:
        raise ValueError(f"q and k need a head dim D >= 1 and k at least one key, got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)} (to block every key, use a mask)")
    check_same_device(q=q, k=k, mask=mask, key_bias=key_bias)
    if exists(mask):
        masks.check("mask", mask, (B, H, N, M))
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if is_causal and N != M:
        raise ValueError(f"is_causal=True needs N == M, got N={N}, M={M}")
    if exists(key_bias):
        check_float_tensor("key_bias", key_bias)
        if tuple(key_bias.shape) != (B, Hk, M):
            raise ValueError(
                f"key_bias must have shape [B, Hk, M] = {(B, Hk, M)}, got {tuple(key_bias.shape)}"
            )
    num_steps = check_num_steps(num_steps)
    step_size = check_step_size(step_size)
    scale = check_finite_number("scale", scale, positive=True) if exists(scale) else D**-0.5
    momentum = check_optimizer(optimizer, momentum)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return scale, step_size, num_steps, momentum


def _canonical_masks(mask, is_causal, k):
    """A validated user ``mask`` -> ``(Masks, k)`` with the keys no query may attend zeroed.

    A mask of fewer than 4 dims (e.g. a ``[M]`` key mask) is laid out as ``[1, ..., M]``: SDPA
    takes no 1-d mask.
    """
    if exists(mask) and mask.dim() < 4:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    m = masks.from_user("mask", mask, is_causal=is_causal)
    return m, masks.zero_unseen_keys(m, k)


def _reference(q, k, scale, step_size, num_steps, m, key_bias, optimizer, momentum,
               return_energies, tol=0.0):
    """``m``: the canonical :class:`energy_attn.masks.Masks` (its bias acts in every step)."""
    B, H, N, D = q.shape
    M = k.shape[2]
    k = expand_heads(k, H)
    bias = expand_heads(key_bias, H) if exists(key_bias) else None

    # SDPA takes a float mask in the query's dtype: a key bias of −650 in bfloat16 would be off
    # by 2 in every logit. With a key bias, 16-bit inputs read out in float32 (on the rounded
    # iterate, as the kernel does); other float masks follow SDPA (docs/math.md §4.7).
    half = q.dtype in (torch.float16, torch.bfloat16)
    read = torch.float32 if exists(bias) and half else q.dtype
    k_read = k.to(read)
    # One SDPA call per step, its mask built (and laid out for SDPA) once.
    raw_mask, valid, sdpa_causal = masks.readout_args(masks.with_key_bias(m, bias), N, M,
                                                      q.device)
    attn_mask = masks.sdpa_mask(raw_mask, read, M) if exists(raw_mask) else None
    if optimizer in _NEWTON_KIND or return_energies:
        # Explicit-logit paths (Newton, energies): causality folded in once, not per step. (The
        # first-order read-outs keep SDPA's is_causal flag and need no N×M mask.)
        m = masks.Masks(masks.full_allowed(m, N, M, q.device), m.bias)

    def readout(xi32, values):
        return masks.sdpa(xi32.to(q.dtype).to(read), k_read, values, attn_mask=attn_mask,
                          valid=valid, is_causal=sdpa_causal, scale=scale)

    if optimizer in _NEWTON_KIND:
        # Newton-like steps need the covariance. Shifted moments (docs/math.md §4;
        # energy_attn/_moments.py): c is a mean of keys every query may see, masked-out keys
        # are zeroed; the keys' pieces are built once per call, not per step.
        kind = _NEWTON_KIND[optimizer]
        kc, c = centred(k, *key_rows(m.allowed))

        if kind == "light":
            # One float32 read-out with values [K − c, (K − c)⊙(K − c)] gives μ − c and
            # Σ_j p_ij (k_j−c)⊙(k_j−c). The float32 keys and mask are shared with the read-out
            # when it is float32.
            values = moment_values(kc)
            acc_mask = (attn_mask if read == kc.dtype
                        else masks.sdpa_mask(raw_mask, kc.dtype, M) if exists(raw_mask) else None)
            k_acc = masks.sdpa_keys(k_read.to(kc.dtype), 2 * D, acc_mask)
        else:
            # 2nd1st needs the explicit P (see hopfield_newton_direction): its logits' additive
            # mask (causality and key bias folded in; fully masked rows let through, then
            # zeroed by `valid`) and the float32 keys, built once.
            logit_mask, logit_valid, _ = masks.readout_args(masks.with_key_bias(m, bias), N, M,
                                                            q.device)
            if exists(logit_mask):
                logit_mask = masks.sdpa_mask(logit_mask, kc.dtype, M)
            k_acc = k.to(kc.dtype)

        def direction(xi32):
            if kind == "light":
                with no_autocast(xi32):  # autocast would read the moments out in 16 bits
                    both = masks.sdpa(xi32.to(kc.dtype), k_acc, values, attn_mask=acc_mask,
                                      valid=valid, is_causal=sdpa_causal,
                                      scale=scale).to(xi32.dtype)
                mc = both[..., :D]  # μ − c
                var = (both[..., D:] - mc.square()).clamp_min(0)  # diag Σ
                mu = mc + (c if valid is None else c * valid)  # μ = 0 on fully masked rows
                return (1.0 + scale * var) * (xi32 - mu)
            with no_autocast(xi32):
                logits = torch.einsum("...id,...jd->...ij", xi32.to(kc.dtype), k_acc) * scale
            if exists(logit_mask):
                logits = logits + logit_mask
            return _newton_direction(xi32, logits, logit_valid, kc, c, scale, kind)

    else:

        def direction(xi32):
            return xi32 - readout(xi32, k_read).to(xi32.dtype)

    if tol > 0:
        unmasked = direction

        def direction(xi32):
            # Masked tolerance stop: a row whose step would move it less than `tol` stays put.
            # Its direction is a pure function of ξ, so it then stays stopped (no host sync).
            d = unmasked(xi32)
            return d * ((step_size * d).norm(dim=-1, keepdim=True) >= tol)

    master = q.float() if half else q
    traj = defaultdict(list) if return_energies else None
    out = descend(
        direction,
        master,
        num_steps=num_steps,
        step_size=step_size,
        optimizer=optimizer,
        momentum=momentum,
        trajectory=traj,
    )
    out = out.to(q.dtype)
    if not return_energies:
        return out
    energies = torch.stack(
        [hopfield_energy(xi, k, scale, mask=masks.with_key_bias(m, bias))
         for xi in traj["queries"]],
        dim=-1,
    )
    return out, energies


def _autograd(q, k, scale, step_size, num_steps, m, key_bias, optimizer, momentum,
              return_energies):
    B, H, N, D = q.shape
    M = k.shape[2]
    k = expand_heads(k, H)
    m = masks.with_key_bias(m, expand_heads(key_bias, H) if exists(key_bias) else None)
    # The energy's mask argument in SDPA's convention (bool, or float with −inf = blocked), the
    # key bias folded in (its −inf entries block, as a float mask's do).
    full = masks.to_sdpa_mask(masks.Masks(masks.full_allowed(m, N, M, q.device), m.bias))
    energy = functools.partial(hopfield_energy, scale=scale)
    if optimizer == "newton_light":
        raise ValueError("backend='autograd' has no optimizer='newton_light' (needs a closed "
                         "form); use backend='reference'")
    res = minimize_energy(
        energy, q, k, mask=full, step_size=step_size, num_steps=num_steps,
        return_trajs=return_energies, optimizer=optimizer, momentum=momentum,
        use_closed_form=False,
    )
    if not return_energies:
        return res
    return res["queries"][-1], torch.stack(res["energies"], dim=-1)


def _triton_module():
    """The kernel module, or the reason it cannot be used."""
    try:
        from energy_attn.kernels import hopfield_descent as kmod  # noqa: PLC0415
    except ImportError as e:  # no Triton, or kernels not built for this install
        if getattr(e, "name", None) == "triton":
            return None, ('Triton is not installed: pip install "energy-attn[kernels]" '
                          "(CUDA builds of PyTorch already include it)")
        return None, f"the Triton kernels are unavailable ({e})"
    return kmod, None


def _triton_unsupported(q, k, mask, is_causal, key_bias, optimizer, num_steps):
    """Why the triton backend cannot run this call (None when it can)."""
    kmod, why = _triton_module()
    if kmod is None:
        return why
    return kmod.unsupported_reason(
        q, k, mask=mask, is_causal=is_causal, key_bias=key_bias, optimizer=optimizer,
        num_steps=num_steps,
    )


def _kernel_masks(m, key_bias, k_shape):
    """Canonical masks -> the kernel's ``(bool mask, per-key bias [B, Hk, M], why_not)``.

    An additive mask that is per key (``[B|1, 1, 1, M]``) joins the per-key bias (float32);
    one that varies over heads or queries has no kernel form (``why_not`` says so). ``key_bias``
    is an additive mask (:func:`energy_attn.masks.from_additive`): its entries ``<= finfo.min``
    and NaN reach the kernel as ``−inf``, which blocks the key there too.
    """
    if key_bias is not None:
        kb = masks.from_additive(key_bias)
        key_bias = kb.bias.float().masked_fill(~kb.allowed, float("-inf"))
    if m.bias is None:
        return m.allowed, key_bias, None
    if not masks.is_key_padding(m.bias):
        return None, None, (f"an additive float mask of shape {tuple(m.bias.shape)} (the kernel "
                            "takes per-key biases [B, 1, 1, M]; use backend='reference')")
    B, Hk, M, _ = k_shape
    per_key = masks.key_padding(m.bias, B, M).float().unsqueeze(1).expand(B, Hk, M).contiguous()
    bias = per_key if key_bias is None else key_bias.float() + per_key
    return m.allowed, bias, None


class TritonWin(NamedTuple):
    """A region of calls where the fused kernel was measured faster than the reference."""

    short_path: bool  # the kernel's short-memory path (every key of a head loaded once)
    max_keys: int  # largest key count M measured there
    with_grad: bool  # also when gradients are recorded (forward+backward), not only inference
    causal_only: bool  # only for is_causal calls
    note: str  # the measurement: device, commit, speed-ups over the reference
    head_dims: tuple[int, ...] = (64, 128)  # the head dims D measured (no others: D = 96 pads
    # to the kernel's 128-wide tile while the reference runs 96 natively)
    dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)  # the input dtypes measured


#: Where ``backend="auto"`` runs the fused Triton kernel instead of the reference backend: the
#: regions where it was *measured* faster, and nothing else. Measurement: NVIDIA H200, bf16,
#: D = 64 and 128, benchmarks/results/h200-ff95511/ (``benchmarks/kernels.py --target``, the
#: kernels and this rule as they are). Forward+backward with M = 8192 ran at 0.80–0.86x the
#: reference (the backward does 14·N·M·D FLOPs per step to its 10, docs/kernels.md), the
#: forward alone at 0.97x with D = 128: those have no row. Never timed, so never picked: other
#: head dims, float16 and float32 (whose kernels take true float32 dots, not TF32). To widen
#: the rule once new figures exist, add a row naming its measurement.
AUTO_TRITON_WINS = (
    TritonWin(short_path=True, max_keys=64, with_grad=True, causal_only=False, head_dims=(64,),
              note="H200, ff95511, D=64, N=8192, M=64, T=8: forward 9.5x (17.3x at 2fccd59), "
                   "forward+backward 3.6x"),
    TritonWin(short_path=False, max_keys=2048, with_grad=True, causal_only=False,
              note="H200, ff95511, forward+backward, N=M=2048, T=4: 1.12x (D=64), 1.04x "
                   "(D=128), 1.37x (D=128, causal); D=64, N=8192, M=256, T=8: 2.46x; "
                   "forward 1.56-4.95x"),
    TritonWin(short_path=False, max_keys=8192, with_grad=False, causal_only=False,
              head_dims=(64,),
              note="H200, ff95511, forward, D=64, N=M=8192, T=4: 1.01x (1.06x at 2fccd59); "
                   "D=128: 0.97x (0.95x), no row"),
)


def _auto_backend(q, k, m, key_bias, is_causal, optimizer, num_steps, device_type) -> str:
    """``"triton"`` where the kernel supports the (validated) call and :func:`auto_picks_triton`
    says it was measured faster on ``device_type``, else ``"reference"``."""
    if device_type != "cuda":
        return "reference"
    k_mask, k_bias, why = _kernel_masks(m, key_bias, k.shape)
    if why is not None or _triton_unsupported(q, k, k_mask, is_causal, k_bias, optimizer,
                                              num_steps) is not None:
        return "reference"
    kmod, _ = _triton_module()
    M, D = k.shape[2], k.shape[3]
    with_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, key_bias, m.bias))
    short = kmod.takes_short_path(M, D, q.dtype)
    return ("triton" if auto_picks_triton(device_type, M, short, with_grad, is_causal, D,
                                          q.dtype) else "reference")


def auto_picks_triton(device_type: str, M: int, short_path: bool, with_grad: bool,
                      is_causal: bool, head_dim: int, dtype: torch.dtype) -> bool:
    """The ``backend="auto"`` rule: True when a call the kernel supports should run it.

    Args:
        device_type: the tensors' device type (``"cuda"``, ``"cpu"``, ...); only CUDA runs it.
        M: the number of keys.
        short_path: whether the kernel would take its short-memory path for this call
            (``energy_attn.kernels.hopfield_descent.takes_short_path``).
        with_grad: whether the call records gradients (its backward will run too).
        is_causal: whether the call is causal.
        head_dim: the head dim D.
        dtype: the input dtype of ``q`` and ``k``.

    Returns True inside a region of :data:`AUTO_TRITON_WINS`, else False (reference).
    """
    if device_type != "cuda":
        return False
    return any(short_path == w.short_path and M <= w.max_keys and head_dim in w.head_dims
               and dtype in w.dtypes and (w.with_grad or not with_grad)
               and (is_causal or not w.causal_only)
               for w in AUTO_TRITON_WINS)


def hopfield_descent(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | None = None,
    step_size: float = 1.0,
    num_steps: int = 1,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    key_bias: torch.Tensor | None = None,
    return_energies: bool = False,
    optimizer: str = "gd",
    momentum: float = 0.0,
    backend: str = "auto",
    tol: float = 0.0,
    solver: str = "unrolled",
    anderson: int = 0,
):
    """Descend the Hopfield energy of queries ``q`` against fixed keys ``k`` for T steps.

    With ``step_size=1, num_steps=1`` this is softmax attention with values = keys:
    ``softmax(β q kᵀ + b) k``. The elastic (Helmholtz) energy is ``key_bias = −½β‖k_j‖²``.

    Args:
        q: queries ``[B, H, N, D]`` (float32/float16/bfloat16/float64).
        k: keys ``[B, Hk, M, D]``, same dtype; ``Hk`` divides ``H`` (grouped-query).
        scale: inverse temperature ``β``; default ``D ** -0.5``.
        step_size: ``η >= 0`` (a negative step would ascend the energy: ValueError).
        num_steps: ``T >= 0`` (Python int). ``T = 0`` returns ``ξ_0 = q``: a new tensor equal to
            ``q`` in ``q``'s dtype (never ``q`` itself nor a view of it, as for ``T > 0``).
        mask: broadcastable to ``[B, H, N, M]``, SDPA's ``attn_mask`` convention: boolean,
            True = may attend; or an additive float mask, a logit bias ``b_ij`` of the energy
            ``½‖ξ_i‖² − (1/β) log Σ_j exp(β ξ_i·k_j + b_ij)`` acting in every step and the
            read-out (docs/math.md §1): ``−inf`` and entries ``<= finfo(mask.dtype).min`` block
            the key, finite entries (``−1e4``, ``−1e9``) weigh it down by that much. A
            key-padding mask is ``[B, 1, 1, M]``. Fully masked rows: ``μ = 0``, finite. The
            triton backend takes boolean masks and float masks broadcastable as
            ``[B, 1, 1, M]`` (folded into its per-key bias); a float mask varying over heads
            or queries runs on the reference backend (``auto`` falls back to it, ``triton``
            raises ``ValueError``).
        is_causal: query ``i`` attends keys ``j <= i`` (needs ``N == M``); combines with ``mask``.
        key_bias: per-key logit bias ``[B, Hk, M]`` (float32 recommended): ``b_ij = b_j``,
            added to a float ``mask``. Used in its own precision by every backend: with 16-bit
            ``q`` the reference backend's read-outs then run in float32 (docs/math.md §4.7).
        return_energies: also return the energy of every iterate, ``[B, H, N, T+1]``, float32
            (float64 for float64 inputs).
        optimizer: ``"gd" | "momentum" | "nesterov" | "newton_2nd1st" | "newton_light"``.
        momentum: ``ρ`` in ``[0, 1)`` (momentum/Nesterov only).
        backend: ``"auto" | "reference" | "autograd" | "triton"``. ``auto`` runs the fused
            kernel only where it was measured faster than the reference (today, on CUDA, bfloat16,
            D = 64 or 128: up to M = 2048 keys, with or without gradients; up to M = 8192 at
            D = 64 when no gradient is recorded; see :func:`auto_picks_triton`), else the
            reference;
            ``triton`` forces the kernel.
        tol: masked tolerance stop (``0`` = off): a query whose next step would move it less
            than ``tol`` (Euclidean norm) stops there for the remaining steps. The step count
            stays fixed (no host sync). ``gd``/Newton optimizers, reference backend.
        solver: ``"unrolled"`` (differentiate through the T steps) or ``"fixed_point"``
            (:func:`hopfield_fixed_point`: T forward iterations, implicit
            backward with T adjoint iterations, memory independent of T; ``gd`` only, and
            ``q`` gets no gradient since the fixed point does not depend on it).
        anderson: Anderson history size for ``solver="fixed_point"`` (0 = plain iteration).

    Returns:
        ``ξ_T`` ``[B, H, N, D]`` in ``q``'s dtype, or ``(ξ_T, energies)``.

    Raises:
        TypeError: a non-tensor, non-float or mismatched-dtype ``q``/``k``/``key_bias``, a mask
            that is neither boolean nor float, a non-bool ``is_causal``, a non-int ``num_steps``
            or ``anderson``, a ``step_size``/``scale``/``momentum``/``tol`` that is not a real
            Python number (a tensor included: they are not differentiable).
        ValueError: mismatched shapes (batch, head dim, ``Hk`` not dividing ``H``, ``D == 0`` or
            no keys, mask or ``key_bias`` shape), devices, a negative or non-finite
            ``step_size``/``scale``/``tol``, ``momentum`` outside ``[0, 1)``, an unknown
            ``optimizer``/``backend``/``solver``, options a backend or solver cannot run.
    """
    scale, step_size, num_steps, momentum = _check_inputs(
        q, k, scale, step_size, num_steps, mask, is_causal, key_bias, optimizer, momentum, backend
    )
    m, k = _canonical_masks(mask, is_causal, k)
    anderson = check_solver(solver, anderson)
    tol = check_finite_number("tol", tol)
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if tol > 0:
        if optimizer in ("momentum", "nesterov"):
            raise ValueError(f"tol > 0 stops a query by freezing its step; optimizer={optimizer!r} "
                             "carries a velocity, use 'gd' or a Newton optimizer")
        if backend not in ("auto", "reference"):
            raise ValueError(f"tol > 0 runs on backend='reference', got backend={backend!r}")
    if solver == "fixed_point":
        if optimizer != "gd":
            raise ValueError(f"solver='fixed_point' iterates the gd map, got "
                             f"optimizer={optimizer!r}")
        if return_energies or tol > 0:
            raise ValueError("solver='fixed_point' takes no return_energies and no tol (it runs "
                             "a fixed number of iterations; see hopfield_fixed_point's residual)")
        if backend not in ("auto", "reference"):
            raise ValueError(f"solver='fixed_point' runs on backend='reference', got {backend!r}")
        if step_size == 0.0:
            raise ValueError("step_size must be nonzero for solver='fixed_point'")
        return _hopfield_fixed_point(q, k, scale, step_size, num_steps, m, key_bias, anderson)
    if tol > 0:
        return _reference(q, k, scale, step_size, num_steps, m, key_bias, optimizer, momentum,
                          return_energies, tol)
    args = (q, k, scale, step_size, num_steps, m, key_bias, optimizer, momentum, return_energies)
    if backend == "auto":
        backend = _auto_backend(q, k, m, key_bias, is_causal, optimizer, num_steps,
                                q.device.type)
    if backend == "reference":
        return _reference(*args)
    if backend == "autograd":
        return _autograd(*args)
    k_mask, k_bias, why = _kernel_masks(m, key_bias, k.shape)
    if why is None:
        why = _triton_unsupported(q, k, k_mask, is_causal, k_bias, optimizer, num_steps)
    if why is not None:
        raise ValueError(f"backend='triton' cannot run this call: {why}")
    kmod, _ = _triton_module()
    return kmod.hopfield_descent_triton(q, k, scale, step_size, num_steps, k_mask, is_causal,
                                        k_bias, optimizer, momentum, return_energies)


def hopfield_fixed_point(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | None = None,
    step_size: float = 1.0,
    num_steps: int = 1,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    key_bias: torch.Tensor | None = None,
    anderson: int = 0,
    return_residual: bool = False,
):
    """Fixed point of the Hopfield descent ``ξ ← ξ − η (ξ − softmax(β ξ Kᵀ + b) K)``.

    The same call as :func:`hopfield_descent` with ``solver="fixed_point"``: ``num_steps``
    forward iterations (Anderson-accelerated if ``anderson > 0``) from ``q``, implicit
    differentiation in backward with ``num_steps`` adjoint iterations
    (:func:`energy_attn.fixed_point.fixed_point`).

    Args:
        q, k, scale, step_size, num_steps, mask, is_causal, key_bias: as
            :func:`hopfield_descent` (``q [B, H, N, D]``, ``k [B, Hk, M, D]``, ``mask`` bool
            True = may attend or additive float, broadcastable to ``[B, H, N, M]``).
        anderson: Anderson history size (0 = plain iteration).
        return_residual: also return the per-query residual ``‖f(ξ*) − ξ*‖``, ``[B, H, N]``
            (detached; how far from a fixed point the solve ended).

    Returns:
        ``ξ*`` ``[B, H, N, D]`` in ``q``'s dtype (half inputs are solved in float32), or
        ``(ξ*, residual)``. ``q`` gets no gradient; ``k`` and ``key_bias`` get implicit ones.

    Raises:
        ValueError, TypeError: as :func:`hopfield_descent`; ``step_size == 0``; a float
            ``mask`` that requires grad (the implicit backward does not differentiate it).
    """
    scale, step_size, num_steps, _ = _check_inputs(
        q, k, scale, step_size, num_steps, mask, is_causal, key_bias, "gd", 0.0, "reference"
    )
    anderson = check_num_steps(anderson, "anderson")
    if step_size == 0.0:
        raise ValueError("step_size must be nonzero for solver='fixed_point'")
    m, k = _canonical_masks(mask, is_causal, k)
    return _hopfield_fixed_point(q, k, scale, step_size, num_steps, m, key_bias, anderson,
                                 return_residual)
