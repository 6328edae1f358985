"""Additive float masks are logit biases of the energy: they act in every descent step.

``E(ξ_i) = ½‖ξ_i‖² − (1/β) log Σ_j exp(β ξ_i·k_j + b_ij)`` (docs/math.md §1). ``−inf`` and
entries ``<= finfo.min`` block a key; a finite ``b`` weighs it down by exactly ``b``. A key
weighed down by ``−1e4`` or ``−1e9`` next to a key with bias 0 gets the weight
``exp(b + Δlogit)``, which is exactly 0 in float32 and float64 (it underflows below about
``−104`` and ``−745``), so such a key is, to the last bit, as blocked as it is in
``nn.MultiheadAttention`` and SDPA; a row whose every key is weighed down alike is not blocked
(softmax is shift-invariant), only a row with every key blocked is empty.
"""

import functools

import pytest
import torch
from helpers import tol
from hypothesis import given, settings
from hypothesis import strategies as st

from energy_attn import hopfield_descent, hopfield_energy, masks, minimize_energy
from energy_attn.ops.hopfield import _kernel_masks, hopfield_fixed_point

f64 = torch.float64
OPTS = [("gd", 0.0), ("momentum", 0.6), ("nesterov", 0.6), ("newton_2nd1st", 0.0),
        ("newton_light", 0.0)]
BLOCKING = ["-1e4", "-1e9", "-inf", "finfo.min"]  # the float values users write for "blocked"


def fill_value(name, dtype):
    return torch.finfo(dtype).min if name == "finfo.min" else float(name)


def explicit_gd(q, k, bias, scale, step_size, num_steps):
    """The definition, written out: ξ ← ξ − η (ξ − softmax(β ξ Kᵀ + b) K)."""
    xi = q
    for _ in range(num_steps):
        p = (scale * xi @ k.transpose(-1, -2) + bias).softmax(dim=-1)
        xi = xi - step_size * (xi - p @ k)
    return xi


def test_a_finite_bias_acts_in_every_step():
    q, k = torch.randn(2, 2, 5, 4, dtype=f64), torch.randn(2, 2, 6, 4, dtype=f64)
    bias = 2 * torch.randn(2, 1, 5, 6, dtype=f64)  # dense [B, 1, N, M], finite
    out = hopfield_descent(q, k, scale=0.7, step_size=0.8, num_steps=3, mask=bias)
    expected = explicit_gd(q, k, bias, 0.7, 0.8, 3)
    torch.testing.assert_close(out, expected, atol=tol(f64)[0], rtol=tol(f64)[1])
    read_out_only = explicit_gd(explicit_gd(q, k, 0 * bias, 0.7, 0.8, 2), k, bias, 0.7, 0.8, 1)
    assert (out - read_out_only).abs().max() > 1e-2  # the old, read-out-only semantics differ


@pytest.mark.parametrize("optimizer,rho", OPTS)
def test_every_backend_and_optimizer_descends_the_biased_energy(optimizer, rho):
    q = torch.randn(2, 2, 5, 4, dtype=f64, requires_grad=True)
    k = torch.randn(2, 1, 5, 4, dtype=f64, requires_grad=True)
    bias = torch.randn(1, 2, 5, 5, dtype=f64).masked_fill(torch.rand(1, 2, 5, 5) < 0.3,
                                                          float("-inf"))
    kw = dict(scale=0.6, step_size=0.5, num_steps=3, mask=bias, is_causal=True,
              optimizer=optimizer, momentum=rho, return_energies=True)
    out, energies = hopfield_descent(q, k, backend="reference", **kw)
    if optimizer == "newton_light":  # no autograd form: the energy's closed-form direction
        kk = k.expand(2, 2, 5, 4)
        full = bias.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
        expected = minimize_energy(functools.partial(hopfield_energy, scale=0.6),
                                   q, kk, mask=full, step_size=0.5, num_steps=3,
                                   optimizer=optimizer)
        e_expected = None
    else:
        expected, e_expected = hopfield_descent(q, k, backend="autograd", **kw)
    atol, rtol = tol(f64)
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    if e_expected is not None:
        torch.testing.assert_close(energies, e_expected, atol=atol, rtol=rtol)
    assert energies.isfinite().all()


