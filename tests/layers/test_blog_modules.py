import functools

import pytest
import torch

from energy_attn import (
    EnergyBasedAttention,
    VanillaSoftmaxAttention,
    elastic_energy,
    hopfield_energy,
    minimize_energy,
)

D = 512


@pytest.fixture
def patterns():
    state = torch.randn(1, 8, D).requires_grad_(True)
    stored = torch.randn(1, 32, D)
    return state, stored


def _pair(heads=1, dim_head=D):
    kw = dict(context_dim=D, heads=heads, dim_head=dim_head, scale=dim_head**-0.5)
    return VanillaSoftmaxAttention(D, **kw), EnergyBasedAttention(D, **kw)


def test_bare_cross_attention_is_one_energy_step(patterns):
    state, stored = patterns
    sm, en = _pair()
    a = sm(state.clone(), context=stored.clone(), bare_attn=True)
    b = en(state.clone(), context=stored.clone(), step_size=1.0, num_steps=1, bare_attn=True)
    assert torch.allclose(a, b, atol=1e-6)


def test_bare_self_attention_is_one_energy_step_and_barely_moves(patterns):
    state, _ = patterns
    sm, en = _pair()
    a = sm(state.clone(), bare_attn=True)
    b = en(state.clone(), step_size=1.0, num_steps=1, bare_attn=True)
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.norm(state - b) < 1e-4  # the blog measured 5.6e-6


def test_qkv_with_pseudo_inverse(patterns):
    state, stored = patterns
    sm, en = _pair()
    out_sm = sm(state, context=stored)
    missing, unexpected = en.load_state_dict(sm.state_dict(), strict=False)
    assert missing == [] and unexpected == ["to_v.weight"]
    out_en = en(state, context=stored, step_size=1.0, num_steps=1)
    assert not torch.allclose(out_sm, out_en, atol=1e-6)  # the blog's "False"
    transformed = sm.to_v(out_en @ torch.pinverse(en.to_k.weight.t()))
    assert torch.norm(out_sm - transformed) < 1e-2


