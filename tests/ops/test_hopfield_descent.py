import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from energy_attn import hopfield_descent, hopfield_energy
from energy_attn.ops.hopfield import hopfield_fixed_point

f64 = torch.float64
OPTS = [("gd", 0.0), ("momentum", 0.6), ("nesterov", 0.6), ("newton_2nd1st", 0.0),
        ("newton_light", 0.0)]


def make_mask(kind, B, H, N, M):
    """Every mask kind the op takes (True = may attend); returns (mask, is_causal)."""
    if kind == "none":
        return None, False
    if kind == "padding":
        m = torch.ones(B, 1, 1, M, dtype=torch.bool)
        m[0, ..., M // 2:] = False
        return m, False
    if kind == "causal":
        return None, True
    if kind == "causal+padding":
        m = torch.ones(B, 1, 1, M, dtype=torch.bool)
        m[-1, ..., :2] = False  # rows 0 and 1 of the last batch become fully masked
        return m, True
    if kind == "full-rows":
        m = torch.rand(B, H, N, M) > 0.3
        m[0, 0, :3] = False
        return m, False
    raise ValueError(kind)


MASKS = ["none", "padding", "causal", "causal+padding", "full-rows"]


def data(B=2, H=2, Hk=2, N=7, M=7, D=5, dtype=f64, grad=True):
    q = torch.randn(B, H, N, D, dtype=dtype, requires_grad=grad)
    k = torch.randn(B, Hk, M, D, dtype=dtype, requires_grad=grad)
    return q, k


def test_one_unit_step_is_softmax_attention_with_values_keys():
    q, k = data(B=1, H=8, Hk=8, N=8, M=32, D=64, dtype=torch.float32, grad=False)
    out = hopfield_descent(q, k, step_size=1.0, num_steps=1)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, k), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("optimizer,rho", OPTS[:4])
def test_reference_equals_autograd_backend(mask_kind, optimizer, rho):
    N = M = 7
    q, k = data(N=N, M=M)
    mask, causal = make_mask(mask_kind, 2, 2, N, M)
    bias = torch.randn(2, 2, M, dtype=f64, requires_grad=True)
    kw = dict(scale=0.6, step_size=0.8, num_steps=3, mask=mask, is_causal=causal, key_bias=bias,
              optimizer=optimizer, momentum=rho, return_energies=True)
    ref, e_ref = hopfield_descent(q, k, backend="reference", **kw)
    auto, e_auto = hopfield_descent(q, k, backend="autograd", **kw)
    torch.testing.assert_close(ref, auto)
    torch.testing.assert_close(e_ref, e_auto)
    w = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * w).sum() + e_ref.sum(), (q, k, bias))
    g_auto = torch.autograd.grad((auto * w).sum() + e_auto.sum(), (q, k, bias))
    for a, b in zip(g_ref, g_auto):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("optimizer", ["gd", "newton_2nd1st"])
def test_autograd_backend_float32_with_large_logits(optimizer):
    """Keys far from the origin and the elastic key bias give logits near −10³: the autograd
    backend's lse must be shifted (docs/math.md §1.1) or float32 rounding of lse alone scales every
    p by 1 ± 1e-3 (without the shift: errors 84x (gd) and 1e5x (newton_2nd1st) the reference's)."""
    from energy_attn.energies import elastic_key_bias

    g = torch.Generator().manual_seed(0)
    D = 16
    centre = torch.randn(D, generator=g).abs() * 100
    k = centre + torch.randn(1, 1, 9, D, generator=g)
    q = centre + torch.randn(1, 1, 8, D, generator=g)
    bias = elastic_key_bias(k, D ** -0.5)
    kw = dict(step_size=0.7, num_steps=3, optimizer=optimizer)
    truth = hopfield_descent(q.double(), k.double(), key_bias=bias.double(), **kw)
    step = (truth - q.double()).norm()
    for backend in ("reference", "autograd"):
        out = hopfield_descent(q, k, key_bias=bias, backend=backend, **kw)
        assert (out.double() - truth).norm() / step < 3e-3, backend