@pytest.mark.parametrize("value", BLOCKING)
@pytest.mark.parametrize("num_steps", [1, 3])
@pytest.mark.parametrize("optimizer,rho", OPTS)
def test_no_output_depends_on_a_blocked_key(value, num_steps, optimizer, rho):
    """Causal float mask: ∂ out_i / ∂ k_j is exactly 0 for j > i, as with a boolean mask."""
    B, H, N, D = 2, 2, 6, 8
    q = torch.randn(B, H, N, D, requires_grad=True)
    k = torch.randn(B, H, N, D, requires_grad=True)
    future = ~torch.ones(N, N, dtype=torch.bool).tril()
    bias = torch.zeros(N, N).masked_fill(future, fill_value(value, torch.float32))
    kw = dict(num_steps=num_steps, step_size=0.7, optimizer=optimizer, momentum=rho,
              backend="reference")
    out = hopfield_descent(q, k, mask=bias, **kw)
    for i in range(N - 1):
        (g,) = torch.autograd.grad(out[:, :, i].sum(), k, retain_graph=True)
        assert (g[:, :, i + 1:] == 0).all(), (value, i)
    boolean = hopfield_descent(q, k, is_causal=True, **kw)
    torch.testing.assert_close(out, boolean, atol=tol(torch.float32)[0], rtol=tol(torch.float32)[1])


@pytest.mark.parametrize("value", ["-inf", "finfo.min"])
def test_fully_blocked_rows_are_empty_and_finite(value):
    q = torch.randn(1, 1, 3, 4, dtype=f64, requires_grad=True)
    k = torch.randn(1, 1, 5, 4, dtype=f64, requires_grad=True)
    bias = torch.randn(1, 1, 3, 5, dtype=f64)
    bias[..., 1, :] = fill_value(value, f64)  # query 1 may attend nothing
    out, energies = hopfield_descent(q, k, mask=bias, num_steps=2, step_size=0.5,
                                     return_energies=True)
    assert out.isfinite().all() and energies.isfinite().all()
    torch.testing.assert_close(out[..., 1, :], 0.25 * q[..., 1, :])  # ∇E = ξ: decays by (1−η)²
    grads = torch.autograd.grad(out.sum() + energies.sum(), (q, k))
    assert all(g.isfinite().all() for g in grads)
    fp = hopfield_fixed_point(q, k, mask=bias, num_steps=5, step_size=0.5)
    assert fp.isfinite().all()


