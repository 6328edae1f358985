import functools

import pytest
import torch

from energy_attn import hopfield_energy, minimize_energy

f64 = torch.float64


def _energy(beta=0.5):
    return functools.partial(hopfield_energy, scale=beta)


def test_closed_form_equals_autograd_path_and_both_differentiable():
    q = torch.randn(2, 5, 6, dtype=f64, requires_grad=True)
    k = torch.randn(2, 7, 6, dtype=f64, requires_grad=True)
    mask = torch.rand(2, 5, 7) > 0.3
    a = minimize_energy(_energy(), q, k, mask=mask, step_size=0.7, num_steps=3)
    b = minimize_energy(_energy(), q, k, mask=mask, step_size=0.7, num_steps=3,
                        use_closed_form=False)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a.square().sum(), (q, k))
    gb = torch.autograd.grad(b.square().sum(), (q, k))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


def test_blog_semantics_one_step_is_softmax_attention_with_values_keys():
    q = torch.randn(1, 8, 512, requires_grad=True)
    k = torch.randn(1, 32, 512)
    out = minimize_energy(_energy(512**-0.5), q, k, use_closed_form=False)
    expected = torch.softmax(512**-0.5 * q @ k.transpose(-1, -2), -1) @ k
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("optimizer", ["gd", "momentum", "nesterov"])
def test_trajectories(optimizer):
    q = torch.randn(2, 4, 3, dtype=f64)
    k = torch.randn(2, 6, 3, dtype=f64)
    rho = 0.0 if optimizer == "gd" else 0.5
    traj = minimize_energy(_energy(), q, k, num_steps=4, return_trajs=True,
                           optimizer=optimizer, momentum=rho)
    assert len(traj["queries"]) == 5 and len(traj["energies"]) == 5
    assert traj["energies"][0].shape == (2, 4)
    assert ("velocities" in traj) == (optimizer != "gd")
    torch.testing.assert_close(traj["queries"][-1],
                               minimize_energy(_energy(), q, k, num_steps=4,
                                               optimizer=optimizer, momentum=rho))


@pytest.mark.parametrize("step_size", [0.1, 0.5, 1.0])
def test_energy_decreases_monotonically_for_step_sizes_up_to_one(step_size):
    q = torch.randn(4, 16, 8, dtype=f64) * 2
    k = torch.randn(4, 32, 8, dtype=f64)
    traj = minimize_energy(_energy(1.0), q, k, step_size=step_size, num_steps=10,
                           return_trajs=True)
    e = torch.stack(traj["energies"])
    assert (e[1:] <= e[:-1] + 1e-12).all()
    assert (e[-1] < e[0]).any()


def test_zero_steps_returns_a_copy_of_the_queries():
    """T = 0 returns ξ_0 = q as a new tensor (an op's output never aliases its input), with the
    identity as its gradient."""
    q, k = torch.randn(1, 3, 2, requires_grad=True), torch.randn(1, 4, 2)
    for closed_form in (True, False):
        out = minimize_energy(_energy(), q, k, num_steps=0, use_closed_form=closed_form)
        assert out is not q and out.data_ptr() != q.data_ptr() and torch.equal(out, q)
        (g,) = torch.autograd.grad(out.sum(), q)
        assert torch.equal(g, torch.ones_like(q))


def test_user_energy_via_autograd_works_without_grad_enabled_inputs():
    # A quartic user energy with no closed form: ∇E = ξ³ - mean(k).
    def quartic(xi, keys, mask=None):
        return 0.25 * (xi**4).sum(-1) - (xi * keys.mean(-2, keepdim=True)).sum(-1)

    q = torch.randn(2, 3, 4, dtype=f64)
    k = torch.randn(2, 5, 4, dtype=f64)
    out = minimize_energy(quartic, q, k, step_size=0.1, num_steps=1)
    torch.testing.assert_close(out, q - 0.1 * (q**3 - k.mean(-2, keepdim=True)))
    assert not out.requires_grad


