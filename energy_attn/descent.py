"""The descent engine: T fixed steps of an optimizer on an energy (docs/math.md §4).

Every layer in the package ends up in :func:`descend`, which knows nothing about attention:
it takes a *direction* function ``d(ξ)`` (the gradient, or a Newton-preconditioned gradient)
and applies one of the optimizers

    gd / newton_*  ξ_{t+1} = ξ_t − η d(ξ_t)
    momentum       v_{t+1} = ρ v_t − η d(ξ_t);        ξ_{t+1} = ξ_t + v_{t+1};   v_0 = 0
    nesterov       y_t = ξ_t + ρ v_t;  v_{t+1} = ρ v_t − η d(y_t);  ξ_{t+1} = ξ_t + v_{t+1}

:func:`minimize_energy` is the blog's function on top of it: the energy's closed-form gradient
when it has one (``energy.gradient``), autograd (``create_graph=True``) otherwise.
Step counts are Python ints: no data-dependent loop, nothing syncs with the host.
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from typing import Callable

import torch

from ._utils import (
    check_finite_number,
    check_num_steps,
    check_same_device,
    check_step_size,
)

OPTIMIZERS = ("gd", "momentum", "nesterov", "newton_2nd1st", "newton_light")
_NEWTON_KIND = {"newton_2nd1st": "2nd1st", "newton_light": "light"}


def check_optimizer(optimizer, momentum) -> float:
    """Validate an optimizer name and its momentum ``ρ``; returns ρ as a float."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    momentum = check_finite_number("momentum", momentum)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if momentum != 0.0 and optimizer not in ("momentum", "nesterov"):
        raise ValueError(
            f"momentum={momentum} has no effect with optimizer={optimizer!r}; "
            "use optimizer='momentum' or 'nesterov'"
        )
    return momentum


def descend(
    direction: Callable[[torch.Tensor], torch.Tensor],
    xi: torch.Tensor,
    *,
    num_steps: int,
    step_size: float,
    optimizer: str = "gd",
    momentum: float = 0.0,
    trajectory: dict | None = None,
) -> torch.Tensor:
    """Run ``num_steps`` optimizer steps from ``xi`` along ``direction`` (internal; trusted).

    Returns a new tensor, also for ``num_steps = 0`` (a copy of ``xi``, never ``xi`` itself: an
    op's output does not alias its input, whatever the step count). ``trajectory`` (a
    ``defaultdict(list)``), when given, receives ``queries`` (and, for the velocity optimizers,
    ``velocities``) at every iterate, T+1 entries each; its first entry is ``xi`` itself.
    """
    record = trajectory is not None
    uses_velocity = optimizer in ("momentum", "nesterov")
    v = torch.zeros_like(xi) if uses_velocity else None
    if record:
        trajectory["queries"].append(xi)
        if uses_velocity:
            trajectory["velocities"].append(v)
    for _ in range(num_steps):
        if optimizer == "momentum":
            v = momentum * v - step_size * direction(xi)
            xi = xi + v
        elif optimizer == "nesterov":
            v = momentum * v - step_size * direction(xi + momentum * v)
            xi = xi + v
        else:  # gd and the Newton-like steps (their direction is preconditioned)
            xi = xi - step_size * direction(xi)
        if record:
            trajectory["queries"].append(xi)
            if uses_velocity:
                trajectory["velocities"].append(v)
    return xi.clone() if num_steps == 0 else xi


def _bound(energy_func, name: str):
    """``energy_func.<name>`` with the same bound arguments (unwraps ``functools.partial``)."""
    if isinstance(energy_func, functools.partial):
        inner = getattr(energy_func.func, name, None)
        if inner is None:
            return None
        return functools.partial(inner, *energy_func.args, **energy_func.keywords)
    return getattr(energy_func, name, None)


