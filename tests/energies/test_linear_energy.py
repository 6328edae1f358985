import functools

import pytest
import torch

from energy_attn import (
    EnergyBasedAttention,
    LinearAttention,
    gated_linear_energy,
    linear_attention,
    linear_energy,
    minimize_energy,
)
from energy_attn.energies.linear import gate_weights, linear_energy_grad

f64 = torch.float64


def explicit(q, k, v, beta, causal, gates):
    """o_i = β Σ_j w_ij (q_i·k_j) v_j by loops, w from explicit gate products (docs/math.md §3)."""
    B, H, N, _ = q.shape
    out = torch.zeros(B, H, N, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                for j in range(k.shape[2]):
                    if causal and j > i:
                        continue
                    w = 1.0
                    if gates is not None:
                        between = range(j + 1, i + 1) if j <= i else range(i + 1, j + 1)
                        for s in between:
                            w = w * gates[b, h, s]
                    out[b, h, i] += beta * w * (q[b, h, i] @ k[b, h, j]) * v[b, h, j]
    return out


def qkv(B=2, H=2, N=6, D=3, Dv=4):
    return (torch.randn(B, H, N, D, dtype=f64), torch.randn(B, H, N, D, dtype=f64),
            torch.randn(B, H, N, Dv, dtype=f64))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("form", ["quadratic", "recurrent"])
def test_linear_attention_equals_the_explicit_sum(causal, gated, form):
    q, k, v = qkv()
    gates = torch.rand(2, 2, 6, dtype=f64) if gated else None
    if gated:
        gates[0, 0, 3] = 0.0  # a reset gate
    got = linear_attention(q, k, v, scale=0.7, causal=causal, gates=gates, form=form)
    torch.testing.assert_close(got, explicit(q, k, v, 0.7, causal, gates))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_prefix_sum_form_equals_masked_quadratic_form(causal, gated):
    q, k, v = qkv(N=11)
    gates = torch.rand(2, 2, 11, dtype=f64) if gated else None
    rec = linear_attention(q, k, v, causal=causal, gates=gates, form="recurrent")
    quad = linear_attention(q, k, v, causal=causal, gates=gates, form="quadratic")
    torch.testing.assert_close(rec, quad)
    if causal:  # the causal flag is the lower-triangular mask
        tri = torch.ones(11, 11, dtype=torch.bool).tril()
        torch.testing.assert_close(
            linear_attention(q, k, v, gates=gates, mask=tri) if not gated else
            linear_attention(q, k, v, gates=gates, causal=True, mask=tri), rec)


def test_gate_weights_are_products_of_gates():
    g = torch.rand(5, dtype=f64)
    w = gate_weights(g, causal=False)
    assert w[3, 1] == g[2] * g[3] and w[1, 3] == g[2] * g[3] and w[2, 2] == 1
    assert gate_weights(g, causal=True)[1, 3] == 0


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_energy_gradient_and_descent_step_is_linear_attention(causal, gated):
    q, k, _ = qkv(B=1, H=3, N=7)
    gates = torch.rand(1, 3, 7, dtype=f64) if gated else None
    beta, eta = 0.8, 0.3
    energy = functools.partial(linear_energy, scale=beta, causal=causal, gates=gates)
    # closed-form gradient == autograd of the value
    xi = q.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(energy(xi, k).sum(), xi)
    torch.testing.assert_close(linear_energy_grad(q, k, beta, causal=causal, gates=gates), auto)
    # one GD step: ξ⁺ = ξ + ηβ Σ_j w_ij (ξ·k_j) k_j  (values = keys), by both engine paths
    step = q + eta * linear_attention(q, k, k, scale=beta, causal=causal, gates=gates)
    for closed in (True, False):
        out = minimize_energy(energy, q, k, step_size=eta, num_steps=1, use_closed_form=closed)
        torch.testing.assert_close(out, step)
    if gated:
        g = functools.partial(gated_linear_energy, scale=beta, causal=causal, gates=gates)
        torch.testing.assert_close(minimize_energy(g, q, k, step_size=eta), step)


def test_energy_value_and_masking():
    q, k, _ = qkv(B=1, H=1, N=4)
    mask = torch.rand(1, 1, 4, 4) > 0.5
    mask[..., 0, :] = False
    e = linear_energy(q, k, 1.0, mask=mask)
    want = -0.5 * ((q @ k.transpose(-1, -2)) ** 2 * mask).sum(-1)
    torch.testing.assert_close(e, want)
    assert (e[..., 0] == 0).all()  # a fully masked row has no energy and no gradient
    assert (linear_energy_grad(q, k, mask=mask)[..., 0, :] == 0).all()
    out = linear_attention(q, k, k, mask=mask)
    assert torch.isfinite(out).all() and (out[..., 0, :] == 0).all()


@pytest.mark.parametrize("optimizer,rho", [("gd", 0.0), ("momentum", 0.5), ("nesterov", 0.5),
                                           ("newton_2nd1st", 0.0)])
def test_linear_energy_descends_with_every_autograd_optimizer(optimizer, rho):
    q, k, _ = qkv(B=1, H=2, N=5)
    energy = functools.partial(linear_energy, scale=0.3, causal=True)
    traj = minimize_energy(energy, q, k, step_size=0.1, num_steps=3, optimizer=optimizer,
                           momentum=rho, return_trajs=True)
    e = torch.stack(traj["energies"])
    assert (e[1:] <= e[:-1] + 1e-12).all() and (e[-1] < e[0]).all()


def test_energy_based_attention_takes_the_linear_energy():
    x = torch.randn(2, 5, 8)
    layer = EnergyBasedAttention(8, heads=2, dim_head=4,
                                 energy_func=functools.partial(linear_energy, causal=True))
    out = layer(x, num_steps=2, step_size=0.1)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("gated", [False, True])
def test_linear_attention_layer_is_causal_and_differentiable(gated):
    layer = LinearAttention(8, 2, gated=gated).double()
    x = torch.randn(2, 9, 8, dtype=f64, requires_grad=True)
    out = layer(x, is_causal=True)
    x2 = x.detach().clone()
    x2[:, 5:] += 1
    torch.testing.assert_close(layer(x2, is_causal=True)[:, :5], out[:, :5].detach())
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    if gated:
        assert layer.to_gates.weight.grad.abs().sum() > 0
    rec = LinearAttention(8, 2, gated=gated, form="recurrent").double()
    rec.load_state_dict(layer.state_dict())
    torch.testing.assert_close(rec(x, is_causal=True), out)


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(k=torch.randn(2, 2, 5, 3, dtype=f64), v=torch.randn(2, 2, 5, 4, dtype=f64),
              causal=True), ValueError, "N == M"),
        (dict(gates=torch.rand(2, 2, 5, dtype=f64)), ValueError, "gates"),
        (dict(form="chunked"), ValueError, "form"),
        (dict(form="recurrent", mask=torch.ones(6, 6, dtype=torch.bool)), ValueError, "mask"),
        (dict(mask=torch.ones(6, 6)), TypeError, "mask"),
        (dict(causal=1), TypeError, "causal"),
        (dict(scale=float("nan")), ValueError, "scale"),
        (dict(scale=-1.0), ValueError, "scale"),
        (dict(scale=0.0), ValueError, "scale"),
        (dict(v=torch.randn(2, 2, 6, 4)), TypeError, "dtype"),
    ],
)
def test_bad_inputs(kw, exc, match):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v)
    for name in ("q", "k", "v"):
        if name in kw:
            args[name] = kw.pop(name)
    with pytest.raises(exc, match=match):
        linear_attention(args["q"], args["k"], args["v"], **kw)
    with pytest.raises(ValueError, match="gates"):
        gated_linear_energy(q, k, gates=None)


