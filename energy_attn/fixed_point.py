"""Fixed-point solving with implicit differentiation (deep-equilibrium style).

For a map ``z ↦ f(z, θ)`` with a fixed point ``z* = f(z*, θ)``, the implicit function theorem
gives the gradient of a loss ``L(z*)`` without storing the iterations that found ``z*``:

    ∂L/∂θ = uᵀ ∂f/∂θ (z*, θ),   where   u = g + Jᵀ u,   g = ∂L/∂z*,   J = ∂f/∂z (z*, θ)

i.e. ``u`` solves the adjoint fixed point ``(I − Jᵀ) u = g``. :func:`fixed_point` runs a fixed
number of forward iterations (optionally Anderson-accelerated) under ``no_grad``, saves only
``z*`` and ``θ``, and in backward iterates the adjoint the same number of times with one
vector-Jacobian product per iteration: closed-form products when given (the Hopfield step has
them, :func:`_hopfield_step_vjp`), else autograd through a single recomputed ``f(z*, θ)``.
Memory is therefore independent of the number of iterations. Step counts are Python ints:
nothing syncs with the host, and with closed-form products ``torch.compile(fullgraph=True)``
traces forward and backward.

Both solves converge when ``f`` is a contraction near ``z*`` (spectral radius of ``J`` below 1).
:func:`energy_attn.ops.hopfield.hopfield_fixed_point` applies this to the Hopfield descent
(docs/math.md §9.2): the fixed point of ``ξ ↦ ξ − η ∇E(ξ)`` is a stationary point of the
energy, ``ξ* = softmax(β ξ* Kᵀ + b) K``.
Because ``ξ*`` does not depend on where the iteration started (within a basin), its gradient
with respect to the initial queries is zero; gradients flow to the keys (and key bias).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import masks
from ._moments import acc_dtype
from ._utils import check_num_steps, exists, expand_heads
from .energies.hopfield import _logits, _readout

SOLVERS = ("unrolled", "fixed_point")


def check_solver(solver, anderson) -> int:
    """Validate ``solver`` and the Anderson history size; returns the size as an int."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    anderson = check_num_steps(anderson, "anderson")
    if anderson and solver != "fixed_point":
        raise ValueError("anderson > 0 needs solver='fixed_point'")
    return anderson


def _iterate(g: Callable, z: torch.Tensor, num_iters: int, anderson: int) -> torch.Tensor:
    """``num_iters`` iterations of ``z ← g(z)``: plain (Picard) or Anderson (type II).

    Anderson treats every row ``z[..., :]`` as its own system (the rows of the Hopfield descent
    are independent given the keys): with the last ``m = anderson`` iterates ``z_i`` and images
    ``g_i = g(z_i)``, residuals ``r_i = g_i − z_i``, it takes ``z ← Σ_i α_i g_i`` with
    ``α = argmin ‖Σ α_i r_i‖`` subject to ``Σ α_i = 1`` (a small regularised solve per row).
    A row whose newest residual is no smaller than the best in its window takes the plain step.
    """
    if anderson == 0:
        for _ in range(num_iters):
            z = g(z)
        return z
    shape = z.shape
    z = z.reshape(-1, shape[-1])  # [R, D]: R independent systems
    acc = acc_dtype(z)  # the small solves run in float32 at least (no 16-bit linalg.solve)
    zs, gs = [], []
    reg = 1e-4  # relative Tikhonov regularisation of the (normalised) Gram matrix
    for _ in range(num_iters):
        gz = g(z.reshape(shape)).reshape(z.shape)
        zs.append(z)
        gs.append(gz)
        zs, gs = zs[-anderson:], gs[-anderson:]
        if len(zs) == 1:
            z = gz
            continue
        G = torch.stack(gs, dim=1).to(acc)  # [R, m, D]
        res = G - torch.stack(zs, dim=1).to(acc)  # [R, m, D]
        gram = res @ res.transpose(1, 2)  # [R, m, m]
        # Regularise relative to the Gram matrix's own scale (dimensionless), so converged rows
        # (gram ≈ 0) stay well posed and fall back to a plain average of identical images.
        m = gram.shape[-1]
        size = gram.diagonal(dim1=1, dim2=2).mean(-1, keepdim=True).unsqueeze(-1)
        size = size + torch.finfo(acc).tiny
        eye = torch.eye(m, dtype=acc, device=z.device)
        ones = torch.ones(gram.shape[0], m, 1, dtype=acc, device=z.device)
        w = torch.linalg.solve(gram / size + reg * eye, ones)  # [R, m, 1]
        alpha = w / w.sum(dim=1, keepdim=True)
        # Safeguard (masked, per row): where the newest residual is no smaller than the best in
        # the window, extrapolation is not helping; take the plain step g(z) for that row.
        rnorm = res.pow(2).sum(-1)  # [R, m]
        stalled = rnorm[:, -1] >= rnorm[:, :-1].min(dim=1).values
        z = torch.where(stalled.unsqueeze(-1), gz, (alpha * G).sum(dim=1).to(z.dtype))
    return z.reshape(shape)


