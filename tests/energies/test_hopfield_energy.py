import functools
import math

import pytest
import torch

from energy_attn import elastic_energy, elastic_energy_grad, hopfield_energy, hopfield_energy_grad
from energy_attn.energies import hopfield_newton_direction
from energy_attn.energies.hopfield import elastic_energy_self_grad, hopfield_energy_self_grad

f64 = torch.float64


def _data(b=2, n=5, m=7, d=4, dtype=f64):
    return torch.randn(b, n, d, dtype=dtype), torch.randn(b, m, d, dtype=dtype)


def _mask(b, n, m, full_row=True):
    mask = torch.rand(b, n, m) > 0.4
    if full_row:
        mask[0, 1] = False  # a query that may attend to nothing
    return mask


def test_value_matches_definition():
    xi, k = _data()
    beta = 0.7
    expected = 0.5 * (xi**2).sum(-1) - torch.logsumexp(beta * xi @ k.transpose(-1, -2), -1) / beta
    torch.testing.assert_close(hopfield_energy(xi, k, beta), expected)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_closed_form_gradient_equals_autograd(masked, bias):
    xi, k = _data()
    xi.requires_grad_(True)
    mask = _mask(2, 5, 7) if masked else None
    key_bias = torch.randn(2, 7, dtype=f64) if bias else None
    e = hopfield_energy(xi, k, 0.9, mask=mask, key_bias=key_bias)
    (g_auto,) = torch.autograd.grad(e.sum(), xi)
    g = hopfield_energy_grad(xi.detach(), k, 0.9, mask=mask, key_bias=key_bias)
    torch.testing.assert_close(g, g_auto, atol=1e-12, rtol=1e-10)


def test_fully_masked_row_rule():
    xi, k = _data()
    xi.requires_grad_(True)
    k.requires_grad_(True)
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[1] = True
    e = hopfield_energy(xi, k, 0.5, mask=mask)
    # Empty memory: potential 0, energy ½‖ξ‖², gradient ξ.
    torch.testing.assert_close(e[0], 0.5 * (xi[0] ** 2).sum(-1))
    torch.testing.assert_close(hopfield_energy_grad(xi, k, 0.5, mask=mask)[0], xi[0])
    e.sum().backward()
    assert torch.isfinite(xi.grad).all() and torch.isfinite(k.grad).all()
    torch.testing.assert_close(xi.grad[0], xi[0].detach())


def test_masking_a_stored_pattern_equals_removing_it():
    xi, k = _data(m=9)
    keep = torch.ones(2, 1, 9, dtype=torch.bool)
    keep[..., [0, 4, 8]] = False
    kept = k[:, [1, 2, 3, 5, 6, 7]]
    torch.testing.assert_close(hopfield_energy(xi, k, 1.3, mask=keep),
                               hopfield_energy(xi, kept, 1.3))
    torch.testing.assert_close(
        hopfield_energy_grad(xi, k, 1.3, mask=keep), hopfield_energy_grad(xi, kept, 1.3)
    )