def _needs_graph(energy_func, queries, keys, mask, self_consistent) -> bool:
    """Whether the autograd descent must be differentiable: grad mode is on and the queries, the
    keys, a float mask or anything else the energy reads (a key bias or parameters it closes
    over) requires grad. The last is found by one evaluation of the energy per call."""
    if not torch.is_grad_enabled():
        return False
    if queries.requires_grad or keys.requires_grad or (mask is not None and mask.requires_grad):
        return True
    x = queries.detach()
    return energy_func(x, x if self_consistent else keys, mask=mask).requires_grad


def _autograd_direction(energy_func, keys, mask, optimizer, create_graph, self_consistent=False):
    """Direction by autograd on a user energy (the blog's path); HVP for ``newton_2nd1st``.

    ``self_consistent``: the keys are the iterate itself, ``energy_func(ξ, ξ)``.
    Under ``torch.inference_mode`` autograd is off and inference tensors cannot be saved for
    backward: the gradient is then taken with inference mode lifted, on normal-tensor copies
    of the keys and mask (made once) and of each iterate; nothing is recorded for the caller.
    """
    lift = torch.is_inference_mode_enabled()
    if lift:
        with torch.inference_mode(False):
            keys = keys.clone() if keys is not None and keys.is_inference() else keys
            mask = mask.clone() if mask is not None and mask.is_inference() else mask

    def direction(xi):
        with torch.inference_mode(False) if lift else contextlib.nullcontext(), \
                torch.enable_grad():
            if xi.is_inference():
                xi = xi.clone()
            if not xi.requires_grad:
                xi = xi.detach().requires_grad_(True)
            energies = energy_func(xi, xi if self_consistent else keys, mask=mask)
            (g,) = torch.autograd.grad(
                energies, xi, grad_outputs=torch.ones_like(energies), create_graph=True
            )
            if optimizer == "newton_2nd1st":
                # d = (2I − H) g with a Hessian-vector product (H symmetric).
                (hg,) = torch.autograd.grad(g, xi, grad_outputs=g, create_graph=create_graph)
                g = 2 * g - hg
        return g if create_graph else g.detach()

    return direction