class _FixedPoint(torch.autograd.Function):
    """Forward: iterate ``f`` to ``z*``. Backward: adjoint fixed point, then ``uᵀ ∂f/∂θ``."""

    generate_vmap_rule = True  # torch.func.vmap: the forward and backward are torch ops

    @staticmethod
    def forward(f, vjp, num_iters, anderson, z0, *params):
        z = _iterate(lambda z: f(z, *params), z0, num_iters, anderson)
        if num_iters == 0:
            z = z0.clone()  # a new tensor: an output that is its input would be a view of it
        return z

    @staticmethod
    def setup_context(ctx, inputs, output):  # apart from forward: torch.func transforms need it
        f, vjp, num_iters, anderson, _, *params = inputs
        ctx.f, ctx.vjp, ctx.num_iters, ctx.anderson = f, vjp, num_iters, anderson
        ctx.save_for_backward(output, *params)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        z, *params = ctx.saved_tensors
        wants = ctx.needs_input_grad[5:]
        if ctx.vjp is not None:  # closed-form products: no graph, compile-friendly
            jt, param_vjp = ctx.vjp(z, *params)
            u = _iterate(lambda u: grad + jt(u), grad, ctx.num_iters, ctx.anderson)
            grads = param_vjp(u)
            return (None, None, None, None, None,
                    *(g if w else None for g, w in zip(grads, wants)))
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            ps = [p.detach().requires_grad_(w) for p, w in zip(params, wants)]
            fz = ctx.f(z, *ps)

            def adjoint(u):  # u ↦ g + Jᵀ u
                (vjp,) = torch.autograd.grad(fz, z, u, retain_graph=True)
                return grad + vjp

            u = _iterate(adjoint, grad, ctx.num_iters, ctx.anderson)
            needed = [p for p, w in zip(ps, wants) if w]
            grads = iter(torch.autograd.grad(fz, needed, u, allow_unused=True) if needed else ())
        # z0 gets no gradient: the fixed point does not depend on the starting point.
        return (None, None, None, None, None, *(next(grads) if w else None for w in wants))


def fixed_point(
    f: Callable[..., torch.Tensor],
    z0: torch.Tensor,
    params: Sequence[torch.Tensor] = (),
    *,
    num_iters: int,
    anderson: int = 0,
    vjp: Callable | None = None,
) -> torch.Tensor:
    """Solve ``z = f(z, *params)`` by ``num_iters`` iterations; differentiate implicitly.

    Args:
        f: ``f(z, *params) -> tensor shaped like z``; pure (no side effects), differentiable.
            Every tensor that needs a gradient must be passed in ``params``: tensors ``f``
            closes over are treated as constants.
        z0: starting point, any shape. It receives no gradient (the fixed point does not
            depend on it).
        params: tensors ``θ`` that ``f`` depends on; each gets ``uᵀ ∂f/∂θ``.
        num_iters: forward iterations, and adjoint iterations in backward (Python int >= 0).
        anderson: Anderson history size (0 = plain iteration). Anderson treats every row
            ``z[..., :]`` as an independent system, so use it only for row-separable ``f``.
            It speeds up contractive maps a lot; where several fixed points compete (e.g. a
            Hopfield descent at large β) it may jump between basins: iterate plainly there.
        vjp: optional closed-form products at the fixed point, ``vjp(z*, *params) -> (jt,
            param_vjp)`` with ``jt(u) = Jᵀu`` (``J = ∂f/∂z``) and ``param_vjp(u)`` the tuple of
            ``uᵀ ∂f/∂θ_i``, one per param. Without it, backward uses autograd through one
            recomputed ``f(z*)`` (which ``torch.compile(fullgraph=True)`` cannot trace).

    Returns:
        ``z*`` shaped like ``z0``, a new tensor (for ``num_iters=0`` a copy of ``z0``). Autograd
        saves ``z*`` and ``params`` only: memory does not grow with ``num_iters``. Not twice
        differentiable. ``torch.func.vmap`` runs it; ``torch.func.grad`` needs ``vjp`` (the
        autograd fallback calls ``torch.autograd`` in backward, which ``torch.func`` refuses).
    """
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    if not isinstance(z0, torch.Tensor) or not z0.is_floating_point():
        raise TypeError("z0 must be a floating-point torch.Tensor")
    num_iters = check_num_steps(num_iters, "num_iters")
    anderson = check_num_steps(anderson, "anderson")
    params = tuple(params)
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}")
    if exists(vjp) and not callable(vjp):
        raise TypeError(f"vjp must be callable or None, got {type(vjp).__name__}")
    return _FixedPoint.apply(f, vjp, num_iters, anderson, z0, *params)


