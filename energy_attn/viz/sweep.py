"""How far bare self-attention moves patterns, over ``d_k`` × scale (the blog's contour plot).

For every latent dimension ``d`` and scale factor ``s`` the blog samples ``x ∈ R^{32×d}`` and
measures ``‖x − softmax(β x xᵀ) x‖`` with ``β = s / √d`` (bare self-attention, one energy step).
Each pattern's own logit ``β‖x_i‖² ≈ s√d`` beats the others' by about that much, so the move
shrinks like ``exp(−s√d)``. At ``d = 512`` and the default scale the true move is ~1e-6 (the
blog measured 5.6e-6), i.e. ~1e-8 per element: below float32's resolution of O(1) numbers, so
float32 mostly rounds it away, and at larger ``d`` or scale returns the input unchanged (an
exact 0, drawn blank). ``dtype=torch.float64`` shows the true decay.
"""

from __future__ import annotations

import numbers

import torch

from .._utils import exists
from ._mpl import new_axes, require_matplotlib


def _as_1d(name: str, values, *, integer: bool):
    import numpy as np

    arr = np.asarray(values)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {arr.shape}")
    if integer and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must hold finite positive numbers, got {arr}")
    return arr


def norm_sweep(dims, beta_scales, *, n_patterns=32, seed=0, dtype=torch.float32, progress=None):
    """``‖x − bare_self_attention(x)‖`` for every ``(scale factor, d_k)`` (the blog's sweep).

    Args:
        dims: latent dimensions ``d_k`` (positive ints), length ``D``.
        beta_scales: scale factors ``s`` relative to the transformer default; the inverse
            temperature is ``β = s · d_k ** -0.5``. Length ``S``.
        n_patterns: number of patterns sampled per point (the blog's 32).
        seed: seed of the sampling (fresh patterns for every point, like the blog).
        dtype: ``torch.float32`` reproduces the blog (rounding-dominated below ~1e-6, exact
            zeros further out); ``torch.float64`` shows the true moves.
        progress: optional ``progress(done, total)`` called after each ``d_k``.

    Returns:
        numpy array ``[S, D]`` of norms (rows: scale factors, columns: dimensions).

    Raises:
        TypeError: non-integer ``dims``, a ``seed`` that is not an int, a ``dtype`` other than
            float32/float64, a ``progress`` that is not callable.
        ValueError: empty or non-positive ``dims``/``beta_scales``, ``n_patterns < 1``, a
            ``seed`` outside ``[-2**63, 2**64)``.
    """
    import numpy as np

    from ..layers.attention import VanillaSoftmaxAttention
    from .gallery import seeded_generator

    dims = _as_1d("dims", dims, integer=True)
    beta_scales = _as_1d("beta_scales", beta_scales, integer=False)
    if (isinstance(n_patterns, bool) or not isinstance(n_patterns, numbers.Integral)
            or n_patterns < 1):
        raise ValueError(f"n_patterns must be an int >= 1, got {n_patterns!r}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if exists(progress) and not callable(progress):
        raise TypeError(f"progress must be callable, got {type(progress).__name__}")
    gen = seeded_generator(seed)
    norms = np.zeros((len(beta_scales), len(dims)))
    # bare_attn uses no projection weights and checks no pattern size: one 1-wide module serves
    # every d_k. Its unused weights are drawn from a forked RNG: the global one is left alone.
    with torch.random.fork_rng(devices=[]):
        bare_attention = VanillaSoftmaxAttention(1, heads=1, dim_head=1)
    with torch.no_grad():
        for i, dim in enumerate(dims):
            dim = int(dim)
            for j, s in enumerate(beta_scales):
                x = torch.randn(1, n_patterns, dim, generator=gen, dtype=dtype)
                out = bare_attention(x, bare_attn=True, scale=float(s) * dim**-0.5)
                norms[j, i] = torch.linalg.vector_norm(x - out).item()
            if exists(progress):
                progress(i + 1, len(dims))
    return norms


def plot_norm_sweep(dims, beta_scales, norms=None, ax=None, *, levels=None, title=None,
                    **sweep_kwargs):
    """Filled contour of :func:`norm_sweep` on a log colour scale, with the blog's reference lines.

    Args:
        dims, beta_scales: the sweep's axes (as :func:`norm_sweep`).
        norms: precomputed ``[S, D]`` norms; computed with :func:`norm_sweep` if ``None``.
        ax: axes to draw on (default a new pyplot figure).
        levels: contour levels (default one per decade, ``1e-8 … 1e2`` as the blog); values
            below the lowest level take its colour, exact zeros are left blank.
        title: axes title.
        **sweep_kwargs: ``n_patterns``, ``seed``, ``dtype``, ``progress`` for :func:`norm_sweep`.

    Returns:
        ``(fig, ax)``. Horizontal red line: the transformer default ``β = 1/√d_k``; vertical red
        lines: ``d_k = 2`` (flatland) and ``d_k = 512`` (the blog's high-dimensional check).

    Raises:
        TypeError/ValueError: as :func:`norm_sweep` for the axes; ``norms`` not of shape
            ``[S, D]``; fewer than 2 dims or scales; ``levels`` not at least 2 increasing
            positive finite values; ``sweep_kwargs`` together with ``norms``.
    """
    require_matplotlib()
    import numpy as np
    from matplotlib import colors, ticker

    dims_arr = _as_1d("dims", dims, integer=True)
    scales_arr = _as_1d("beta_scales", beta_scales, integer=False)
    if norms is None:
        norms = norm_sweep(dims_arr, scales_arr, **sweep_kwargs)
    elif sweep_kwargs:
        raise TypeError(f"{sorted(sweep_kwargs)} only apply when norms is None")
    norms = np.asarray(norms, dtype=np.float64)
    if norms.shape != (len(scales_arr), len(dims_arr)):
        raise ValueError(f"norms must have shape [len(beta_scales), len(dims)] = "
                         f"{(len(scales_arr), len(dims_arr))}, got {norms.shape}")
    if len(dims_arr) < 2 or len(scales_arr) < 2:
        raise ValueError("a contour plot needs at least 2 dims and 2 beta_scales")
    if levels is None:
        levels = np.logspace(-8, 2, 11)
    else:
        levels = _as_1d("levels", levels, integer=False).astype(np.float64)
        if len(levels) < 2 or np.any(np.diff(levels) <= 0):
            raise ValueError(f"levels must hold at least 2 increasing values, got {levels}")
    masked = np.ma.masked_where(~(norms > 0), norms)  # zeros (and NaN) have no log: blank
    fig, ax = new_axes(ax, figsize=(8.0, 6.0))
    contour = ax.contourf(
        dims_arr, scales_arr, masked, levels=levels, extend="both",
        norm=colors.LogNorm(vmin=levels[0], vmax=levels[-1]),
    )
    fig.colorbar(contour, ax=ax, format="%.0e", ticks=ticker.LogLocator(base=10),
                 label="‖inputs − outputs‖ of one bare self-attention step")
    ax.axhline(1.0, color="r", label="transformer default β = 1/√d_k")
    ax.axvline(2, color="r", ls="--", label="d_k = 2 (flatland)")
    ax.axvline(512, color="r", ls=":", label="d_k = 512 (the blog's check)")
    ax.set_xlabel("d_k")
    ax.set_ylabel("scale / (1/√d_k)")
    handles, _ = ax.get_legend_handles_labels()
    if np.any(norms == 0):
        from matplotlib.patches import Patch

        ax.set_facecolor("0.85")  # blank = exact zeros: the step changed nothing in this dtype
        handles.append(Patch(color="0.85", label="exactly 0 (output == input)"))
    ax.legend(handles=handles, loc="upper right", fontsize="small", framealpha=0.9)
    if exists(title):
        ax.set_title(title)
    return fig, ax