def minimize_energy(
    energy_func: Callable,
    queries: torch.Tensor,
    keys: torch.Tensor,
    mask: torch.Tensor | None = None,
    step_size: float = 1.0,
    num_steps: int = 1,
    return_trajs: bool = False,
    *,
    optimizer: str = "gd",
    momentum: float = 0.0,
    use_closed_form: bool = True,
    self_consistent: bool = False,
):
    """Minimise ``energy_func`` with respect to ``queries`` for ``num_steps`` steps.

    The blog's function, generalised to the optimizers of docs/math.md §4.

    Args:
        energy_func: ``energy_func(queries, keys, mask=mask) -> [..., n]`` per-query energies
            (e.g. ``functools.partial(hopfield_energy, scale=β)``). If it (or the function a
            ``partial`` wraps) has a ``gradient`` attribute with the same signature, that
            closed form is used; otherwise ``torch.autograd.grad(..., create_graph=True)``.
        queries: state patterns ``[..., n, d]``.
        keys: stored patterns ``[..., m, d]``, held fixed during descent.
        mask: optional mask broadcastable to ``[..., n, m]``, passed to ``energy_func``:
            boolean (True = may attend) or additive float (a logit bias; ``−inf`` blocks),
            as :mod:`energy_attn.masks` reads them.
        step_size: ``η``, finite and ``>= 0`` (ValueError otherwise: the engine minimises;
            to ascend an energy, minimise its negation).
        num_steps: ``T >= 0`` (a Python int).
        return_trajs: return ``{"queries": [T+1], "energies": [T+1]}`` (plus ``"velocities"``
            for momentum/Nesterov) instead of the final queries.
        optimizer: ``"gd" | "momentum" | "nesterov" | "newton_2nd1st" | "newton_light"``.
            ``newton_light`` needs a closed form (``energy_func.newton_direction``);
            ``newton_2nd1st`` falls back to a Hessian-vector product.
        momentum: ``ρ`` in ``[0, 1)`` for momentum/Nesterov.
        use_closed_form: set False to force the autograd path even when a closed form exists.
        self_consistent: self-attention whose stored patterns *are* the moving state patterns
            (docs/math.md §1.4, the blog's footnote 3): pass ``keys=None`` (or ``queries`` itself);
            every step descends the global energy ``Σ_i E(ξ_i; Ξ)`` with its true gradient,
            through the state both as query and as key (closed form ``energy_func.
            self_gradient`` when present, else autograd of ``energy_func(Ξ, Ξ)``). Energies in
            the trajectory are ``energy_func(ξ_t, ξ_t)``. Off by default: with fixed keys one
            step with ``η = 1`` is softmax attention; with this option it is not.

    Returns:
        The final queries ``[..., n, d]`` (differentiable w.r.t. queries and keys; a new tensor,
        also for ``num_steps=0``), or the trajectory dict when ``return_trajs``.
    """
    if not callable(energy_func):
        raise TypeError(f"energy_func must be callable, got {type(energy_func).__name__}")
    if not isinstance(self_consistent, bool):
        raise TypeError(f"self_consistent must be a bool, got {type(self_consistent).__name__}")
    if self_consistent:
        if keys is not None and keys is not queries:
            raise ValueError("self_consistent=True: the keys are the moving queries; pass "
                             "keys=None (or the queries tensor itself)")
        keys = queries
    for name, t in (("queries", queries), ("keys", keys)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if queries.shape[-1] != keys.shape[-1]:
        raise ValueError(
            f"queries and keys must share the last (pattern) dimension, got "
            f"{tuple(queries.shape)} and {tuple(keys.shape)}"
        )
    if mask is not None and (not isinstance(mask, torch.Tensor)
                             or not (mask.dtype == torch.bool or mask.is_floating_point())):
        raise TypeError("mask must be a boolean (True = may attend) or additive float tensor")
    check_same_device(queries=queries, keys=keys, mask=mask)
    num_steps = check_num_steps(num_steps)
    step_size = check_step_size(step_size)
    momentum = check_optimizer(optimizer, momentum)

    direction = None
    if self_consistent:
        if optimizer == "newton_light":
            raise ValueError("optimizer='newton_light' has no self-consistent form; use 'gd', "
                             "'momentum', 'nesterov' or 'newton_2nd1st' (Hessian-vector product)")
        self_grad = _bound(energy_func, "self_gradient") if use_closed_form else None
        if self_grad is not None and optimizer not in _NEWTON_KIND:

            def direction(xi):
                return self_grad(xi, xi, mask=mask)

    elif use_closed_form:
        if optimizer in _NEWTON_KIND:
            newton = _bound(energy_func, "newton_direction")
            if newton is not None:
                kind = _NEWTON_KIND[optimizer]

                def direction(xi):
                    return newton(xi, keys, mask=mask, kind=kind)

        else:
            grad = _bound(energy_func, "gradient")
            if grad is not None:

                def direction(xi):
                    return grad(xi, keys, mask=mask)

    if direction is None:
        if optimizer == "newton_light":
            raise ValueError(
                "optimizer='newton_light' needs a closed-form energy (one with a "
                "`newton_direction` attribute, e.g. hopfield_energy); this energy has none"
            )
        create_graph = _needs_graph(energy_func, queries, keys, mask, self_consistent)
        direction = _autograd_direction(energy_func, keys, mask, optimizer, create_graph,
                                        self_consistent)

    traj = defaultdict(list) if return_trajs else None
    out = descend(
        direction,
        queries,
        num_steps=num_steps,
        step_size=step_size,
        optimizer=optimizer,
        momentum=momentum,
        trajectory=traj,
    )
    if not return_trajs:
        return out
    traj["energies"] = [
        energy_func(xi, xi if self_consistent else keys, mask=mask) for xi in traj["queries"]
    ]
    return traj