def _readout_args(m, key_bias, n, num_keys, device, dtype) -> dict:
    """The SDPA arguments of the read-out (``attn_mask``, ``valid``, ``is_causal``; the key bias
    folded into the mask, laid out for ``dtype``), built once for any number of read-outs."""
    attn_mask, valid, causal = masks.readout_args(masks.with_key_bias(m, key_bias), n, num_keys,
                                                  device)
    if attn_mask is not None:
        attn_mask = masks.sdpa_mask(attn_mask, dtype, num_keys)
    return {"attn_mask": attn_mask, "valid": valid, "is_causal": causal}


def _hopfield_readout(xi, keys, scale, m, key_bias=None, args=None):
    """``μ = softmax(β ξ Kᵀ + b) K`` (zero on fully masked rows) in ``keys``' dtype.

    ``xi [B, H, N, D]``, ``keys [B, H, M, D]``, ``m`` a :class:`energy_attn.masks.Masks`,
    ``key_bias [B, H, M]`` (heads already expanded); ``args``: :func:`_readout_args` of them,
    when prepared already (then ``m`` and ``key_bias`` are not read).
    """
    if args is None:
        args = _readout_args(m, key_bias, xi.shape[-2], keys.shape[-2], xi.device, keys.dtype)
    return masks.sdpa(xi.to(keys.dtype), keys, keys, scale=scale, **args)


def _hopfield_fixed_point(q, k, scale, step_size, num_steps, m, key_bias, anderson,
                          return_residual=False):
    """Internals of :func:`energy_attn.ops.hopfield.hopfield_fixed_point` (inputs validated;
    ``m`` the canonical :class:`energy_attn.masks.Masks`)."""
    if exists(m.bias) and m.bias.requires_grad and torch.is_grad_enabled():
        # The implicit backward differentiates k and key_bias only: say so, rather than
        # returning a mask gradient of None (the unrolled solver differentiates the mask).
        raise ValueError("solver='fixed_point' gives no gradient to a float mask that requires "
                         "grad; use key_bias for a learnable per-key bias, a mask without "
                         "grad, or solver='unrolled'")
    H, N = q.shape[1], q.shape[2]
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    keys = expand_heads(k, H).to(work)  # [B, H, M, D]
    params = [keys]
    if exists(key_bias):
        params.append(expand_heads(key_bias, H).to(work))  # [B, H, M]
    # The read-out's mask, built once for every iteration (not once per iteration) from the
    # detached bias: the iterations only need f's value, the vjp below gives the bias gradient.
    args = _readout_args(m, params[1].detach() if exists(key_bias) else None, N,
                         keys.shape[-2], q.device, work)

    def f(xi, keys, bias=None):  # bias is params[1], already in `args`
        mu = _hopfield_readout(xi, keys, scale, m, args=args)
        return xi - step_size * (xi - mu)

    z = fixed_point(f, q.to(work), params, num_iters=num_steps, anderson=anderson,
                    vjp=_hopfield_step_vjp(scale, step_size, m))
    out = z.to(q.dtype)
    if not return_residual:
        return out
    with torch.no_grad():
        residual = (f(z, *params) - z).norm(dim=-1)
    return out, residual


def _hopfield_step_vjp(scale, step_size, m):
    """Closed-form products of the step ``f(ξ) = (1 − η) ξ + η μ(ξ)``, ``μ = softmax(βξKᵀ+b) K``.

    With ``p_i`` the attention of query ``i`` and ``s_ij(w) = (k_j − μ_i)·w_i``:

        Jᵀ u   = (1 − η) u + η β Σ_j p_ij s_ij(u) k_j      (J = I(1−η) + ηβ Σ_i: symmetric)
        ∂/∂k_j = Σ_i p_ij w_i + β Σ_i p_ij s_ij(w) ξ_i       with w = η u
        ∂/∂b_j = Σ_i p_ij s_ij(w)

    (``Σ_i`` the attention-weighted key covariance; docs/math.md §9.2). ``P`` is built once per
    backward and reused by the T adjoint iterations.
    """

    def vjp(z, keys, bias=None):
        logits, valid = _logits(z, keys, scale, masks.with_key_bias(m, bias))
        p, mu = _readout(logits, valid, keys)  # [B, H, N, M], [B, H, N, D]
        kk, zz = keys.to(p.dtype), z.to(p.dtype)

        def weighted_s(w):  # p_ij s_ij(w), [B, H, N, M]
            return p * (w @ kk.transpose(-1, -2) - (mu * w).sum(-1, keepdim=True))

        def jt(u):
            uu = u.to(p.dtype)
            return ((1 - step_size) * uu + step_size * scale * (weighted_s(uu) @ kk)).to(u.dtype)

        def param_vjp(u):
            w = step_size * u.to(p.dtype)
            ps = weighted_s(w)
            dk = p.transpose(-1, -2) @ w + scale * ps.transpose(-1, -2) @ zz
            grads = [dk.to(keys.dtype)]
            if exists(bias):
                grads.append(ps.sum(dim=-2).to(bias.dtype))
            return grads

        return jt, param_vjp

    return vjp
