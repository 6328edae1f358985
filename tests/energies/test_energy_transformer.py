"""Energy Transformer attention energy and EnergyTransformerAttention."""

import pytest
import torch
from helpers import tol

from energy_attn import (
    EnergyTransformerAttention,
    energy_transformer_energy,
    energy_transformer_energy_grad,
)

DT = torch.float64


def _naive_energy(g, w_q, w_k, beta, allowed=None):
    """E = −(1/β) Σ_h Σ_C log Σ_{B≠C} exp(β ⟨K_B, Q_C⟩), written with loops over heads/queries."""
    N = g.shape[-2]
    total = torch.zeros(g.shape[:-2] + (N,), dtype=g.dtype)
    for h in range(w_q.shape[0]):
        q, k = g @ w_q[h].T, g @ w_k[h].T
        for c in range(N):
            keys = [b for b in range(N) if b != c and (allowed is None or allowed[..., c, b].all())]
            if keys:
                s = beta * (k[..., keys, :] * q[..., c:c + 1, :]).sum(-1)
                total[..., c] -= torch.logsumexp(s, -1) / beta
    return total


def _weights(H=3, Y=4, D=5):
    return torch.randn(H, Y, D, dtype=DT), torch.randn(H, Y, D, dtype=DT)


def test_energy_matches_its_definition():
    w_q, w_k = _weights()
    g = torch.randn(2, 6, 5, dtype=DT)
    atol, rtol = tol(DT)
    torch.testing.assert_close(energy_transformer_energy(g, w_q, w_k, 0.5),
                               _naive_energy(g, w_q, w_k, 0.5), atol=atol, rtol=rtol)


@pytest.mark.parametrize("masked", [False, True])
def test_closed_form_gradient_equals_autograd(masked):
    w_q, w_k = _weights()
    g = torch.randn(2, 7, 5, dtype=DT, requires_grad=True)
    mask = None
    if masked:
        mask = torch.rand(2, 7, 7) > 0.4
        mask[0, 2] = False  # a query with nothing to attend
    (auto,) = torch.autograd.grad(energy_transformer_energy(g, w_q, w_k, 0.7, mask).sum(), g)
    closed = energy_transformer_energy_grad(g, w_q, w_k, 0.7, mask)
    atol, rtol = tol(DT)
    # entries are sums of O(1)-sized terms that cancel: compare at the gradient's own scale
    torch.testing.assert_close(closed, auto, atol=atol * auto.abs().max(), rtol=rtol)
    assert energy_transformer_energy_grad is energy_transformer_energy.gradient


def test_gradcheck_of_closed_form():
    w_q, w_k = _weights(H=2, Y=3, D=4)
    g = torch.randn(1, 4, 4, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda g, a, b: energy_transformer_energy_grad(g, a, b, 0.6), (g, w_q.requires_grad_(),
                                                                       w_k.requires_grad_()))


def test_energy_decreases_along_descent_for_small_step():
    layer = EnergyTransformerAttention(8, heads=2, dim_head=4, step_size=0.05, num_steps=20).to(DT)
    x = torch.randn(3, 6, 8, dtype=DT)
    out, energies = layer(x, return_energies=True)
    assert out.shape == x.shape and energies.shape == (3, 6, 21)
    total = energies.sum(dim=1)  # global energy per sequence
    assert torch.all(total.diff(dim=-1) < 0)


def test_defaults_follow_the_original():
    layer = EnergyTransformerAttention(16, heads=2, dim_head=4)
    assert layer.num_steps == 12 and layer.step_size == 0.1 and layer.scale == 4**-0.5


def test_masked_tokens_do_not_influence_unmasked_ones():
    layer = EnergyTransformerAttention(8, heads=2, dim_head=4).to(DT)
    x = torch.randn(2, 6, 8, dtype=DT)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 0] = False
    out = layer(x, mask=mask)
    x2 = x.clone()
    x2[~mask] = 100 * torch.randn(int((~mask).sum()), 8, dtype=DT)
    out2 = layer(x2, mask=mask)
    atol, rtol = tol(DT)
    torch.testing.assert_close(out[mask], out2[mask], atol=atol, rtol=rtol)
    torch.testing.assert_close(out[~mask], x[~mask])  # padding does not move
    # and the unmasked tokens evolve exactly as the shorter sequence without padding
    short = layer(x[:1, :4])
    torch.testing.assert_close(out[:1, :4], short, atol=atol, rtol=rtol)