def test_multi_head_equals_softmax_with_values_tied_to_keys(patterns):
    state, stored = patterns
    sm, en = _pair(heads=8, dim_head=D // 8)
    sm.load_state_dict(en.state_dict(), strict=False)
    with torch.no_grad():
        sm.to_v.weight.copy_(en.to_k.weight)
    torch.testing.assert_close(en(state, context=stored), sm(state, context=stored),
                               atol=1e-6, rtol=0)


def test_blog_autograd_path_equals_fast_path(patterns):
    state, stored = patterns
    _, en = _pair(heads=4, dim_head=64)
    fast = en(state, context=stored, num_steps=3, step_size=0.5)
    # A wrapper hides the closed form: the module then descends with autograd like the blog.
    en.energy_func = lambda s, k, scale, mask=None: hopfield_energy(s, k, scale, mask)
    slow = en(state, context=stored, num_steps=3, step_size=0.5)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_elastic_energy_module_matches_minimize_energy():
    x, c = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    en = EnergyBasedAttention(16, heads=1, dim_head=16, energy_func=elastic_energy)
    out = en(x, context=c, bare_attn=True, num_steps=2, step_size=0.5)
    ref = minimize_energy(functools.partial(elastic_energy, scale=0.25), x, c, num_steps=2,
                          step_size=0.5, use_closed_form=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [VanillaSoftmaxAttention, EnergyBasedAttention])
def test_key_padding_mask_equals_removing_context(cls):
    x, c = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    mod = cls(32, heads=4, dim_head=8)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[:, 4:] = False
    torch.testing.assert_close(mod(x, context=c, mask=keep), mod(x, context=c[:, :4]))


@pytest.mark.parametrize("cls", [VanillaSoftmaxAttention, EnergyBasedAttention])
def test_fully_masked_rows_are_finite(cls):
    x = torch.randn(2, 5, 32, requires_grad=True)
    mod = cls(32, heads=2, dim_head=16)
    mask = torch.ones(2, 5, 5, dtype=torch.bool)
    mask[0, 2] = False
    out = mod(x, mask=mask)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("optimizer,rho", [("momentum", 0.5), ("nesterov", 0.5),
                                           ("newton_2nd1st", 0.0), ("newton_light", 0.0)])
def test_optimizers_and_trajectories(optimizer, rho):
    x, c = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    en = EnergyBasedAttention(32, heads=2, dim_head=16, optimizer=optimizer, momentum=rho)
    out = en(x, context=c, num_steps=3, step_size=0.5)
    traj = en(x, context=c, num_steps=3, step_size=0.5, return_trajs=True)
    assert len(traj["queries"]) == 4 and traj["queries"][0].shape == (4, 5, 16)
    folded = traj["queries"][-1].reshape(2, 2, 5, 16).transpose(1, 2).reshape(2, 5, 32)
    torch.testing.assert_close(out, en.to_out(folded), atol=1e-5, rtol=1e-5)


def test_bad_inputs():
    en = EnergyBasedAttention(32, heads=2, dim_head=16)
    x = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="heads=1"):
        en(x, bare_attn=True)
    with pytest.raises(ValueError, match="query_dim"):
        en(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="x must have 3"):
        en(torch.randn(5, 32))
    with pytest.raises(ValueError, match="mask"):
        en(x, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        en(x, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="num_steps"):
        en(x, num_steps=-2)
    with pytest.raises(ValueError, match="scale"):
        en(x, scale=float("nan"))
    with pytest.raises(ValueError, match="optimizer"):
        EnergyBasedAttention(32, optimizer="adam")
    with pytest.raises(TypeError, match="energy_func"):
        EnergyBasedAttention(32, energy_func="hopfield")
    sm = VanillaSoftmaxAttention(32, heads=1, dim_head=32)
    with pytest.raises(ValueError, match="pattern size"):
        sm(x, context=torch.randn(2, 5, 16), bare_attn=True)


@pytest.mark.parametrize("optimizer", ["gd", "newton_2nd1st"])
def test_elastic_energy_of_patterns_far_from_the_origin_keeps_float32_accuracy(optimizer):
    """On the fused op the elastic logits ``β ξ·k − ½β‖k‖²`` subtract two terms of size
    ``β‖k‖²``: with patterns near 1000 three float32 steps were 0.07 off (minimize_energy's
    closed form: 5e-5). ``F*`` is translation invariant, so the module descends about the keys'
    centre; blocked keys (future, padding, even inf) stay unseen and an empty memory is not
    shifted."""
    g = torch.Generator().manual_seed(0)
    x, c = (0.5 * torch.randn(2, 6, 16, generator=g) + 1000 for _ in range(2))
    mask = torch.ones(6, 6, dtype=torch.bool).tril() & torch.tensor([True] * 4 + [False] * 2)
    mask = mask.expand(2, 6, 6).clone()
    mask[1, 2] = False  # an empty memory
    en = EnergyBasedAttention(16, heads=1, dim_head=16, energy_func=elastic_energy,
                              optimizer=optimizer)
    kw = dict(bare_attn=True, num_steps=3, step_size=0.5, mask=mask)
    out = en(x, context=c, **kw)
    exact = minimize_energy(functools.partial(elastic_energy, scale=0.25), x.double(),
                            c.double(), mask=mask, num_steps=3, step_size=0.5,
                            optimizer=optimizer)
    rounding = (exact.float().double() - exact).abs().max()
    assert (out.double() - exact).abs().max() <= 2 * rounding
    c2 = c.clone()
    c2[:, 4:] = float("inf")  # padding
    c2[:, 3] += 1e3  # a future key of the queries before it
    out2 = en(x, context=c2, **kw)
    assert torch.equal(out2[:, :3], out[:, :3]) and torch.isfinite(out2).all()


def test_elastic_energy_module_descends_about_the_keys_centre_exactly():
    """The shift by the keys' centre (per batch element and head) changes nothing in exact
    arithmetic: in float64 the fused path equals the autograd path, outputs and gradients."""
    x, c = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 7, 32, dtype=torch.float64)
    x, c = x + 5, c + 5
    keep = torch.ones(2, 5, 7, dtype=torch.bool).tril()
    en = EnergyBasedAttention(32, heads=2, dim_head=16, energy_func=elastic_energy).double()
    wrapper = lambda s, k, scale, mask=None: elastic_energy(s, k, scale, mask)  # noqa: E731
    grads = []
    for energy in (elastic_energy, wrapper):  # a wrapper hides the closed form: autograd path
        en.energy_func = energy
        xg = x.clone().requires_grad_(True)
        out = en(xg, context=c, mask=keep, num_steps=2, step_size=0.5, optimizer="newton_2nd1st")
        grads.append((out, *torch.autograd.grad(out.square().sum(), (xg, en.to_k.weight))))
    for fast, slow in zip(*grads):
        torch.testing.assert_close(fast, slow)