def test_elastic_energy_is_helmholtz_free_energy():
    z, k = _data()
    beta = 0.8
    temp = 1 / beta
    local = 0.5 * ((z[:, :, None] - k[:, None]) ** 2).sum(-1)  # E_j(z) = ½‖z − k_j‖²
    expected = -temp * torch.logsumexp(-local / temp, dim=-1)
    torch.testing.assert_close(elastic_energy(z, k, beta), expected)
    z.requires_grad_(True)
    (g,) = torch.autograd.grad(elastic_energy(z, k, beta).sum(), z)
    torch.testing.assert_close(elastic_energy_grad(z.detach(), k, beta), g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    xi, k = _data(d=64, dtype=dtype)
    e = hopfield_energy(xi, k, 64**-0.5)
    assert e.dtype == torch.float32
    e64 = hopfield_energy(xi.double(), k.double(), 64**-0.5)
    # Inputs are exact in float64; only float32 accumulation error remains.
    torch.testing.assert_close(e.double(), e64, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", ["energy", "gradient", "2nd1st", "light"])
def test_autocast_keeps_the_float32_accumulation(kind):
    """Under bf16 autocast every matmul of the energy module must still run in float32: on
    bf16-exact inputs the result equals the float64 one up to float32 rounding."""
    xi, k = _data(d=64, dtype=torch.bfloat16)
    xi, k = xi + 3, k + 3  # an offset: 16-bit logits would be off by their ulp (≈ 0.06)
    fn = {"energy": hopfield_energy, "gradient": hopfield_energy_grad,
          "2nd1st": hopfield_newton_direction,
          "light": lambda *a: hopfield_newton_direction(*a, kind="light")}[kind]
    truth = fn(xi.double(), k.double(), 64**-0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(xi.float(), k.float(), 64**-0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), truth, atol=1e-4, rtol=1e-5)


def test_newton_directions_vs_dense_covariance():
    xi, k = _data(b=1, n=3, m=6, d=4)
    beta = 1.1
    mask = torch.ones(1, 3, 6, dtype=torch.bool)
    mask[0, 2, :2] = False
    p = torch.softmax((beta * xi @ k.transpose(-1, -2)).masked_fill(~mask, -math.inf), -1)
    mu = p @ k
    g = xi - mu
    for kind in ("2nd1st", "light"):
        d = hopfield_newton_direction(xi, k, beta, mask=mask, kind=kind)
        for i in range(3):
            c = k[0] - mu[0, i]
            sigma = (p[0, i, :, None, None] * c[:, :, None] * c[:, None, :]).sum(0)
            if kind == "light":
                sigma = torch.diag(torch.diagonal(sigma))
            expected = (torch.eye(4, dtype=f64) + beta * sigma) @ g[0, i]
            torch.testing.assert_close(d[0, i], expected)


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(scale=0.0), ValueError, "scale"),
        (dict(scale=-1.0), ValueError, "scale"),
        (dict(scale=float("nan")), ValueError, "scale"),
        (dict(mask=torch.ones(5, 6, dtype=torch.bool)), ValueError, "mask"),
        (dict(mask=torch.ones(5, 7, dtype=torch.long)), TypeError, "mask"),
        (dict(key_bias=torch.randn(2, 6)), ValueError, "key_bias"),
        (dict(key_bias=torch.ones(2, 7, dtype=torch.long)), TypeError, "key_bias"),
    ],
)
def test_bad_arguments_are_named(kw, exc, match):
    xi, k = _data(b=2, n=5, m=7)
    for fn in (hopfield_energy, hopfield_energy_grad, hopfield_newton_direction):
        with pytest.raises(exc, match=match):
            fn(xi, k, **kw)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((torch.randn(4, dtype=f64), torch.randn(7, 4, dtype=f64)), ValueError, "state_patterns"),
        ((torch.randn(5, 4, dtype=f64), torch.ones(7, 4, dtype=torch.long)), TypeError,
         "stored_patterns"),
        ((torch.randn(5, 4, dtype=f64), torch.randn(7, 4, dtype=f64, device="meta")),
         ValueError, "stored_patterns"),
        ((torch.randn(5, 4, dtype=f64), torch.randn(7, 4, dtype=f64), None,
          torch.ones(5, 7, dtype=torch.bool, device="meta")), ValueError, "mask"),
    ],
)
def test_bad_patterns_are_named(args, exc, match):
    """A 1-D pattern, an integer one or one on another device failed deep inside einsum (a
    RuntimeError or IndexError), or was silently accepted."""
    for fn in (hopfield_energy, hopfield_energy_grad, hopfield_newton_direction,
               elastic_energy, elastic_energy_grad):
        with pytest.raises(exc, match=match):
            fn(*args)


@pytest.mark.parametrize("kind", ["2nd1st", "light"])
def test_newton_direction_takes_a_per_key_mask(kind):
    """A mask ``[m]`` broadcasts to ``[..., n, m]`` as documented; the Newton direction raised
    an IndexError on it."""
    xi, k = _data()
    pad = torch.tensor([True] * 5 + [False] * 2)
    got = hopfield_newton_direction(xi, k, mask=pad, kind=kind)
    torch.testing.assert_close(got, hopfield_newton_direction(xi, k, mask=pad.expand(2, 5, 7),
                                                              kind=kind))


def _elastic_fns():
    from energy_attn.energies import elastic_newton_direction

    return {"energy": elastic_energy, "gradient": elastic_energy_grad,
            "2nd1st": elastic_newton_direction,
            "light": lambda *a, **kw: elastic_newton_direction(*a, **kw, kind="light")}


@pytest.mark.parametrize("kind", ["energy", "gradient", "2nd1st", "light", "self"])
def test_elastic_energy_of_keys_far_from_the_origin_keeps_float32_accuracy(kind):
    """The logits ``β z·k − ½β‖k‖²`` subtract two terms of size β‖k‖²: with patterns near
    1000 per coordinate the float32 gradient was 10% off, the 2nd1st direction 37%, the
    self-consistent gradient 5 times its size. ``F*`` is translation invariant, so its float32
    error there must stay that of patterns near 0."""
    g = torch.Generator().manual_seed(0)
    z, k = (3 * torch.randn(2, n, 16, generator=g) for n in (8, 32))
    fn = _elastic_fns()[kind] if kind != "self" else (
        lambda z, k, beta: elastic_energy_self_grad(z, z, beta))

    def error(z, k):  # float32 against float64 on the same (float32) inputs, relative
        truth = fn(z.double(), k.double(), 0.25)
        return ((fn(z, k, 0.25).double() - truth).abs().max() / truth.abs().max()).item()

    assert fn(z + 1000, k + 1000, 0.25).dtype == torch.float32
    assert error(z + 1000, k + 1000) <= 4 * error(z, k)