@pytest.mark.parametrize("T", [1, 2, 3])
@pytest.mark.parametrize("optimizer,rho", OPTS)
def test_gradcheck(T, optimizer, rho):
    q, k = data(B=1, H=2, Hk=1, N=4, M=5, D=3)
    mask = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    mask[..., 1] = False
    bias = torch.randn(1, 1, 5, dtype=f64, requires_grad=True)

    def fn(q, k, bias):
        return hopfield_descent(q, k, scale=0.9, step_size=0.7, num_steps=T, mask=mask,
                                key_bias=bias, optimizer=optimizer, momentum=rho,
                                backend="reference")

    assert torch.autograd.gradcheck(fn, (q, k, bias))


@pytest.mark.parametrize("mask_kind", MASKS)
def test_finite_outputs_and_gradients_for_every_mask(mask_kind):
    q, k = data(B=2, H=2, N=6, M=6, dtype=torch.float32)
    mask, causal = make_mask(mask_kind, 2, 2, 6, 6)
    out = hopfield_descent(q, k, num_steps=3, mask=mask, is_causal=causal)
    out.sum().backward()
    assert out.isfinite().all() and q.grad.isfinite().all() and k.grad.isfinite().all()


def test_fully_masked_row_decays_geometrically():
    # Empty memory: μ = 0, so gd gives ξ_T = (1 − η)^T ξ_0.
    q, k = data(B=1, H=1, Hk=1, N=3, M=4, grad=False)
    mask = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    mask[0, 0, 1] = False
    out = hopfield_descent(q, k, step_size=0.5, num_steps=3, mask=mask)
    torch.testing.assert_close(out[0, 0, 1], q[0, 0, 1] * 0.5**3)


def test_masking_equals_removing_keys():
    q, k = data(B=2, H=2, N=5, M=9, grad=False)
    keep = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    keep[..., [2, 5]] = False
    a = hopfield_descent(q, k, num_steps=3, step_size=0.5, mask=keep)
    b = hopfield_descent(q, k[:, :, [0, 1, 3, 4, 6, 7, 8]], num_steps=3, step_size=0.5)
    torch.testing.assert_close(a, b)


def test_causal_equals_explicit_lower_triangular_mask():
    q, k = data(N=9, M=9, grad=False)
    tri = torch.ones(9, 9, dtype=torch.bool).tril()
    torch.testing.assert_close(hopfield_descent(q, k, num_steps=2, is_causal=True),
                               hopfield_descent(q, k, num_steps=2, mask=tri))


def test_grouped_query_equals_repeated_keys():
    q, k = data(B=1, H=6, Hk=2, N=5, M=4, grad=False)
    torch.testing.assert_close(
        hopfield_descent(q, k, num_steps=2),
        hopfield_descent(q, k.repeat_interleave(3, dim=1), num_steps=2),
    )


@pytest.mark.parametrize("optimizer,rho", OPTS)
def test_energies_decrease_and_match_the_energy_function(optimizer, rho):
    q, k = data(B=2, H=2, N=16, M=24, D=8, grad=False)
    out, e = hopfield_descent(q * 2, k, scale=1.0, step_size=0.5, num_steps=6,
                              optimizer=optimizer, momentum=rho, return_energies=True)
    assert e.shape == (2, 2, 16, 7) and e.dtype == f64
    torch.testing.assert_close(e[..., -1], hopfield_energy(out, k, 1.0))
    if optimizer in ("gd", "newton_light", "newton_2nd1st"):
        assert (e[..., 1:] <= e[..., :-1] + 1e-10).all()
    assert (e[..., -1] < e[..., 0]).all()


def test_zero_steps_is_identity_and_energies_have_one_entry():
    q, k = data(grad=False)
    out, e = hopfield_descent(q, k, num_steps=0, return_energies=True)
    torch.testing.assert_close(out, q)
    assert e.shape[-1] == 1


