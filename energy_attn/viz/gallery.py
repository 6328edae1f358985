"""The blog's figures as PNG files: the flatland scenarios, the optimizers and the norm sweep.

:func:`write_gallery` is what ``energy-attn landscape`` runs. Figures are built on
``matplotlib.figure.Figure`` directly (no pyplot), so writing them changes no global state and
needs no display.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .._utils import check_positive_int, check_seed, exists

D2 = 2**-0.5  # the transformer default scale 1/√d for d = 2


def seeded_generator(seed, name: str = "seed") -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (the global RNG is left alone).

    Raises:
        TypeError: ``seed`` is not an int. ValueError: outside ``[-2**63, 2**64)``.
    """
    return torch.Generator().manual_seed(check_seed(name, seed))


def toy_patterns(seed=0, n_state=16, n_stored=32, dtype=torch.float32):
    """The blog's flatland toy patterns: ``(state [1, n_state, 2], stored [1, n_stored, 2])``.

    Standard normal, drawn from a generator seeded with ``seed`` (the global RNG is left
    alone). Raises TypeError/ValueError naming ``seed``, ``n_state``, ``n_stored`` (ints
    ``>= 1``) or ``dtype`` (a floating-point ``torch.dtype``).
    """
    n_state, n_stored = check_positive_int("n_state", n_state), check_positive_int(
        "n_stored", n_stored)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    gen = seeded_generator(seed)
    state = torch.randn(1, n_state, 2, generator=gen, dtype=dtype)
    stored = torch.randn(1, n_stored, 2, generator=gen, dtype=dtype)
    return state, stored


def value_maps(seed=0):
    """Random ``nn.Linear(2, 2, bias=False)`` query, key and value maps (the blog's Q/K/V cell)."""
    gen = seeded_generator(seed + 1)  # local: the global RNG is left alone
    maps = []
    for _ in range(3):
        lin = torch.nn.utils.skip_init(torch.nn.Linear, 2, 2, bias=False)
        with torch.no_grad():
            # nn.Linear's default init, drawn from our generator: U(−1/√2, 1/√2).
            lin.weight.uniform_(-D2, D2, generator=gen)
        maps.append(lin)
    return tuple(maps)


# name -> (title, keyword arguments of simulate_and_plot_patterns); the blog's section 5.
FLATLAND = {
    "flatland_big_step": ("bare cross-attention: one big step (η = 1)",
                          {"scale": D2, "step_size": 1.0, "num_steps": 1}),
    "flatland_small_step": ("small steps go nowhere (η = 0.1)",
                            {"scale": D2, "step_size": 0.1, "num_steps": 1}),
    "flatland_many_steps": ("many big steps converge near the global minimum (T = 10)",
                            {"scale": D2, "step_size": 1.0, "num_steps": 10}),
    "flatland_high_temperature": ("high temperature (β = 0.1/√2): one broad basin",
                                  {"scale": 0.1 * D2, "step_size": 1.0, "num_steps": 1}),
    "flatland_low_temperature": ("low temperature (β = 10/√2): separate valleys, T = 5",
                                 {"scale": 10 * D2, "step_size": 1.0, "num_steps": 5}),
    "flatland_qkv": ("query/key/value maps (β = 2/√2)",
                     {"scale": 2 * D2, "step_size": 1.0, "num_steps": 1, "plot_grid_size": 2}),
    "flatland_self_attention": ("bare self-attention (β = 1/√2)",
                                {"scale": D2, "step_size": 1.0, "num_steps": 1,
                                 "self_attention": True}),
}
OPTIMIZER_RUNS = {
    "gd": {"optimizer": "gd"},
    "momentum (ρ = 0.5)": {"optimizer": "momentum", "momentum": 0.5},
    "nesterov (ρ = 0.5)": {"optimizer": "nesterov", "momentum": 0.5},
    "newton_2nd1st": {"optimizer": "newton_2nd1st"},
}


def flatland_kwargs(name, state, stored, seed=0):
    """Positional/keyword arguments of :func:`simulate_and_plot_patterns` for a FLATLAND entry."""
    title, kw = FLATLAND[name]
    kw = dict(kw)
    context = None if kw.pop("self_attention", False) else stored
    if name == "flatland_qkv":
        to_q, to_k, to_v = value_maps(seed)
        with torch.no_grad():
            state, context = to_q(state), to_k(stored)
        kw["values_post_processing_func"] = to_v
    return dict(state_patterns=state, context=context, plot_title=title, **kw)


