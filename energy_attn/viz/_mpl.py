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
    New figures use the constrained layout, which keeps legends placed outside the axes (and
    colorbars, titles, labels) inside the figure: ``fig.savefig(path)`` clips nothing.
    """
    if ax is not None:
        return ax.figure, ax
    require_matplotlib()
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot(projection=projection)


def below_x_axis(ax):
    """A transform for ``bbox_to_anchor=(0.5, 0)`` that lies just below ``ax``'s x tick labels
    and x label, whatever the axes' size: the drop is in points, from the current rcParams.

    A legend anchored there (``loc="upper center"``) overlaps neither the axes nor the axes
    below it (their titles); a layout engine (constrained, tight) then makes room for it.
    """
    import matplotlib as mpl
    from matplotlib.font_manager import FontProperties
    from matplotlib.transforms import ScaledTranslation

    rc = mpl.rcParams

    def line(size):  # height of one line of text of that font size, in points
        return 1.3 * FontProperties(size=size).get_size_in_points()

    drop = (max(rc["xtick.major.size"], 0.0) + rc["xtick.major.pad"] + line(rc["xtick.labelsize"])
            + rc["axes.labelpad"] + line(rc["axes.labelsize"]) + 2.0)
    return ax.transAxes + ScaledTranslation(0.0, -drop / 72.0, ax.figure.dpi_scale_trans)
