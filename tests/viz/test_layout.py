"""Legends are not clipped and hide no title or label: measured on a headless Agg canvas.

What ``fig.savefig(path)`` writes is the figure's bbox at the same scale, so a legend whose
window extent lies inside ``fig.bbox`` is saved whole (README block 8 saves without
``bbox_inches="tight"``).
"""

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.transforms import Bbox

from energy_attn import hopfield_energy
from energy_attn.viz import simulate_and_plot_patterns, toy_patterns
from energy_attn.viz.gallery import optimizer_figure

PX = 0.5  # rounding slack of a window extent, in pixels


def _renderer(fig):
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _overlap(a: Bbox, b: Bbox) -> float:
    """Area (px²) shared by two window extents."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(w, 0.0) * max(h, 0.0)


def _check_legends(fig):
    """Every legend of ``fig`` lies inside the figure and overlaps no axes, title or label."""
    r = _renderer(fig)
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert legends, "the figure has no legend to check"
    for leg in legends:
        box = leg.get_window_extent(r)
        inside = (box.x0 >= fig.bbox.x0 - PX and box.y0 >= fig.bbox.y0 - PX
                  and box.x1 <= fig.bbox.x1 + PX and box.y1 <= fig.bbox.y1 + PX)
        assert inside, f"legend {box.bounds} is clipped by the figure {fig.bbox.bounds}"
        for ax in fig.axes:
            pieces = {"axes": ax.bbox, "x axis (ticks, label)": ax.xaxis.get_tightbbox(r)}
            for name, text in (("title", ax.title), ("x label", ax.xaxis.label),
                               ("y label", ax.yaxis.label)):
                if text.get_text():
                    pieces[name] = text.get_window_extent(r)
            for name, other in pieces.items():
                if other is None:
                    continue
                assert _overlap(box, other) <= PX, (
                    f"legend {box.bounds} overlaps the {name} {other.bounds} of axes "
                    f"{ax.get_title()!r}")


def test_readme_landscape_figure_saves_its_legend_whole():
    # README block 8, as written, plus a title.
    state, stored = toy_patterns(seed=0)
    fig, ax = simulate_and_plot_patterns(hopfield_energy, state, context=stored,
                                         scale=10 * 2**-0.5, step_size=1.0, num_steps=5,
                                         grid_points=24, plot_title="low temperature")
    assert ax.get_legend() is not None
    _check_legends(fig)


def test_3d_landscape_legend_inside_the_figure():
    state, stored = toy_patterns(seed=0, n_state=4, n_stored=6)
    fig, _ = simulate_and_plot_patterns(hopfield_energy, state, context=stored, num_steps=2,
                                        grid_points=12, plot_3d=True, plot_title="3-D")
    _check_legends(fig)


@pytest.mark.parametrize("fontsize", [None, 14])
def test_legend_clears_the_x_label_at_any_font_size(fontsize):
    import matplotlib as mpl

    state, stored = toy_patterns(seed=1, n_state=4, n_stored=6)
    rc = {} if fontsize is None else {"font.size": fontsize, "axes.labelsize": fontsize + 2}
    with mpl.rc_context(rc):
        fig, _ = simulate_and_plot_patterns(hopfield_energy, state, context=stored,
                                            grid_points=12, plot_title="t")
        _check_legends(fig)


def test_optimizer_gallery_figure_one_legend_clear_of_every_panel():
    # energy-attn landscape's flatland_optimizers.png (the 2×2 panels).
    state, stored = toy_patterns(seed=0)
    fig, traces = optimizer_figure(state, stored, grid_points=16)
    assert len(traces) == 4 and len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].texts] == [
        "stored patterns", "initial states", "after 8 step(s)"]
    _check_legends(fig)


def test_training_comparison_legend_hides_no_curve():
    """``energy-attn compare``'s figure: many long variant names, one legend below both
    panels (it used to sit on the loss curves)."""
    import math

    from energy_attn.training.compare import compare_figure

    def run(offset, diverged=False):
        evals = [{"step": s, "val_loss": 5.0 - math.log1p(s) / 3 + offset, "time": s / 10}
                 for s in range(0, 301, 25)]
        return {"eval": evals, "diverged_at": 50 if diverged else None}

    logs = {f"optimizer=aiadam-attention_norm=loss-lr={lr}": [run(i / 10), run(i / 10 + 0.01)]
            for i, lr in enumerate((0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0))}
    logs["optimizer=adamw-lr=0.001"] = [run(0.2), run(0.0, diverged=True)]
    fig = compare_figure(logs)
    assert len(fig.legends) == 1 and not any(ax.get_legend() for ax in fig.axes)
    assert any("diverged, not shown" in t.get_text() for t in fig.legends[0].texts)
    _check_legends(fig)