@pytest.mark.parametrize("dtype", [f64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(backend="reference"), dict(backend="autograd"),
                                     dict(optimizer="nesterov", momentum=0.5),
                                     dict(optimizer="newton_light"), dict(tol=0.1),
                                     dict(solver="fixed_point"), dict(return_energies=True)],
                         ids=["reference", "autograd", "nesterov", "newton_light", "tol",
                              "fixed_point", "energies"])
def test_zero_steps_return_a_new_tensor_equal_to_q_in_its_dtype(dtype, options):
    """Like every T > 0 (and any op), T = 0 never returns q itself nor a view of it."""
    q, k = data(dtype=dtype, grad=False)
    out = hopfield_descent(q, k, num_steps=0, **options)
    out = out[0] if isinstance(out, tuple) else out
    assert out is not q and not out._is_view() and out.data_ptr() != q.data_ptr()
    assert out.dtype == dtype and torch.equal(out, q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_is_rounding_level(dtype):
    q64, k64 = data(B=1, H=2, N=33, M=47, D=16, grad=False)
    out = hopfield_descent(q64.to(dtype), k64.to(dtype), num_steps=3, step_size=0.5)
    assert out.dtype == dtype
    truth = hopfield_descent(q64.to(dtype).double(), k64.to(dtype).double(), num_steps=3,
                             step_size=0.5)
    eps = torch.finfo(dtype).eps
    # Each step reads out with ξ rounded to dtype: error a few eps of the O(1) values.
    torch.testing.assert_close(out.double(), truth, atol=16 * eps, rtol=16 * eps)


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2), Hk=st.integers(1, 2), G=st.integers(1, 2), N=st.integers(1, 9),
    M=st.integers(1, 9), D=st.integers(1, 6), T=st.integers(0, 3),
    mask_kind=st.sampled_from(MASKS), dtype=st.sampled_from([torch.float32, f64]),
    optimizer=st.sampled_from([o for o, _ in OPTS]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_reference_matches_autograd(B, Hk, G, N, M, D, T, mask_kind, dtype, optimizer, seed):
    torch.manual_seed(seed)  # the example's data is a function of the example
    if "causal" in mask_kind:
        M = N
    H = Hk * G
    q, k = data(B, H, Hk, N, M, D, dtype=dtype, grad=False)
    mask, causal = make_mask(mask_kind, B, H, N, M)
    rho = 0.5 if optimizer in ("momentum", "nesterov") else 0.0
    kw = dict(num_steps=T, step_size=0.9, mask=mask, is_causal=causal, optimizer=optimizer,
              momentum=rho)
    ref = hopfield_descent(q, k, backend="reference", **kw)
    assert ref.shape == q.shape and torch.isfinite(ref).all()
    if optimizer != "newton_light":
        auto = hopfield_descent(q, k, backend="autograd", **kw)
        atol = 1e-5 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(ref, auto, atol=atol, rtol=atol)


def _bad(**over):
    q, k = data(grad=False)
    kw = dict(q=q, k=k)
    kw.update(over)
    q, k = kw.pop("q"), kw.pop("k")
    return hopfield_descent(q, k, **kw)


@pytest.mark.parametrize(
    "over, exc, match",
    [
        (dict(k=torch.randn(2, 2, 7, 4, dtype=f64)), ValueError, "head dim"),
        (dict(k=torch.randn(3, 2, 7, 5, dtype=f64)), ValueError, "batch"),
        (dict(k=torch.randn(2, 3, 7, 5, dtype=f64)), ValueError, "divide"),
        (dict(q=torch.randn(2, 7, 5, dtype=f64)), ValueError, "q must have 4"),
        (dict(q=torch.ones(2, 2, 7, 5, dtype=torch.long)), TypeError, "q must be a floating"),
        (dict(k=torch.randn(2, 2, 7, 5)), TypeError, "share a dtype"),
        (dict(mask=torch.ones(2, 2, 7, 6, dtype=torch.bool)), ValueError, "mask"),
        (dict(mask=torch.ones(2, 1, 1, 7, dtype=torch.long)), TypeError, "mask"),
        (dict(num_steps=-1), ValueError, "num_steps"),
        (dict(num_steps=2.0), TypeError, "num_steps"),
        (dict(step_size=float("inf")), ValueError, "step_size"),
        (dict(step_size=torch.tensor(0.5)), TypeError, "step_size"),
        (dict(scale=torch.tensor(0.5)), TypeError, "scale"),
        (dict(tol=torch.tensor(0.5)), TypeError, "tol"),
        (dict(scale=float("nan")), ValueError, "scale"),
        (dict(scale=-1.0), ValueError, "scale"),
        (dict(key_bias=torch.randn(2, 2, 6, dtype=f64)), ValueError, "key_bias"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(optimizer="sgd"), ValueError, "optimizer"),
        (dict(is_causal=1), TypeError, "is_causal"),
        (dict(k=torch.randn(2, 2, 5, 5, dtype=f64), is_causal=True), ValueError, "N == M"),
        (dict(k=torch.randn(2, 2, 7, 5, dtype=f64, device="meta")), ValueError, "device"),
        (dict(k=torch.randn(2, 2, 0, 5, dtype=f64)), ValueError, "at least one key"),
        (dict(q=torch.randn(2, 2, 7, 0, dtype=f64), k=torch.randn(2, 2, 7, 0, dtype=f64)),
         ValueError, "head dim D >= 1"),
    ],
)
def test_bad_inputs_name_the_argument(over, exc, match):
    with pytest.raises(exc, match=match):
        _bad(**over)


@pytest.mark.parametrize("shape", [(7,), (1, 7), (2, 1, 1, 7)])
def test_masks_with_fewer_dims_broadcast_like_sdpa(shape):
    q, k = data(grad=False)
    mask = torch.rand(shape) > 0.3
    full = mask.reshape((1,) * (4 - mask.dim()) + shape).expand(2, 2, 7, 7)
    torch.testing.assert_close(hopfield_descent(q, k, mask=mask, num_steps=2, backend="reference"),
                               hopfield_descent(q, k, mask=full, num_steps=2, backend="reference"))
    torch.testing.assert_close(hopfield_fixed_point(q, k, mask=mask, num_steps=3),
                               hopfield_fixed_point(q, k, mask=full, num_steps=3))


@pytest.mark.parametrize("optimizer,rho", OPTS)
@pytest.mark.parametrize("garbage", [float("inf"), float("nan"), 1e30])
def test_non_finite_keys_behind_a_key_padding_mask_are_never_seen(optimizer, rho, garbage):
    """Blocked keys have probability 0, but 0 · inf is NaN: what a user padded must not reach
    the output or any gradient (grouped heads: a key blocked for its whole group)."""
    q, k = data(B=2, H=4, Hk=2, N=5, M=6, D=3)
    pad = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    pad[0, ..., 4:] = False
    clean = k.detach().clone().requires_grad_()
    dirty = k.detach().masked_fill(~pad.transpose(-1, -2), garbage).requires_grad_()
    backends = ["reference"] + (["autograd"] if optimizer != "newton_light" else [])
    for backend in backends:
        kw = dict(mask=pad, num_steps=2, step_size=0.7, optimizer=optimizer, momentum=rho,
                  backend=backend)
        want = hopfield_descent(q, clean, **kw)
        got = hopfield_descent(q, dirty, **kw)
        torch.testing.assert_close(got, want)
        w = torch.randn_like(want)
        g_want = torch.autograd.grad((want * w).sum(), (q, clean))
        g_got = torch.autograd.grad((got * w).sum(), (q, dirty))
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b)
    if optimizer == "gd":
        torch.testing.assert_close(
            hopfield_fixed_point(q.detach(), dirty, mask=pad, num_steps=20, step_size=0.7),
            hopfield_fixed_point(q.detach(), clean, mask=pad, num_steps=20, step_size=0.7))