def test_the_energy_takes_boolean_masks_only():
    """A weight w_ij is 0 or 1: an additive float mask (0 / −inf) read as a weight gave ±inf
    energies, and a mask of the wrong shape failed deep in torch."""
    q, k, _ = qkv(B=1, H=1, N=4)
    additive = torch.zeros(4, 4).masked_fill(torch.rand(4, 4) > 0.5, float("-inf"))
    for fn in (linear_energy, linear_energy_grad):
        with pytest.raises(TypeError, match="mask"):
            fn(q, k, mask=additive)
        with pytest.raises(ValueError, match="mask"):
            fn(q, k, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        minimize_energy(linear_energy, q, k, mask=additive, step_size=0.1)


def test_float32_accumulation_holds_under_autocast():
    q, k, _ = qkv(B=1, H=1, N=4)
    q, k = q.float() + 3, k.float() + 3  # bf16 scores would be off by their ulp
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e, g = linear_energy(q, k), linear_energy_grad(q, k)
    assert e.dtype == g.dtype == torch.float32
    torch.testing.assert_close(e, linear_energy(q, k))
    torch.testing.assert_close(g, linear_energy_grad(q, k))


@pytest.mark.parametrize("form", ["quadratic", "recurrent"])
def test_no_tokens_give_an_empty_output(form):
    q, k, v = (torch.randn(2, 2, 0, d, dtype=f64) for d in (3, 3, 4))
    gates = torch.rand(2, 2, 0, dtype=f64)
    out = linear_attention(q, k, v, causal=True, gates=gates, form=form)
    assert out.shape == (2, 2, 0, 4)
    with pytest.raises(ValueError, match="scale"):
        LinearAttention(8, 2, scale=-1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal, gated", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("form", ["quadratic", "recurrent"])
def test_16_bit_inputs_are_rounded_once_at_the_output(dtype, causal, gated, form):
    """The sums ran in 16 bits: in float16 the unscaled ``(QKᵀ) V`` overflowed to inf though
    the scaled output fits, and a bfloat16 causal scan was 4x less accurate than rounding the
    exact output (its state gained one rounding per token)."""
    g = torch.Generator().manual_seed(0)
    q, k = (30 * torch.randn(1, 2, 64, 16, generator=g) for _ in range(2))
    v = torch.randn(1, 2, 64, 16, generator=g)
    gates = 0.8 + 0.2 * torch.rand(1, 2, 64, generator=g) if gated else None
    low = [None if t is None else t.to(dtype) for t in (q, k, v, gates)]
    exact = linear_attention(*(t.double() for t in low[:3]), scale=0.25, causal=causal,
                             gates=None if gates is None else low[3].double(), form=form)
    got = linear_attention(*low[:3], scale=0.25, causal=causal, gates=low[3], form=form)
    assert got.dtype == dtype
    rounding = (exact.to(dtype).double() - exact).abs().max()
    assert (got.double() - exact).abs().max() <= 1.5 * rounding


def test_linear_attention_accumulates_in_float32_under_autocast():
    q, k, v = (t.float() + 3 for t in qkv(B=1, H=1, N=8))
    for form in ("quadratic", "recurrent"):
        want = linear_attention(q, k, v, causal=True, form=form)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = linear_attention(q, k, v, causal=True, form=form)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(scale=-1.0), ValueError, "scale"),
        (dict(scale=float("nan")), ValueError, "scale"),
        (dict(scale=None), TypeError, "scale"),
        (dict(causal=1), TypeError, "causal"),
        (dict(stored_patterns=torch.randn(6, 5, dtype=f64)), ValueError, "dimension d"),
        (dict(stored_patterns=torch.randn(3, 6, 3, dtype=f64)), ValueError, "batch"),
        (dict(stored_patterns=torch.ones(6, 3, dtype=torch.long)), TypeError, "stored_patterns"),
        (dict(state_patterns=torch.randn(3, dtype=f64)), ValueError, "state_patterns"),
        (dict(stored_patterns=torch.randn(6, 3, dtype=f64, device="meta")), ValueError,
         "stored_patterns"),
        (dict(gates=torch.rand(5, 6, dtype=f64)), ValueError, "gates"),
    ],
)
def test_the_energy_names_bad_arguments(kw, exc, match):
    """A negative, NaN or None ``scale``, an integer ``causal``, integer, 1-D or mismatched
    patterns and patterns on two devices were accepted silently (a sign-flipped or NaN
    energy) or failed deep in torch."""
    args = dict(state_patterns=torch.randn(2, 6, 3, dtype=f64),
                stored_patterns=torch.randn(2, 6, 3, dtype=f64))
    args.update(kw)
    for fn in (linear_energy, linear_energy_grad):
        with pytest.raises(exc, match=match):
            fn(**args)