def test_layer_trains_and_momentum_runs():
    layer = EnergyTransformerAttention(8, heads=2, dim_head=4, num_steps=3, optimizer="nesterov",
                                       momentum=0.5)
    x = torch.randn(2, 5, 8, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.w_q.grad.abs().sum() > 0 and layer.w_k.grad.abs().sum() > 0
    assert torch.isfinite(x.grad).all()


def test_single_token_sequence_is_finite():
    layer = EnergyTransformerAttention(4, dim_head=2)
    x = torch.randn(2, 1, 4)
    out, e = layer(x, return_energies=True)
    torch.testing.assert_close(out, x)  # nothing to attend: zero gradient
    assert torch.all(e == 0)


def test_bad_inputs():
    w_q, w_k = _weights()
    g = torch.randn(2, 6, 5, dtype=DT)
    with pytest.raises(ValueError, match="w_q"):
        energy_transformer_energy(g, w_q[..., :4], w_k, 1.0)
    with pytest.raises(ValueError, match="one shape"):
        energy_transformer_energy(g, w_q, w_k[:2], 1.0)
    with pytest.raises(ValueError, match="mask"):
        energy_transformer_energy(g, w_q, w_k, 1.0, mask=torch.ones(6, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="scale"):
        energy_transformer_energy(g, w_q, w_k, -1.0)
    layer = EnergyTransformerAttention(8)
    with pytest.raises(ValueError, match="num_steps"):
        layer(torch.randn(1, 3, 8), num_steps=-1)
    with pytest.raises(ValueError, match="mask"):
        layer(torch.randn(1, 3, 8), mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        layer(torch.randn(1, 3, 8), mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="dim=8"):
        layer(torch.randn(1, 3, 7))
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        layer(torch.randn(1, 3, 8, dtype=DT))  # as every other layer (was a float64 output)
    with pytest.raises(ValueError, match="x is on meta"):
        layer(torch.randn(1, 3, 8, device="meta"))
    with pytest.raises(ValueError, match="optimizer"):
        EnergyTransformerAttention(8, optimizer="newton_light")


def test_normalized_dynamics_descend_and_move_at_a_bounded_rate():
    # Raw tokens: the energy is unbounded below and the descent runs away exponentially. With
    # normalize=True (the original's layer-norm dynamics) E(LN(x)) decreases for a small step,
    # and since ‖LN(x)‖ = √D every step is bounded: ‖∂E/∂g_A‖ ≤ Σ_h ‖W_Q‖‖W_K‖ √D (1 + N).
    x = torch.randn(3, 6, 8, dtype=DT)
    small = EnergyTransformerAttention(8, heads=2, dim_head=4, step_size=0.05, num_steps=20,
                                       normalize=True).to(DT)
    _, energies = small(x, return_energies=True)
    assert torch.all(energies.sum(dim=1).diff(dim=-1) < 0)

    T, alpha, N, D = 48, 0.1, 6, 8
    raw = EnergyTransformerAttention(D, heads=2, dim_head=4).to(DT)
    normed = EnergyTransformerAttention(D, heads=2, dim_head=4, normalize=True).to(DT)
    normed.load_state_dict(raw.state_dict())
    spectral = torch.linalg.matrix_norm(normed.w_q, ord=2) * torch.linalg.matrix_norm(
        normed.w_k, ord=2)
    bound = T * alpha * spectral.sum() * D**0.5 * (1 + N)
    with torch.no_grad():
        moved_normed = (normed(x, num_steps=T) - x).norm(dim=-1).max()
        moved_raw = (raw(x, num_steps=T) - x).norm(dim=-1).max()
    assert moved_normed <= bound < moved_raw
    with pytest.raises(TypeError, match="normalize"):
        EnergyTransformerAttention(8, normalize="yes")


def test_energy_and_layer_accumulate_in_float32_under_autocast():
    # torch.autocast runs einsum/matmul in bfloat16 whatever the inputs' dtype; the float32
    # accumulation the docs promise must hold under it too (energies float32, near float64).
    torch.manual_seed(0)
    w_q, w_k = _weights(H=2, Y=16, D=32)
    g = 3 * torch.randn(2, 24, 32, dtype=DT)
    ref = energy_transformer_energy(g, w_q, w_k, 0.25)
    args = (g.float(), w_q.float(), w_k.float(), 0.25)
    plain = energy_transformer_energy(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = energy_transformer_energy(*args)
        grad = energy_transformer_energy_grad(*args)
    assert e.dtype == torch.float32
    f32_err = (plain.double() - ref).abs().max()
    assert (e.double() - ref).abs().max() <= 2 * f32_err + 1e-5 * ref.abs().max()
    torch.testing.assert_close(grad, energy_transformer_energy_grad(*args))

    layer = EnergyTransformerAttention(8, heads=2, dim_head=4, num_steps=3)
    x = torch.randn(2, 6, 8)
    out, energies = layer(x, return_energies=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac, energies_ac = layer(x, return_energies=True)
    assert energies_ac.dtype == torch.float32 and out_ac.dtype == torch.float32
    torch.testing.assert_close(energies_ac, energies)
    torch.testing.assert_close(out_ac, out)


def test_inf_in_padding_reaches_no_token():
    """A padded token is neither query nor key (weight 0), but ``0 · inf`` is NaN: inf in a
    padded token made every token's gradient, and the layer's every output, NaN."""
    layer = EnergyTransformerAttention(8, heads=2, dim_head=4, num_steps=3).to(DT)
    x = torch.randn(2, 6, 8, dtype=DT)
    real = torch.ones(2, 6, dtype=torch.bool)
    real[0, 4:] = False
    x2 = x.clone()
    x2[0, 4:] = float("inf")
    pair = real[:, :, None] & real[:, None, :]
    for fn in (energy_transformer_energy, energy_transformer_energy_grad):
        got = fn(x2, layer.w_q, layer.w_k, 0.5, mask=pair)
        assert torch.equal(got[real], fn(x, layer.w_q, layer.w_k, 0.5, mask=pair)[real])
    assert torch.equal(layer(x2, mask=real)[real], layer(x, mask=real)[real])


def test_a_key_mask_broadcasts_like_the_full_mask():
    """``mask`` broadcasts to ``[..., N, N]`` as documented; a ``[N]`` key mask raised an
    IndexError."""
    w_q, w_k = _weights()
    g = torch.randn(2, 6, 5, dtype=DT)
    keys = torch.tensor([True, False, True, True, False, True])
    for fn in (energy_transformer_energy, energy_transformer_energy_grad):
        assert torch.equal(fn(g, w_q, w_k, 0.5, mask=keys),
                           fn(g, w_q, w_k, 0.5, mask=keys.expand(2, 6, 6)))
