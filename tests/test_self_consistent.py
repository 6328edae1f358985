"""Self-consistent self-attention (docs/math.md §1.4, the blog's footnote 3)."""

import functools

import pytest
import torch
from helpers import tol

from energy_attn import EnergyBasedAttention, elastic_energy, hopfield_energy, minimize_energy
from energy_attn.energies.hopfield import elastic_energy_self_grad, hopfield_energy_self_grad

DT = torch.float64


def _global_grad(energy, x, mask=None):
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(energy(x, x, mask=mask).sum(), x)
    return g


@pytest.mark.parametrize("energy, closed", [(hopfield_energy, hopfield_energy_self_grad),
                                            (elastic_energy, elastic_energy_self_grad)])
@pytest.mark.parametrize("masked", [False, True])
def test_closed_form_equals_autograd_of_global_energy(energy, closed, masked):
    x = torch.randn(3, 6, 4, dtype=DT)
    mask = None
    if masked:
        mask = torch.rand(3, 6, 6) > 0.5
        mask[0, 1] = False  # a pattern that reads nothing (but is still read)
    e = functools.partial(energy, scale=0.8)
    g = closed(x, x, 0.8, mask=mask)
    atol, rtol = tol(DT)
    torch.testing.assert_close(g, _global_grad(e, x, mask), atol=atol, rtol=rtol)
    assert energy.self_gradient is closed


def test_the_true_gradient_has_the_key_term():
    # docs/math.md §1.4: ∇_i = ξ_i − Σ_j p_ij ξ_j − Σ_j p_ji ξ_j; fixed keys miss the last term.
    x = torch.randn(1, 5, 3, dtype=DT)
    p = (0.5 * x @ x.transpose(-1, -2)).softmax(-1)
    expected = x - p @ x - p.transpose(-1, -2) @ x
    atol, rtol = tol(DT)
    torch.testing.assert_close(hopfield_energy_self_grad(x, x, 0.5), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("optimizer", ["gd", "nesterov"])
def test_minimize_energy_closed_form_equals_autograd_path(optimizer):
    x = torch.randn(2, 5, 4, dtype=DT, requires_grad=True)
    e = functools.partial(hopfield_energy, scale=0.5)
    kw = dict(step_size=0.1, num_steps=4, optimizer=optimizer,
              momentum=0.5 if optimizer == "nesterov" else 0.0, self_consistent=True)
    a = minimize_energy(e, x, None, **kw)
    b = minimize_energy(e, x, x, use_closed_form=False, **kw)
    atol, rtol = tol(DT)
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    (ga,) = torch.autograd.grad(a.square().sum(), x)
    (gb,) = torch.autograd.grad(b.square().sum(), x)
    # backward through T steps of two different graphs: rounding grows with T
    torch.testing.assert_close(ga, gb, atol=4 * atol, rtol=4 * rtol)


def test_global_energy_decreases_and_differs_from_fixed_keys():
    x = torch.randn(2, 6, 4, dtype=DT)
    e = functools.partial(hopfield_energy, scale=0.5)
    traj = minimize_energy(e, x, None, step_size=0.1, num_steps=10, return_trajs=True,
                           self_consistent=True)
    totals = torch.stack([en.sum(-1) for en in traj["energies"]], dim=-1)  # [2, T+1]
    assert torch.all(totals.diff(dim=-1) < 0)
    fixed = minimize_energy(e, x, x, step_size=0.1, num_steps=10)
    assert not torch.allclose(traj["queries"][-1], fixed)


def test_module_option():
    attn = EnergyBasedAttention(8, heads=2, dim_head=4).to(DT)
    x = torch.randn(2, 5, 8, dtype=DT)
    out = attn(x, step_size=0.1, num_steps=3, self_consistent=True)
    q = attn.to_q(x).unflatten(-1, (2, 4)).transpose(1, 2).flatten(0, 1)  # (b h) n d
    ref = minimize_energy(functools.partial(hopfield_energy, scale=attn.scale), q, None,
                          step_size=0.1, num_steps=3, self_consistent=True)
    ref = attn.to_out(ref.unflatten(0, (2, 2)).transpose(1, 2).flatten(2))
    atol, rtol = tol(DT)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    # bare self-consistent attention descends energy(x, x), the footnote's "proper treatment"
    bare = EnergyBasedAttention(4).to(DT)
    y = torch.randn(2, 5, 4, dtype=DT)
    expected = y - 0.1 * hopfield_energy_self_grad(y, y, bare.scale)
    torch.testing.assert_close(bare(y, bare_attn=True, step_size=0.1, self_consistent=True),
                               expected, atol=atol, rtol=rtol)


def test_bad_self_consistent_inputs():
    x = torch.randn(2, 5, 4)
    e = functools.partial(hopfield_energy, scale=0.5)
    with pytest.raises(ValueError, match="keys=None"):
        minimize_energy(e, x, torch.randn(2, 5, 4), self_consistent=True)
    with pytest.raises(ValueError, match="newton_light"):
        minimize_energy(e, x, None, self_consistent=True, optimizer="newton_light")
    with pytest.raises(ValueError, match="context=None"):
        EnergyBasedAttention(4)(x, context=x, self_consistent=True)
