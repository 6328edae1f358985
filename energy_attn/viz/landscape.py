"""Flatland: energy landscapes of 2-D toy patterns with the trajectories of the descent.

The blog's picture (section 5): the energy ``E(ξ; K)`` of the stored patterns ``K`` over a
square grid, stored patterns as blue open circles, initial states as red dots, the descent's
trajectories as red arrows, final states as red crosses, and, when a value map is given, yellow
arrows from the final states to their value-mapped outputs (yellow crosses).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import torch

from .._utils import check_finite_number, check_float_tensor, check_same_device, exists
from ..descent import minimize_energy
from ._mpl import below_x_axis, new_axes, require_matplotlib

# Colours of the blog's figures.
STORED, STATE, VALUE = "tab:blue", "red", "gold"
# Artist ids the tests (and users) can find the pieces of a figure by.
GID_TRAJECTORY = "trajectory"
GID_ENERGY_TRACE = "energy_trace"


def _as_patterns(name: str, t) -> torch.Tensor:
    """``[n, 2]`` or ``[1, n, 2]`` 2-D patterns -> detached ``[n, 2]`` (float32 or float64)."""
    check_float_tensor(name, t)
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 2 or t.shape[-1] != 2 or t.shape[0] < 1:
        raise ValueError(
            f"{name} must hold two-dimensional patterns, shape [n, 2] or [1, n, 2] (one batch "
            f"element), got shape {tuple(t.shape)}; flatland plots need d = 2"
        )
    t = t.detach()
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got NaN or inf values")
    return t if t.dtype == torch.float64 else t.float()


def _auto_half_width(*points: torch.Tensor) -> float:
    """Half-width of a square grid that shows every point with a margin (multiples of 0.5)."""
    reach = max(p.abs().max().item() for p in points)
    if not math.isfinite(reach):
        raise ValueError("the descent or the value map produced NaN or inf patterns (check "
                         "energy_func, step_size and values_post_processing_func), so no grid "
                         "fits them; pass plot_grid_size to draw the finite ones")
    return max(0.5, math.ceil(2 * 1.15 * reach) / 2)


def simulate_and_plot_patterns(
    energy_func,
    state_patterns,
    context=None,
    scale=None,
    step_size=1.0,
    num_steps=1,
    values_post_processing_func=None,
    plot_grid_size=None,
    plot_title=None,
    ax=None,
    plot_3d=False,
    *,
    optimizer="gd",
    momentum=0.0,
    grid_points=101,
    cmap="Greys",
    legend=True,
    return_trajs=False,
):
    """Descend an energy from 2-D state patterns and plot landscape and trajectories (the blog's).

    Args:
        energy_func: ``energy_func(state, stored, scale, mask=None) -> [..., n]``, e.g.
            :func:`energy_attn.hopfield_energy` or :func:`energy_attn.elastic_energy`; any
            callable works (autograd descent when it has no closed-form gradient).
        state_patterns: initial states (queries) ``[n, 2]`` or ``[1, n, 2]``.
        context: stored patterns (keys) ``[m, 2]`` or ``[1, m, 2]``; ``None`` is bare
            self-attention (the state patterns are the stored patterns, held fixed).
        scale: inverse temperature ``β`` (default ``2 ** -0.5``, the transformer default for
            ``d = 2``).
        step_size: ``η``; num_steps: ``T`` (as :func:`energy_attn.minimize_energy`).
        values_post_processing_func: optional map applied to the final states ``[1, n, 2] ->
            [1, n, 2]`` (e.g. an ``nn.Linear(2, 2)`` value map); drawn as yellow arrows/crosses.
        plot_grid_size: half-width of the plotted square ``[-s, s]²`` (default: fits every
            point).
        plot_title: axes title.
        ax: axes to draw on (a ``"3d"`` axes when ``plot_3d``); default a new pyplot figure.
        plot_3d: draw the energy as a 3-D surface with trajectories at their energies.
        optimizer, momentum: descent optimizer (docs/math.md §4); default plain gradient descent.
        grid_points: grid resolution per axis (``>= 2``).
        cmap: colormap of the landscape (light = low energy: valleys).
        legend: draw a legend naming the markers, below the axes' x label (a new figure uses
            the constrained layout, so ``fig.savefig`` keeps it; on your own figure use
            ``layout="constrained"`` or ``bbox_inches="tight"``).
        return_trajs: also return the trajectory dict of :func:`energy_attn.minimize_energy`
            (``"queries"``/``"energies"``, T+1 entries of ``[1, n, 2]``/``[1, n]``), plus
            ``"values"`` (``[1, n, 2]``) when a value map is given.

    Returns:
        ``(fig, ax)``, or ``(fig, ax, trajs)`` with ``return_trajs``. Each trajectory is one
        line with gid ``"trajectory"``; the landscape is a filled contour (or a surface).

    Raises:
        TypeError: a non-callable ``energy_func`` or value map; patterns that are not float
            tensors.
        ValueError: patterns not of shape ``[n, 2]``/``[1, n, 2]`` or not finite; a bad
            ``scale``, ``step_size``, ``num_steps``, ``optimizer``, ``plot_grid_size`` or
            ``grid_points``; an ``ax`` that does not match ``plot_3d``; a value map not giving
            ``[1, n, 2]``; non-finite descent or value-mapped patterns without
            ``plot_grid_size``.
    """
    if not callable(energy_func):
        raise TypeError(f"energy_func must be callable, got {type(energy_func).__name__}")
    state = _as_patterns("state_patterns", state_patterns)
    stored = state if context is None else _as_patterns("context", context)
    check_same_device(state_patterns=state, context=stored)
    if stored.dtype != state.dtype:
        stored, state = stored.double(), state.double()
    scale = check_finite_number("scale", scale, positive=True) if exists(scale) else 2**-0.5
    if exists(plot_grid_size):
        plot_grid_size = check_finite_number("plot_grid_size", plot_grid_size, positive=True)
    if isinstance(grid_points, bool) or not isinstance(grid_points, int) or grid_points < 2:
        raise ValueError(f"grid_points must be an int >= 2, got {grid_points!r}")
    if exists(values_post_processing_func) and not callable(values_post_processing_func):
        raise TypeError("values_post_processing_func must be callable, got "
                        f"{type(values_post_processing_func).__name__}")
    if exists(ax) and (ax.name == "3d") != bool(plot_3d):
        raise ValueError(f"ax is a {ax.name!r} axes but plot_3d={plot_3d}; pass "
                         "a 3-D axes (projection='3d') exactly when plot_3d=True")
    require_matplotlib()

    energy = functools.partial(energy_func, scale=scale)
    with torch.no_grad():
        trajs = minimize_energy(
            energy, state[None], stored[None], step_size=step_size, num_steps=num_steps,
            return_trajs=True, optimizer=optimizer, momentum=momentum,
        )
        path = torch.stack(trajs["queries"])[:, 0]  # [T+1, n, 2]
        path_energy = torch.stack(trajs["energies"])[:, 0]  # [T+1, n]
        final = path[-1]
        values = None
        if exists(values_post_processing_func):
            values = values_post_processing_func(final[None].to(state.dtype))
            if not isinstance(values, torch.Tensor) or tuple(values.shape) != (1, *final.shape):
                raise ValueError(
                    "values_post_processing_func must map [1, n, 2] to [1, n, 2], got "
                    f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values)}"
                )
            values = values.detach()
            trajs["values"] = values
            values = values[0]

        half = plot_grid_size or _auto_half_width(
            state, stored, path.reshape(-1, 2), *([values] if exists(values) else [])
        )
        axis = torch.linspace(-half, half, grid_points, dtype=state.dtype, device=state.device)
        gx, gy = torch.meshgrid(axis, axis, indexing="xy")  # [G, G] each
        grid = torch.stack((gx, gy), dim=-1).reshape(1, -1, 2)  # [1, G·G, 2]
        landscape = energy(grid, stored[None], mask=None).reshape(grid_points, grid_points)

    def np_(t):
        return t.detach().cpu().double().numpy()

    gx, gy, landscape = np_(gx), np_(gy), np_(landscape)
    fig, ax = new_axes(ax, projection="3d" if plot_3d else None,
                       figsize=(7.0, 5.5) if plot_3d else (6.0, 5.0))

    if plot_3d:
        surf = ax.plot_surface(gx, gy, landscape, cmap=cmap, alpha=0.55, linewidth=0,
                               antialiased=True)
        fig.colorbar(surf, ax=ax, shrink=0.6, pad=0.1)  # the z axis is labelled "energy"
        with torch.no_grad():
            e_stored = energy(stored[None], stored[None], mask=None)[0]
        ax.scatter(*np_(stored).T, np_(e_stored), facecolors="none", edgecolors=STORED,
                   s=50, linewidths=1.5, label="stored patterns")
        for i in range(path.shape[1]):
            ax.plot(*np_(path[:, i]).T, np_(path_energy[:, i]), color=STATE, lw=1.2,
                    gid=GID_TRAJECTORY)
        ax.scatter(*np_(path[0]).T, np_(path_energy[0]), color=STATE, s=20,
                   label="initial states")
        ax.scatter(*np_(final).T, np_(path_energy[-1]), color=STATE, marker="x", s=40,
                   label=f"after {num_steps} step(s)")
        if exists(values):
            with torch.no_grad():
                e_values = energy(values[None], stored[None], mask=None)[0]
            for f, fe, v, ve in zip(np_(final), np_(path_energy[-1]), np_(values), np_(e_values)):
                ax.plot([f[0], v[0]], [f[1], v[1]], [fe, ve], color=VALUE, lw=1.2)
            ax.scatter(*np_(values).T, np_(e_values), color=VALUE, marker="X", s=50,
                       edgecolors="k", linewidths=0.5, label="value-mapped outputs")
        ax.set_zlabel("energy")
    else:
        filled = ax.contourf(gx, gy, landscape, levels=30, cmap=cmap)
        ax.contour(gx, gy, landscape, levels=filled.levels, colors="k", linewidths=0.3,
                   alpha=0.35)
        fig.colorbar(filled, ax=ax, label="energy")
        ax.scatter(*np_(stored).T, facecolors="none", edgecolors=STORED, s=60, linewidths=1.5,
                   label="stored patterns", zorder=3)
        for i in range(path.shape[1]):
            ax.plot(*np_(path[:, i]).T, color=STATE, lw=0.8, alpha=0.6, gid=GID_TRAJECTORY,
                    zorder=4)
        if num_steps > 0:
            start = np_(path[:-1].reshape(-1, 2))  # [T·n, 2] arrow tails
            step = np_((path[1:] - path[:-1]).reshape(-1, 2))  # [T·n, 2] displacements
            ax.quiver(*start.T, *step.T, color=STATE, angles="xy", scale_units="xy", scale=1,
                      width=0.004, headwidth=4, headlength=5, minlength=0, zorder=5)
        ax.scatter(*np_(path[0]).T, color=STATE, s=20, label="initial states", zorder=6)
        ax.scatter(*np_(final).T, color=STATE, marker="x", s=45, linewidths=1.5,
                   label=f"after {num_steps} step(s)", zorder=6)
        if exists(values):
            move = np_(values - final)
            ax.quiver(*np_(final).T, *move.T, color=VALUE, edgecolor="k", linewidth=0.4,
                      angles="xy", scale_units="xy", scale=1, width=0.005, headwidth=4,
                      headlength=5, minlength=0, zorder=7)
            ax.scatter(*np_(values).T, color=VALUE, marker="X", s=60, edgecolors="k",
                       linewidths=0.6, label="value-mapped outputs", zorder=8)
        ax.set_xlim(-half, half)
        ax.set_ylim(-half, half)
        ax.set_aspect("equal")
    ax.set_xlabel("pattern dim 1")
    ax.set_ylabel("pattern dim 2")
    if exists(plot_title):
        ax.set_title(plot_title)
    if legend:  # below the x label, so it hides no pattern, label or title
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), bbox_transform=below_x_axis(ax),
                  ncol=2, fontsize="small", frameon=False)
    return (fig, ax, trajs) if return_trajs else (fig, ax)


def _energies_of(name: str, trace) -> list[torch.Tensor]:
    """A trajectory dict (its ``"energies"``) or a sequence of per-step energy tensors."""
    steps = trace["energies"] if isinstance(trace, Mapping) else trace
    if not isinstance(steps, Sequence) or len(steps) == 0 or not all(
        isinstance(e, torch.Tensor) for e in steps
    ):
        raise ValueError(
            f"traces[{name!r}] must be a trajectory dict with 'energies' or a non-empty list of "
            "energy tensors (one per step)"
        )
    return steps


def plot_energy_trace(traces, ax=None, title=None, log_gap=False):
    """Energy per descent step, one line per optimizer (mean over patterns).

    Args:
        traces: ``{label: trajectory}`` where a trajectory is the dict returned by
            :func:`energy_attn.minimize_energy` with ``return_trajs=True`` (its
            ``"energies"``: T+1 tensors ``[..., n]``) or a list of such per-step tensors.
        ax: axes to draw on (default a new pyplot figure).
        title: axes title.
        log_gap: plot, on a log axis, each pattern's gap ``E_t − E_best`` to the lowest energy
            that pattern reaches in any trace and step (mean over patterns); this separates
            fast optimizers better than raw energies. Needs the same patterns in every trace.
            Otherwise raw energies: mean line and a min–max band over patterns.

    Returns:
        ``(fig, ax)``; each optimizer's mean line has gid ``"energy_trace"`` and its label.
    """
    if not isinstance(traces, Mapping) or not traces:
        raise ValueError("traces must be a non-empty mapping {label: trajectory}")
    require_matplotlib()
    import numpy as np

    curves = {}
    for name, trace in traces.items():
        steps = _energies_of(name, trace)
        # [T+1, P]: one row per step, one column per pattern (all leading dims flattened)
        curves[name] = np.stack([s.detach().cpu().double().reshape(-1).numpy() for s in steps])
    if log_gap:
        widths = {e.shape[1] for e in curves.values()}
        if len(widths) != 1:
            raise ValueError(f"log_gap=True needs the same patterns in every trace, got "
                             f"{sorted(widths)} energies per step")
        best = np.min([e.min(axis=0) for e in curves.values()], axis=0)  # [P]
        scale = np.maximum(np.abs(best), 1.0)
        # Gaps at rounding level are noise: floor them at a few float32 ulps of the energy.
        floor = 4 * np.finfo(np.float32).eps * scale
        curves = {k: np.maximum(e - best, floor) for k, e in curves.items()}
    fig, ax = new_axes(ax, figsize=(6.0, 4.0))
    for name, e in curves.items():
        t = np.arange(e.shape[0])
        (line,) = ax.plot(t, e.mean(axis=1), marker="o", ms=3, label=name, gid=GID_ENERGY_TRACE)
        if not log_gap:
            ax.fill_between(t, e.min(axis=1), e.max(axis=1), color=line.get_color(), alpha=0.12)
    if log_gap:
        ax.set_yscale("log")
        ax.set_ylabel("energy − best energy of the pattern\n(mean over patterns)")
    else:
        ax.set_ylabel("energy (mean over patterns,\nmin–max band)")
    ax.set_xlabel("descent step")
    ax.legend(fontsize="small")
    if exists(title):
        ax.set_title(title)
    return fig, ax
