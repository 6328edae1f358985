import functools
import io

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.contour import ContourSet

from energy_attn import elastic_energy, hopfield_energy, minimize_energy
from energy_attn.viz import plot_energy_trace, simulate_and_plot_patterns, toy_patterns


def endpoints(lines, i):
    """The ``i``-th point of every line, ``[n, 2]`` float32."""
    return torch.from_numpy(np.stack([line.get_xydata()[i] for line in lines])).float()


def trajectories(ax):
    return [line for line in ax.get_lines() if line.get_gid() == "trajectory"]


def contours(ax):
    return [c for c in ax.collections if isinstance(c, ContourSet)]


def test_runs_headless_on_agg():
    assert matplotlib.get_backend().lower() == "agg"
    state, stored = toy_patterns(0)
    fig, _ = simulate_and_plot_patterns(hopfield_energy, state, context=stored)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue().startswith(b"\x89PNG") and len(buf.getvalue()) > 10_000


@pytest.mark.parametrize("num_steps", [0, 1, 4])
def test_one_trajectory_per_state_pattern_with_contour(num_steps):
    state, stored = toy_patterns(1, n_state=7, n_stored=5)
    _fig, ax, trajs = simulate_and_plot_patterns(
        hopfield_energy, state, context=stored, num_steps=num_steps, plot_grid_size=3,
        grid_points=21, return_trajs=True, plot_title="t",
    )
    lines = trajectories(ax)
    assert len(lines) == 7
    assert all(line.get_xydata().shape == (num_steps + 1, 2) for line in lines)
    assert len(contours(ax)) == 2  # filled landscape + its level lines
    assert ax.get_xlim() == (-3, 3) and ax.get_ylim() == (-3, 3)
    assert ax.get_title() == "t"
    assert len(trajs["queries"]) == len(trajs["energies"]) == num_steps + 1
    # Each line is the descent's path: it starts at the state and ends at the final queries.
    torch.testing.assert_close(endpoints(lines, 0), state[0])
    torch.testing.assert_close(endpoints(lines, -1), trajs["queries"][-1][0])


def test_one_big_step_lands_on_softmax_attention():
    """η = 1, T = 1 (the blog's first figure): the crosses are softmax(β ξ Kᵀ) K."""
    state, stored = toy_patterns(2)
    beta = 2**-0.5
    _, ax = simulate_and_plot_patterns(hopfield_energy, state, context=stored, scale=beta,
                                       grid_points=11)
    end = endpoints(trajectories(ax), -1)
    expected = torch.softmax(beta * state[0] @ stored[0].T, dim=-1) @ stored[0]
    torch.testing.assert_close(end, expected, atol=1e-6, rtol=0)


def test_self_attention_stores_the_state_patterns():
    state, _ = toy_patterns(3, n_state=6)
    _, ax, trajs = simulate_and_plot_patterns(hopfield_energy, state, grid_points=11,
                                              return_trajs=True)
    stored_xy = ax.collections[len(contours(ax))].get_offsets()  # first scatter: stored
    torch.testing.assert_close(torch.tensor(stored_xy, dtype=torch.float32), state[0])
    expected = minimize_energy(functools.partial(hopfield_energy, scale=2**-0.5), state, state)
    torch.testing.assert_close(trajs["queries"][-1], expected)


def test_value_map_outputs_are_drawn():
    state, stored = toy_patterns(4, n_state=5)
    to_v = torch.nn.Linear(2, 2, bias=False)
    _, ax, trajs = simulate_and_plot_patterns(
        hopfield_energy, state, context=stored, values_post_processing_func=to_v,
        grid_points=11, return_trajs=True,
    )
    with torch.no_grad():
        expected = to_v(trajs["queries"][-1])
    torch.testing.assert_close(trajs["values"], expected)
    yellow = [c for c in ax.collections if c.get_label() == "value-mapped outputs"]
    assert len(yellow) == 1
    torch.testing.assert_close(torch.tensor(yellow[0].get_offsets(), dtype=torch.float32),
                               expected[0])


def test_plot_3d_surface_and_trajectories():
    state, stored = toy_patterns(5, n_state=4)
    _fig, ax = simulate_and_plot_patterns(hopfield_energy, state, context=stored, num_steps=3,
                                         plot_3d=True, grid_points=15)
    assert ax.name == "3d"
    assert len(trajectories(ax)) == 4
    assert all(line.get_data_3d()[0].shape == (4,) for line in trajectories(ax))


def test_optimizers_and_autograd_energies():
    state, stored = toy_patterns(6, n_state=3)

    def user_energy(xi, keys, scale, mask=None):  # no closed form: autograd descent
        return hopfield_energy(xi, keys, scale, mask=mask)

    _, _, a = simulate_and_plot_patterns(user_energy, state, context=stored, num_steps=3,
                                         optimizer="nesterov", momentum=0.5, grid_points=11,
                                         return_trajs=True)
    _, _, b = simulate_and_plot_patterns(hopfield_energy, state, context=stored, num_steps=3,
                                         optimizer="nesterov", momentum=0.5, grid_points=11,
                                         return_trajs=True)
    assert len(a["velocities"]) == 4
    torch.testing.assert_close(a["queries"][-1], b["queries"][-1])
    simulate_and_plot_patterns(elastic_energy, state, context=stored, grid_points=11)


def test_draws_on_a_given_axes():
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2)
    state, stored = toy_patterns(0, n_state=3)
    out_fig, out_ax = simulate_and_plot_patterns(hopfield_energy, state, context=stored,
                                                 ax=axes[1], grid_points=11)
    assert out_fig is fig and out_ax is axes[1]
    assert len(trajectories(axes[1])) == 3 and not trajectories(axes[0])