def test_inf_behind_padding_reaches_no_output():
    """A padded key's weight is 0, but ``0 · inf`` is NaN: inf in a padded key (or value)
    made every output of the energy, its gradient and linear attention NaN."""
    q, k, v = qkv()
    pad = torch.tensor([True] * 4 + [False] * 2)
    mask = pad.expand(2, 2, 6, 6)
    bad_k, bad_v = k.clone(), v.clone()
    bad_k[..., 4:, :] = float("inf")
    bad_v[..., 4:, :] = float("nan")
    for fn in (linear_energy, linear_energy_grad):
        assert torch.equal(fn(q, bad_k, mask=mask), fn(q, k, mask=mask))
    for form in ("auto", "quadratic"):
        assert torch.equal(linear_attention(q, bad_k, bad_v, mask=mask, form=form),
                           linear_attention(q, k, v, mask=mask, form=form))


def test_inf_behind_a_key_causality_hides_reaches_no_output():
    """A key the mask leaves only to earlier queries is attended by no query under causality:
    inf there made the outputs NaN (only the mask, not causality, was read to find it)."""
    q, k, v = qkv()
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[3:, 3] = False  # key 3: queries 0-2 only, which causality keeps from it
    bad_k, bad_v = k.clone(), v.clone()
    bad_k[..., 3, :] = float("inf")
    bad_v[..., 3, :] = float("nan")
    for fn in (linear_energy, linear_energy_grad):
        assert torch.equal(fn(q, bad_k, mask=mask, causal=True), fn(q, k, mask=mask, causal=True))
    assert torch.equal(linear_attention(q, bad_k, bad_v, mask=mask, causal=True),
                       linear_attention(q, k, v, mask=mask, causal=True))


def test_linear_attention_layer_takes_a_bool_gated():
    """``gated="no"`` built a gated layer (any truthy value did)."""
    with pytest.raises(TypeError, match="gated"):
        LinearAttention(8, 2, gated="no")
