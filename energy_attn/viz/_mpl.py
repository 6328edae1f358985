"""matplotlib, imported only when a plotting function runs (``import energy_attn`` stays light)."""

from __future__ import annotations


def require_matplotlib():
    """Import and return ``matplotlib``, or raise an ImportError that names the ``[viz]`` extra."""
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "energy_attn.viz needs matplotlib: pip install 'energy-attn[viz]'"
        ) from err
    return matplotlib


def new_axes(ax=None, *, projection=None, figsize=(6.0, 5.0)):
    """``(fig, ax)``: the given axes and their figure, or a new pyplot figure with one axes.

    New figures come from pyplot so notebooks display them; scripts that must not touch
    pyplot's global state pass their own ``ax`` (e.g. from ``matplotlib.figure.Figure()``).
    """
    if ax is not None:
        return ax.figure, ax
    require_matplotlib()
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=figsize)
    return fig, fig.add_subplot(projection=projection)