@pytest.mark.parametrize("kind", ["energy", "gradient", "2nd1st", "light"])
def test_elastic_energy_masks_are_exact(kind):
    """Centring keeps the mask rules: an empty memory gives ``½‖z‖²`` and ``z``; keys a query
    may not attend (future ones, padding, even inf) leave its output bit-identical."""
    fn = _elastic_fns()[kind]
    z, k = _data(n=6, m=6, dtype=torch.float32)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    mask = causal & torch.tensor([True] * 4 + [False] * 2)  # padding of the last two keys
    mask = mask.expand(2, 6, 6).clone()
    mask[0, 2] = False  # an empty memory
    out = fn(z, k, 0.5, mask=mask)
    empty = 0.5 * z[0, 2].square().sum() if kind == "energy" else z[0, 2]
    assert torch.equal(out[0, 2], empty)
    k2 = k.clone()
    k2[:, 4:] = float("inf")  # padding
    k2[:, 3] += 1e3  # a future key of the queries before it
    out2 = fn(z, k2, 0.5, mask=mask)
    assert torch.equal(out2[:, :3], out[:, :3]) and torch.isfinite(out2).all()


@pytest.mark.parametrize("additive", [False, True])
def test_inf_behind_padding_reaches_no_output_and_no_gradient(additive):
    """A padded key's probability is 0, but ``0 · inf`` is NaN: inf behind a padding mask made
    the closed-form gradient and autograd's gradients NaN (the Newton direction zeroed them)."""
    xi, k = _data()
    pad = torch.tensor([True] * 5 + [False] * 2)
    mask = torch.zeros(7, dtype=f64).masked_fill(~pad, -math.inf) if additive else pad
    bad = k.clone()
    bad[:, 5:] = float("inf")
    bad.requires_grad_(True)
    xi.requires_grad_(True)
    e = hopfield_energy(xi, bad, 0.5, mask=mask)
    assert torch.equal(e, hopfield_energy(xi, k, 0.5, mask=mask))
    assert torch.equal(hopfield_energy_grad(xi, bad, 0.5, mask=mask),
                       hopfield_energy_grad(xi, k, 0.5, mask=mask))
    gx, gk = torch.autograd.grad(e.sum(), (xi, bad))
    assert torch.isfinite(gx).all() and torch.isfinite(gk).all()
    assert torch.equal(gk[:, 5:], torch.zeros_like(gk[:, 5:]))


@pytest.mark.parametrize("kind", ["gradient", "2nd1st", "light"])
def test_keys_sharing_an_offset_cost_no_accuracy(kind):
    """Logits ``β ξ·k`` of patterns near 100 are ≈ 4·10⁴, and their float32 rounding put
    errors of 2-3x the output's own rounding into float16 gradients and Newton directions
    (5·10⁻⁴ relative in float32). Formed about the keys' mean, only that rounding is left."""
    g = torch.Generator().manual_seed(2)
    xi, k = ((3 * torch.randn(2, n, 16, generator=g) + 100).half() for n in (8, 32))
    fn = {"gradient": hopfield_energy_grad, "2nd1st": hopfield_newton_direction,
          "light": lambda *a: hopfield_newton_direction(*a, kind="light")}[kind]
    exact = fn(xi.double(), k.double(), 0.25)
    got = fn(xi, k, 0.25)
    assert got.dtype == torch.float16
    rounding = (exact.half().double() - exact).abs().max()
    assert (got.double() - exact).abs().max() <= 1.5 * rounding


@pytest.mark.parametrize("kind", ["energy", "gradient", "2nd1st", "light", "self"])
def test_a_blocking_key_bias_is_a_boolean_mask(kind):
    """``key_bias`` is the additive mask ``b_ij = b_j`` (docs/math.md §1.2): ``−inf`` or an entry
    ``<= finfo.min`` blocks its key, as it does in ``hopfield_descent``. The energies added it
    raw, so a row whose keys it blocked entirely was NaN instead of an empty memory."""
    fn = {"energy": hopfield_energy, "gradient": hopfield_energy_grad,
          "2nd1st": hopfield_newton_direction,
          "light": functools.partial(hopfield_newton_direction, kind="light"),
          "self": lambda xi, k, *a, **kw: hopfield_energy_self_grad(xi, xi, *a, **kw)}[kind]
    xi, k = _data(n=5, m=5)
    bias = torch.randn(2, 5, dtype=f64)
    blocked = torch.zeros(2, 5, dtype=torch.bool)
    blocked[0] = True  # every key of the first batch element
    blocked[1, [1, 3]] = True
    inf_bias = bias.masked_fill(blocked, -math.inf)
    inf_bias[:, 1] = torch.finfo(f64).min
    mask = _mask(2, 5, 5)
    got = fn(xi, k, 0.7, mask=mask, key_bias=inf_bias)
    assert torch.isfinite(got).all()
    want = fn(xi, k, 0.7, mask=mask & ~blocked.unsqueeze(-2), key_bias=bias.masked_fill(blocked, 0))
    torch.testing.assert_close(got, want)
    empty = 0.5 * xi[0].square().sum(-1) if kind == "energy" else xi[0]
    torch.testing.assert_close(got[0], empty)