def optimizer_figure(state, stored, *, grid_points=80):
    """The optimizers of ``OPTIMIZER_RUNS`` on one landscape: a 2×2 ``Figure`` and the traces.

    ``β = 2/√2``, ``η = 0.5``, ``T = 8`` from the toy patterns ``state [1, n, 2]`` and
    ``stored [1, m, 2]``. One legend for the four panels, below them (the constrained layout
    keeps it inside the figure, clear of every title and label). Returns ``(fig, traces)``,
    ``traces`` the trajectory dicts keyed by the panel labels (for :func:`plot_energy_trace`).
    """
    from matplotlib.figure import Figure

    from ..energies import hopfield_energy
    from .landscape import simulate_and_plot_patterns

    fig = Figure(figsize=(11.0, 10.0), layout="constrained")
    traces = {}
    for i, (label, kw) in enumerate(OPTIMIZER_RUNS.items()):
        _, ax, traj = simulate_and_plot_patterns(
            hopfield_energy, state, context=stored, scale=2 * D2, step_size=0.5, num_steps=8,
            plot_grid_size=4.5,
            plot_title=f"{label}, η = 0.5, T = 8", ax=fig.add_subplot(2, 2, i + 1),
            grid_points=grid_points, legend=False, return_trajs=True, **kw,
        )
        traces[label] = traj
        if i == 0:
            handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), frameon=False)
    return fig, traces


def write_gallery(out_dir, *, full=False, seed=0, progress=None, dpi=None):
    """Write the blog's flatland figures, an optimizer comparison and the norm sweep as PNGs.

    Args:
        out_dir: directory (created if missing).
        full: the blog's resolution (200-point grids, the 100 × 50 sweep); default quick
            (80-point grids, a 12 × 8 sweep).
        seed: seed of the toy patterns, value maps and sweep samples.
        progress: optional ``progress(done, total, label)`` callback.
        dpi: PNG resolution (default 110 quick, 150 full).

    Returns:
        The list of written paths.

    Raises:
        TypeError/ValueError: a bad ``seed`` or a ``progress`` that is not callable.
    """
    import numpy as np
    from matplotlib.figure import Figure

    from ..energies import hopfield_energy
    from .landscape import plot_energy_trace, simulate_and_plot_patterns
    from .sweep import norm_sweep, plot_norm_sweep

    if exists(progress) and not callable(progress):
        raise TypeError(f"progress must be callable, got {type(progress).__name__}")
    seeded_generator(seed)  # a bad seed fails before any drawing
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid_points = 200 if full else 80
    dpi = dpi or (150 if full else 110)
    if full:
        dims = np.linspace(2.0, 1024, num=100, dtype=np.int32)
        beta_scales = np.linspace(0.2, 2.0, num=50, dtype=np.float32)
    else:
        dims = np.linspace(2.0, 1024, num=12, dtype=np.int32)
        beta_scales = np.linspace(0.2, 2.0, num=8, dtype=np.float32)
    total = len(FLATLAND) + 2 + len(dims)
    done = 0

    def tick(label):
        nonlocal done
        done += 1
        if exists(progress):
            progress(done, total, label)

    written = []

    def save(fig, name):
        path = out / f"{name}.png"
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        written.append(path)
        tick(path.name)

    state, stored = toy_patterns(seed)
    for name in FLATLAND:
        fig = Figure(figsize=(6.0, 5.0), layout="constrained")
        simulate_and_plot_patterns(hopfield_energy, ax=fig.add_subplot(),
                                   grid_points=grid_points,
                                   **flatland_kwargs(name, state, stored, seed))
        save(fig, name)

    # Optimizers on one landscape: 2×2 trajectories, then the energy traces.
    fig, traces = optimizer_figure(state, stored, grid_points=grid_points)
    save(fig, "flatland_optimizers")
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    plot_energy_trace(traces, ax=fig.add_subplot(), log_gap=True,
                      title="energy per step on the landscape above (β = 2/√2, η = 0.5)")
    save(fig, "energy_trace")

    norms = norm_sweep(dims, beta_scales, seed=seed,
                       progress=lambda i, n: tick(f"norm sweep d_k = {dims[i - 1]}"))
    fig = Figure(figsize=(8.0, 6.0), layout="constrained")
    plot_norm_sweep(dims, beta_scales, norms=norms, ax=fig.add_subplot(),
                    title="bare self-attention: how far one step moves 32 patterns (float32)")
    path = out / "norm_sweep.png"
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    written.append(path)
    return written
