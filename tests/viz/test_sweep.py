import numpy as np
import pytest
import torch
from matplotlib.colors import LogNorm
from matplotlib.contour import ContourSet

from energy_attn import VanillaSoftmaxAttention
from energy_attn.viz import norm_sweep, plot_norm_sweep


def test_norm_sweep_measures_bare_self_attention():
    dims, scales = [2, 16, 64], [0.5, 2.0]
    calls = []
    norms = norm_sweep(dims, scales, n_patterns=8, seed=3, dtype=torch.float64,
                       progress=lambda done, total: calls.append((done, total)))
    assert norms.shape == (2, 3)
    assert calls == [(1, 3), (2, 3), (3, 3)]
    # Recompute one entry: the sweep draws d_k by d_k, scale by scale from one generator.
    gen = torch.Generator().manual_seed(3)
    for dim in dims[:2]:
        for s in scales:
            x = torch.randn(1, 8, dim, generator=gen, dtype=torch.float64)
    attn = VanillaSoftmaxAttention(16, dim_head=16)
    expected = torch.linalg.vector_norm(x - attn(x, bare_attn=True, scale=2.0 * 16**-0.5))
    assert norms[1, 1] == pytest.approx(expected.item(), rel=1e-12)
    # Lower temperature (larger scale) moves the patterns less (valleys are deeper).
    assert (norms[1, 1:] < norms[0, 1:]).all()


def test_norm_sweep_leaves_the_global_rng_alone():
    # It built a module per d_k, whose weight init drew from the global RNG: a seeded script
    # that drew a sweep got different random numbers afterwards.
    torch.manual_seed(0)
    before = torch.get_rng_state()
    norm_sweep([2, 8], [1.0], n_patterns=4)
    assert torch.equal(torch.get_rng_state(), before)


def test_blog_value_at_512_and_the_float32_floor():
    """d_k = 512, transformer default: a move of order 1e-6 (the blog printed 5.6e-6)."""
    n64 = norm_sweep([512], [1.0], dtype=torch.float64, seed=0)[0, 0]
    n32 = norm_sweep([512], [1.0], dtype=torch.float32, seed=0)[0, 0]
    assert 1e-8 < n64 < 1e-4
    assert n32 < 1e-4  # float32 rounds most of it away
    # Far out, float32 returns the input exactly while the true move is tiny but positive.
    far64 = norm_sweep([512], [2.0], dtype=torch.float64)[0, 0]
    far32 = norm_sweep([512], [2.0], dtype=torch.float32)[0, 0]
    assert 0 < far64 < 1e-12 and far32 == 0


def test_plot_norm_sweep_log_colour_scale_and_reference_lines():
    dims, scales = np.array([2, 64, 512, 1024]), np.array([0.2, 1.0, 2.0])
    fig, ax = plot_norm_sweep(dims, scales, n_patterns=4, title="sweep")
    (contour,) = [c for c in ax.collections if isinstance(c, ContourSet)]
    assert isinstance(contour.norm, LogNorm)
    assert np.allclose(contour.levels, np.logspace(-8, 2, 11))
    lines = ax.get_lines()
    horizontal = [line.get_ydata()[0] for line in lines
                  if line.get_ydata()[0] == line.get_ydata()[1]]
    vertical = [line.get_xdata()[0] for line in lines if line.get_xdata()[0] == line.get_xdata()[1]]
    assert horizontal == [1.0] and vertical == [2, 512]
    assert ax.get_title() == "sweep"
    assert len(fig.axes) == 2  # the plot and its colour bar


def test_plot_norm_sweep_takes_precomputed_norms():
    norms = np.array([[1.0, 1e-3], [1e-2, 0.0]])
    _, ax = plot_norm_sweep([2, 512], [1.0, 2.0], norms=norms)
    labels = ax.get_legend_handles_labels()[1] + [t.get_text() for t in ax.get_legend().texts]
    assert any("exactly 0" in label for label in labels)


@pytest.mark.parametrize(
    "dims, scales, kwargs, error, match",
    [
        ([2.5, 4.0], [1.0, 2.0], {}, TypeError, "dims must hold integers"),
        ([0, 4], [1.0, 2.0], {}, ValueError, "dims must hold finite positive"),
        ([2, 4], [1.0, -2.0], {}, ValueError, "beta_scales"),
        ([[2, 4]], [1.0, 2.0], {}, ValueError, "1-D"),
        ([2, 4], [1.0], {}, ValueError, "at least 2"),
        ([2, 4], [1.0, 2.0], {"norms": np.ones((2, 3))}, ValueError, "norms must have shape"),
        ([2, 4], [1.0, 2.0], {"norms": np.ones((2, 2)), "seed": 1}, TypeError, "only apply"),
        ([2, 4], [1.0, 2.0], {"n_patterns": 0}, ValueError, "n_patterns"),
        ([2, 4], [1.0, 2.0], {"dtype": torch.float16}, TypeError, "dtype"),
        # these used to fail inside torch or matplotlib, naming no argument
        ([2, 4], [1.0, 2.0], {"seed": 2**70}, ValueError, r"seed must lie in"),
        ([2, 4], [1.0, 2.0], {"seed": "0"}, TypeError, "seed must be an int"),
        ([2, 4], [1.0, 2.0], {"progress": 3}, TypeError, "progress must be callable"),
        ([2, 4], [1.0, 2.0], {"norms": np.ones((2, 2)), "levels": [-1.0, 1.0]}, ValueError,
         "levels must hold finite positive"),
        ([2, 4], [1.0, 2.0], {"norms": np.ones((2, 2)), "levels": [1.0, 0.1, 10.0]},
         ValueError, "levels must hold at least 2 increasing"),
        ([2, 4], [1.0, 2.0], {"norms": np.ones((2, 2)), "levels": [1.0]}, ValueError,
         "levels must hold at least 2 increasing"),
    ],
)
def test_plot_norm_sweep_rejects_bad_input(dims, scales, kwargs, error, match):
    with pytest.raises(error, match=match):
        plot_norm_sweep(dims, scales, **kwargs)