@pytest.mark.parametrize("value", ["-inf", "finfo.min"])
@pytest.mark.parametrize("optimizer,rho", OPTS)
def test_a_key_bias_that_blocks_is_a_boolean_mask(value, optimizer, rho):
    """key_bias is the additive mask b_ij = b_j (docs/math.md §1): −inf there blocks the key on
    every backend, the fixed point included, exactly like a boolean mask with the finite rest
    of the bias; a head with every key blocked is empty and finite (it was NaN)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 4, 3, dtype=f64, generator=g, requires_grad=True)
    k = torch.randn(1, 2, 5, 3, dtype=f64, generator=g, requires_grad=True)
    finite = torch.randn(1, 2, 5, dtype=f64, generator=g)
    blocked = torch.zeros(1, 2, 5, dtype=torch.bool)
    blocked[0, 0, 1] = blocked[0, 1, :] = True  # head 1 may attend nothing
    bias = finite.masked_fill(blocked, fill_value(value, f64)).requires_grad_()
    finite.requires_grad_()
    allowed = (~blocked).unsqueeze(-2)
    kw = dict(num_steps=2, step_size=0.5, optimizer=optimizer, momentum=rho)
    runs = [dict(backend="reference", return_energies=True)]
    if optimizer != "newton_light":
        runs.append(dict(backend="autograd", return_energies=True))
    if optimizer == "gd":
        runs.append(dict(solver="fixed_point", num_steps=4))
    for run in runs:
        got = hopfield_descent(q, k, key_bias=bias, **{**kw, **run})
        want = hopfield_descent(q, k, key_bias=finite, mask=allowed, **{**kw, **run})
        got, want = (r if isinstance(r, tuple) else (r,) for r in (got, want))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        wants = (q, k, finite) if "solver" not in run else (k, finite)
        ga = torch.autograd.grad(sum(r.sum() for r in got), wants[:-1] + (bias,))
        gb = torch.autograd.grad(sum(r.sum() for r in want), wants)
        for a, b in zip(ga, gb):
            assert a.isfinite().all()
            torch.testing.assert_close(a.masked_fill(blocked, 0) if a.shape == bias.shape else a,
                                       b.masked_fill(blocked, 0) if b.shape == bias.shape else b)


def test_half_precision_bias_below_the_dtype_range_weighs_down_not_blocks():
    """A float32 −1e9 bias with float16 queries is clamped to float16's lowest value, never
    −inf: a row whose every key is weighed down alike is not empty, and softmax's shift
    invariance makes it the unbiased row (the float64 truth)."""
    q, k = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 4, 8)
    bias = torch.full((1, 1, 2, 4), -1e9)
    out = hopfield_descent(q.half(), k.half(), mask=bias, num_steps=2)
    assert out.isfinite().all()
    truth = hopfield_descent(q.double(), k.double(), num_steps=2)
    atol, rtol = tol(torch.float16)
    torch.testing.assert_close(out.double(), truth, atol=atol, rtol=rtol)


def test_kernel_takes_per_key_biases_and_names_dense_ones():
    k_shape = (2, 2, 5, 4)
    kp = torch.zeros(2, 1, 1, 5)
    kp[0, ..., -1] = float("-inf")
    kp[1, ..., 0] = -3.0
    mask, bias, why = _kernel_masks(masks.from_user("m", kp), None, k_shape)
    assert why is None and bias.shape == (2, 2, 5) and bias.dtype == torch.float32
    assert mask[0, ..., -1].item() is False and bias[1, :, 0].eq(-3.0).all()
    dense = torch.zeros(2, 1, 3, 5)
    _, _, why = _kernel_masks(masks.from_user("m", dense), None, k_shape)
    assert "additive float mask" in why
    q, k = torch.randn(2, 2, 3, 4), torch.randn(*k_shape)
    with pytest.raises(ValueError, match="backend='triton'.*additive float mask"):
        hopfield_descent(q, k, mask=dense, backend="triton")


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 2), Hk=st.integers(1, 2), G=st.integers(1, 2), N=st.integers(1, 6),
    M=st.integers(2, 7), D=st.integers(1, 6), T=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, f64]),
    optimizer=st.sampled_from([o for o, _ in OPTS]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_blocked_keys_are_removed_keys(B, Hk, G, N, M, D, T, dtype, optimizer, seed):
    """Keys whose bias is a blocking value (next to a key with bias ~0) act as removed keys,
    and get exactly zero gradient; every output is finite."""
    torch.manual_seed(seed)  # the example's data is a function of the example
    H = Hk * G
    q = torch.randn(B, H, N, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hk, M, D, dtype=dtype, requires_grad=True)
    values = [0.0, -1e4, -1e9, float("-inf"), torch.finfo(dtype).min]
    per_key = torch.tensor(values, dtype=dtype)[torch.randint(0, 5, (M,))]
    per_key[torch.randint(0, M, ())] = 0.0  # at least one visible key
    small = 0.5 * torch.randn(B, 1, N, M, dtype=dtype)  # finite biases in every entry
    keep = per_key == 0
    rho = 0.5 if optimizer in ("momentum", "nesterov") else 0.0
    kw = dict(num_steps=T, step_size=0.5, optimizer=optimizer, momentum=rho)
    out = hopfield_descent(q, k, mask=small + per_key, **kw)
    assert out.isfinite().all()
    removed = hopfield_descent(q, k[:, :, keep], mask=small[..., keep], **kw)
    atol, rtol = tol(dtype)
    torch.testing.assert_close(out, removed, atol=atol, rtol=rtol)
    (g,) = torch.autograd.grad(out.square().sum(), k)
    assert (g[:, :, ~keep] == 0).all() and g.isfinite().all()


def test_fixed_point_solver_sees_the_bias_too():
    """solver='fixed_point' solves ξ* = softmax(β ξ* Kᵀ + b) K with the same float mask. With
    β = 0.1 and keys of norm ~1 the step's Jacobian βΣ has norm ≲ 0.1: one fixed point, and 100
    steps take the unrolled gradient's transient (from where ξ started) down to rounding."""
    q = 3 * torch.randn(2, 2, 4, 5, dtype=f64)
    k = (0.5 * torch.randn(2, 2, 6, 5, dtype=f64)).requires_grad_()
    bias = torch.randn(2, 1, 4, 6, dtype=f64).masked_fill(torch.rand(2, 1, 4, 6) < 0.3, -1e9)
    kw = dict(scale=0.1, num_steps=100, mask=bias)
    fixed = hopfield_descent(q, k, solver="fixed_point", **kw)
    unrolled = hopfield_descent(q, k, **kw)
    atol, rtol = tol(f64)
    torch.testing.assert_close(fixed, unrolled, atol=atol, rtol=rtol)
    w = torch.randn_like(q)
    g_fixed, g_unrolled = (torch.autograd.grad((z * w).sum(), k)[0] for z in (fixed, unrolled))
    torch.testing.assert_close(g_fixed, g_unrolled, atol=atol * g_unrolled.abs().max(), rtol=rtol)