@pytest.mark.parametrize("optimizer", ["gd", "nesterov", "newton_2nd1st"])
@pytest.mark.parametrize("self_consistent", [False, True])
def test_user_energy_runs_under_inference_mode(optimizer, self_consistent):
    # Autograd is off in inference mode and its tensors cannot be saved for backward; the
    # autograd path lifts it for the direction only and agrees with the no_grad result.
    def energy(xi, keys, mask=None):  # no closed form: the autograd path
        return hopfield_energy(xi, keys, 0.5, mask=mask)

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    mask = torch.rand(2, 3, 3, generator=g) > 0.3
    kw = dict(mask=mask, num_steps=3, optimizer=optimizer, self_consistent=self_consistent,
              momentum=0.5 if optimizer == "nesterov" else 0.0)
    keys = None if self_consistent else k
    with torch.no_grad():
        ref = minimize_energy(energy, q, keys, **kw)
    with torch.inference_mode():
        qi, ki, kw["mask"] = q.clone(), k.clone(), mask.clone()  # inference tensors
        out = minimize_energy(energy, qi, None if self_consistent else ki, **kw)
        traj = minimize_energy(energy, qi, None if self_consistent else ki, return_trajs=True,
                               **kw)
    assert out.is_inference() and not out.requires_grad
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(traj["queries"][-1], ref, atol=0, rtol=0)


def test_user_energy_result_is_differentiable():
    q = torch.randn(2, 3, 4, dtype=f64, requires_grad=True)
    k = torch.randn(2, 5, 4, dtype=f64)
    out = minimize_energy(lambda x, y, mask=None: hopfield_energy(x, y, 0.3), q, k, num_steps=2)
    torch.autograd.gradcheck(
        lambda x: minimize_energy(lambda a, b, mask=None: hopfield_energy(a, b, 0.3), x, k,
                                  num_steps=2),
        (q,),
    )
    assert out.requires_grad


@pytest.mark.parametrize("optimizer", ["gd", "nesterov", "newton_2nd1st"])
@pytest.mark.parametrize("self_consistent", [False, True])
def test_user_energy_parameters_get_gradients_when_the_patterns_need_none(optimizer,
                                                                          self_consistent):
    """A learnable β inside a user energy (no closed form) gets the gradient the closed form
    gives it, also when neither queries nor keys require grad (it was silently None)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 4, generator=g, dtype=f64), torch.randn(2, 3, 4, generator=g,
                                                                       dtype=f64)
    beta = torch.tensor(0.6, dtype=f64, requires_grad=True)
    kw = dict(num_steps=3, step_size=0.5, optimizer=optimizer, self_consistent=self_consistent,
              momentum=0.5 if optimizer == "nesterov" else 0.0)
    keys = None if self_consistent else k

    def user(xi, stored, mask=None):  # no `gradient` attribute: the autograd path
        return hopfield_energy(xi, stored, beta, mask=mask)

    got = torch.autograd.grad(minimize_energy(user, q, keys, **kw).sum(), beta)[0]
    want = torch.autograd.grad(
        minimize_energy(functools.partial(hopfield_energy, scale=beta), q, keys, **kw).sum(),
        beta)[0]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(num_steps=-1), ValueError, "num_steps"),
        (dict(num_steps=1.5), TypeError, "num_steps"),
        (dict(step_size=float("nan")), ValueError, "step_size"),
        (dict(optimizer="adam"), ValueError, "optimizer"),
        (dict(optimizer="momentum", momentum=1.0), ValueError, "momentum"),
        (dict(optimizer="gd", momentum=0.5), ValueError, "momentum"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    q, k = torch.randn(1, 3, 2), torch.randn(1, 4, 2)
    with pytest.raises(exc, match=match):
        minimize_energy(_energy(), q, k, **kwargs)


def test_bad_tensors():
    q, k = torch.randn(1, 3, 2), torch.randn(1, 4, 3)
    with pytest.raises(ValueError, match="last"):
        minimize_energy(_energy(), q, k)
    with pytest.raises(TypeError, match="queries"):
        minimize_energy(_energy(), torch.ones(1, 3, 2, dtype=torch.long), torch.randn(1, 4, 2))
    with pytest.raises(TypeError, match="mask"):
        minimize_energy(_energy(), torch.randn(1, 3, 2), torch.randn(1, 4, 2),
                        mask=torch.ones(1, 3, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="energy_func"):
        minimize_energy("hopfield", torch.randn(1, 3, 2), torch.randn(1, 4, 2))