@pytest.mark.parametrize("optimizer,rho", OPTS[:4])
def test_autograd_backend_differentiates_key_bias_and_float_mask_alone(optimizer, rho):
    """With q and k constant, the key bias and a float mask still get their gradients on the
    autograd backend, equal to the reference backend's (they were silently dropped)."""
    q, k = data(grad=False)
    bias = torch.randn(2, 2, 7, dtype=f64, requires_grad=True)
    mask = torch.randn(2, 1, 7, 7, dtype=f64, requires_grad=True)
    grads = []
    for backend in ("reference", "autograd"):
        out = hopfield_descent(q, k, key_bias=bias, mask=mask, num_steps=2, step_size=0.7,
                               optimizer=optimizer, momentum=rho, backend=backend)
        grads.append(torch.autograd.grad(out.square().sum(), (bias, mask)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("optimizer,rho", OPTS)
def test_keys_that_causality_and_a_mask_together_hide_are_never_seen(optimizer, rho):
    """A key the mask leaves only to earlier queries is blocked for every query once causality
    is folded in: inf there reaches no output and no gradient (it made every row NaN)."""
    q, k = data(B=1, H=2, Hk=1, N=4, M=4, D=3)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[2:, 2] = False  # key 2: only queries 0 and 1 may attend it, which causality blocks
    clean = k.detach().clone().requires_grad_()
    dirty = k.detach().clone()
    dirty[..., 2, :] = float("inf")
    dirty.requires_grad_()
    backends = ["reference"] + (["autograd"] if optimizer != "newton_light" else [])
    for backend in backends:
        kw = dict(mask=mask, is_causal=True, num_steps=2, step_size=0.7, optimizer=optimizer,
                  momentum=rho, backend=backend)
        want = hopfield_descent(q, clean, **kw)
        got = hopfield_descent(q, dirty, **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        w = torch.randn_like(want)
        g_want = torch.autograd.grad((want * w).sum(), (q, clean))
        g_got = torch.autograd.grad((got * w).sum(), (q, dirty))
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    if optimizer == "gd":
        torch.testing.assert_close(
            hopfield_fixed_point(q.detach(), dirty, mask=mask, is_causal=True, num_steps=5),
            hopfield_fixed_point(q.detach(), clean, mask=mask, is_causal=True, num_steps=5),
            rtol=0, atol=0)


@pytest.mark.parametrize("optimizer,rho", OPTS[:3])
def test_causal_first_order_steps_build_no_n_by_m_mask(monkeypatch, optimizer, rho):
    """A causal call with no other mask reads out through SDPA's is_causal flag: an N×M causal
    mask built per call and never read cost a quarter of the call (N = M = 4096, CPU)."""
    import energy_attn.masks as masks  # noqa: PLC0415

    built = []
    real = masks.causal
    monkeypatch.setattr(masks, "causal", lambda *a, **kw: built.append(a) or real(*a, **kw))
    q, k = data(grad=True)
    out = hopfield_descent(q, k, is_causal=True, num_steps=2, optimizer=optimizer, momentum=rho,
                           backend="reference")
    out.sum().backward()
    assert built == []


@pytest.mark.parametrize("optimizer", ["newton_2nd1st", "newton_light"])
def test_newton_steps_centre_the_keys_once_per_call_not_once_per_step(monkeypatch, optimizer):
    """The keys are fixed: their centring (and the explicit logits' mask) is per-call work
    (per step it cost ~20% of a masked newton_2nd1st call on CPU)."""
    import energy_attn.energies.hopfield as energies  # noqa: PLC0415
    import energy_attn.ops.hopfield as ops  # noqa: PLC0415

    calls = []
    for module in (ops, energies):
        real = module.centred
        monkeypatch.setattr(module, "centred",
                            lambda *a, real=real, **kw: calls.append(1) or real(*a, **kw))
    q, k = data(B=2, H=2, Hk=1, N=6, M=9, D=4, grad=False)
    mask = torch.rand(2, 2, 6, 9) > 0.3
    for steps in (1, 4):
        calls.clear()
        hopfield_descent(q, k, num_steps=steps, optimizer=optimizer, mask=mask,
                         key_bias=torch.randn(2, 1, 9, dtype=f64), backend="reference")
        assert len(calls) == 1, (steps, len(calls))