@pytest.mark.parametrize(
    "state, context, kwargs, error, match",
    [
        (torch.randn(1, 4, 3), None, {}, ValueError, "two-dimensional patterns"),
        (torch.randn(4, 2), torch.randn(5, 3), {}, ValueError, "context must hold two"),
        (torch.randn(2, 4, 2), None, {}, ValueError, "one batch"),
        (torch.randn(4), None, {}, ValueError, "state_patterns"),
        ([[0.0, 1.0]], None, {}, TypeError, "state_patterns must be a torch.Tensor"),
        (torch.ones(4, 2, dtype=torch.int64), None, {}, TypeError, "floating-point"),
        (torch.randn(4, 2), None, {"scale": -1.0}, ValueError, "scale"),
        (torch.randn(4, 2), None, {"plot_grid_size": 0}, ValueError, "plot_grid_size"),
        (torch.randn(4, 2), None, {"grid_points": 1}, ValueError, "grid_points"),
        (torch.randn(4, 2), None, {"num_steps": -1}, ValueError, "num_steps"),
        (torch.randn(4, 2), None, {"step_size": float("nan")}, ValueError, "step_size"),
        (torch.randn(4, 2), None, {"optimizer": "adam"}, ValueError, "optimizer"),
        # non-finite patterns used to fail in math.ceil ("cannot convert float NaN to
        # integer") or, as keys, to draw a blank landscape without a word
        (torch.tensor([[0.0, float("nan")]]), None, {}, ValueError,
         "state_patterns must be finite"),
        (torch.tensor([[float("inf"), 0.0]]), None, {}, ValueError,
         "state_patterns must be finite"),
        (torch.randn(4, 2), torch.full((3, 2), float("nan")), {}, ValueError,
         "context must be finite"),
        (torch.randn(4, 2), None, {"values_post_processing_func": lambda x: x / 0.0},
         ValueError, "NaN or inf patterns"),
        (torch.randn(4, 2), None, {"values_post_processing_func": 3}, TypeError, "values_post"),
        (torch.randn(4, 2), None, {"values_post_processing_func": lambda x: x[..., :1]},
         ValueError, r"\[1, n, 2\]"),
    ],
)
def test_rejects_bad_input(state, context, kwargs, error, match):
    with pytest.raises(error, match=match):
        simulate_and_plot_patterns(hopfield_energy, state, context=context,
                                   **{"grid_points": 5, **kwargs})


@pytest.mark.parametrize(
    "kwargs, error, match",
    [  # these used to fail inside torch, naming no argument (n_state=0 drew empty patterns)
        ({"n_state": 0}, ValueError, "n_state must be >= 1"),
        ({"n_stored": 1.5}, TypeError, "n_stored must be a positive int"),
        ({"dtype": torch.int64}, TypeError, "dtype must be a floating-point"),
        ({"seed": 2**64}, ValueError, "seed must lie in"),
        ({"seed": None}, TypeError, "seed must be an int"),
    ],
)
def test_toy_patterns_rejects_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        toy_patterns(**kwargs)


def test_write_gallery_rejects_bad_seed_and_progress_before_writing(tmp_path):
    from energy_attn.viz import write_gallery

    with pytest.raises(TypeError, match="progress must be callable"):
        write_gallery(tmp_path / "a", progress=3)
    with pytest.raises(ValueError, match="seed must lie in"):
        write_gallery(tmp_path / "b", seed=-(2**63) - 1)
    assert list(tmp_path.iterdir()) == []


def test_rejects_non_callable_energy_and_mismatched_axes():
    import matplotlib.pyplot as plt

    with pytest.raises(TypeError, match="energy_func"):
        simulate_and_plot_patterns("hopfield", torch.randn(3, 2))
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="plot_3d"):
        simulate_and_plot_patterns(hopfield_energy, torch.randn(3, 2), ax=ax, plot_3d=True)


def test_energy_trace_one_line_per_optimizer():
    state, stored = toy_patterns(7)
    energy = functools.partial(hopfield_energy, scale=2**0.5)
    traces = {
        name: minimize_energy(energy, state, stored, step_size=0.5, num_steps=6,
                              return_trajs=True, optimizer=name,
                              momentum=0.5 if name in ("momentum", "nesterov") else 0.0)
        for name in ("gd", "momentum", "nesterov", "newton_2nd1st", "newton_light")
    }
    _, ax = plot_energy_trace(traces)
    lines = [line for line in ax.get_lines() if line.get_gid() == "energy_trace"]
    assert [line.get_label() for line in lines] == list(traces)
    gd_mean = torch.stack(traces["gd"]["energies"]).mean(dim=(1, 2))
    torch.testing.assert_close(torch.tensor(lines[0].get_ydata(), dtype=torch.float32), gd_mean)
    assert ax.get_yscale() == "linear"
    _, ax = plot_energy_trace({k: v["energies"] for k, v in traces.items()}, log_gap=True)
    assert ax.get_yscale() == "log"
    gaps = [line.get_ydata() for line in ax.get_lines() if line.get_gid() == "energy_trace"]
    assert all((g > 0).all() for g in gaps)


def test_energy_trace_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty mapping"):
        plot_energy_trace({})
    with pytest.raises(ValueError, match=r"traces\['a'\]"):
        plot_energy_trace({"a": []})
    with pytest.raises(ValueError, match="same patterns"):
        plot_energy_trace({"a": [torch.zeros(1, 3)], "b": [torch.zeros(1, 4)]}, log_gap=True)
