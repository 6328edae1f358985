"""The fused Triton kernel vs the reference backend: forward, energies and every gradient.

Tolerances come from the dtype: the kernel's error against a float64 ground truth (the
reference backend in float64) must be within a small factor of the reference backend's own
error in the same dtype, plus a few ulps of the result's magnitude. Sizes are odd (N=63,
M=111) and cross the interpreter's 32-wide tiles.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import key_path_knobs
from energy_attn.kernels import hopfield_descent as kmod
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from energy_attn import hopfield_descent
from energy_attn.ops import hopfield as hop

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

f64 = torch.float64
# Keys at half the scale of unit-normal queries keep the descent map contracting, so rounding
# errors of either backend are not blown up along an unstable direction and a max-error
# comparison is meaningful; the expanding regime is checked on mean errors separately.
KEY_SCALE = 0.5
OPTS = {"gd": 0.0, "momentum": 0.6, "nesterov": 0.6}
MASKS = ["none", "padding", "causal", "causal+padding", "full-rows"]


def make_mask(kind, B, M):
    """(mask [B,1,1,M] or None, is_causal) for every mask kind the kernel takes natively."""
    if kind in ("none", "causal"):
        return None, kind == "causal"
    m = torch.ones(B, 1, 1, M, dtype=torch.bool, device=DEVICE)
    if kind == "padding":
        m[0, ..., M // 2:] = False
    elif kind == "causal+padding":
        m[-1, ..., :2] = False  # rows 0, 1 of the last batch element see nothing
    elif kind == "full-rows":
        m[0, ..., 5:] = False
        m[-1] = False  # every row of the last batch element is fully masked
    return m, kind.startswith("causal")


def make_inputs(B, H, Hk, N, M, D, dtype, bias=True, seed=0, key_scale=KEY_SCALE):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=f64)
    k = key_scale * torch.randn(B, Hk, M, D, generator=g, dtype=f64)
    b = 0.5 * torch.randn(B, Hk, M, generator=g, dtype=f64) if bias else None
    dout = torch.randn(B, H, N, D, generator=g, dtype=f64)
    cast = [t.to(DEVICE, dtype) if t is not None else None for t in (q, k, b, dout)]
    exact = [t.to(DEVICE) if t is not None else None for t in (q, k, b, dout)]
    return cast, exact


def run(backend, q, k, b, dout, **kw):
    """Output and the gradients w.r.t. (q, k, key_bias) of ``<out, dout>``."""
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (q, k, b)]
    out = hopfield_descent(leaves[0], leaves[1], key_bias=leaves[2], backend=backend, **kw)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], dout,
                                allow_unused=True, materialize_grads=True)  # T = 0: dk = 0
    return [out, *grads]


def run_energies(backend, q, k, b, de, **kw):
    """The energies (``return_energies=True``) and the gradients w.r.t. (q, k, key_bias) of
    ``<energies, de>``."""
    leaves = [t.detach().requires_grad_(True) for t in (q, k, b)]
    _, e = hopfield_descent(*leaves[:2], key_bias=leaves[2], backend=backend, **kw)
    return [e, *torch.autograd.grad(e, leaves, de.to(e.dtype))]


def assert_close_to_truth(name, kernel, ref, truth, dtype, scale=0.0):
    """``scale``: the magnitude of the terms a result is computed from, when larger than the
    result. ``d key_bias = Σ_i P ⊙ (dμ·k − Δ)`` cancels exactly where a row sees one key, and
    the kernel's ``Δ = dμ·μ`` (the flash-attention identity, exact in exact arithmetic) differs
    from ``dμ·k`` by an ulp of those terms, not of the zero result."""
    eps = torch.finfo(dtype).eps
    mag = max(truth.abs().max().item(), scale)
    err_k = (kernel.to(f64) - truth).abs().max().item()
    err_r = (ref.to(f64) - truth).abs().max().item()
    assert torch.isfinite(kernel).all(), f"{name}: non-finite values"
    bound = 2.0 * err_r + 8.0 * eps * mag
    assert err_k <= bound, f"{name}: kernel error {err_k:.3g} > {bound:.3g} (reference {err_r:.3g})"


def compare(dtype, *, B=2, H=2, Hk=1, N=63, M=111, D=32, mask_kind="none", optimizer="gd",
            num_steps=3, step_size=0.8, bias=True, scale=None):
    mask, causal = make_mask(mask_kind, B, M)
    if causal:
        N = M
    (q, k, b, dout), (q64, k64, b64, dout64) = make_inputs(B, H, Hk, N, M, D, dtype, bias)
    kw = dict(num_steps=num_steps, step_size=step_size, optimizer=optimizer,
              momentum=OPTS[optimizer], mask=mask, is_causal=causal, scale=scale)
    got = run("triton", q, k, b, dout, **kw)
    ref = run("reference", q, k, b, dout, **kw)
    truth = run("reference", q64, k64, b64, dout64, **kw)
    # The gradients are sums of dμ·k-sized terms: an ulp of that product is their rounding scale.
    terms = dout64.abs().max().item() * k64.abs().max().item()
    for name, g, r, t in zip(["out", "dq", "dk", "dkey_bias"], got, ref, truth):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        assert_close_to_truth(name, g, r, t, dtype, scale=terms if name != "out" else 0.0)


@pytest.mark.parametrize("optimizer", list(OPTS))
@pytest.mark.parametrize("mask_kind", MASKS)
def test_every_mask_and_optimizer_float32(mask_kind, optimizer, key_path):
    compare(torch.float32, mask_kind=mask_kind, optimizer=optimizer)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("optimizer", list(OPTS))
def test_half_precision(dtype, optimizer, key_path):
    compare(dtype, mask_kind="causal+padding", optimizer=optimizer, Hk=2)


@pytest.mark.parametrize("mask_kind", ["padding", "full-rows"])
def test_half_precision_masks_and_many_steps(mask_kind):
    compare(torch.float16, mask_kind=mask_kind, optimizer="nesterov", num_steps=5, H=4, Hk=2,
            N=40, M=70, D=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_expanding_regime_median_error(dtype):
    """Unit-scale keys, rows that see only 5 keys, 5 Nesterov steps: near ties the step map
    expands (Jacobian (1−η)I + ηβΣ, docs/math.md §4.2) and amplifies any backend's rounding on a few
    rows, so the maximum error is noise there; the typical (median) error must still match."""
    mask, _ = make_mask("full-rows", 2, 70)
    (q, k, b, dout), (q64, k64, b64, dout64) = make_inputs(2, 4, 2, 40, 70, 64, dtype,
                                                           key_scale=1.0)
    kw = dict(num_steps=5, step_size=0.8, optimizer="nesterov", momentum=0.6, mask=mask)
    got = run("triton", q, k, b, dout, **kw)
    ref = run("reference", q, k, b, dout, **kw)
    truth = run("reference", q64, k64, b64, dout64, **kw)
    for name, g, r, t in zip(["out", "dq", "dk", "dkey_bias"], got, ref, truth):
        assert torch.isfinite(g).all(), name
        err_k = (g.to(f64) - t).abs().median().item()
        err_r = (r.to(f64) - t).abs().median().item()
        assert err_k <= 2.0 * err_r + torch.finfo(dtype).eps * t.abs().median().item(), (
            f"{name}: median error {err_k:.3g} vs reference {err_r:.3g}")


@pytest.mark.parametrize("optimizer", ["gd", "nesterov"])
def test_backward_repeats_bitwise_with_grouped_heads(optimizer, key_path):
    """Grouped heads (G = 2) add into one key head's gradient, summed in one program per key
    tile (no atomics): bit for bit the same each run, and right."""
    compare(torch.float32, H=4, Hk=2, mask_kind="causal+padding", optimizer=optimizer)
    (q, k, b, dout), _ = make_inputs(2, 4, 2, 63, 111, 32, torch.bfloat16)
    kw = dict(num_steps=2, step_size=0.8, optimizer=optimizer, momentum=OPTS[optimizer])
    first = run("triton", q, k, b, dout, **kw)
    again = run("triton", q, k, b, dout, **kw)
    for x, y in zip(first, again):
        assert torch.equal(x, y)


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "causal+padding"])
def test_key_kernel_split_into_query_parts(parts, mask_kind, monkeypatch):
    """The dK kernel's query parts (few keys, many queries) sum to the right gradients, with
    the unmasked, diagonal and padded query tiles dealt out round-robin, grouped heads and
    every tile of a part; and the sum repeats bit for bit."""
    monkeypatch.setattr(kmod, "DK_PARTS", parts)
    compare(torch.float32, H=4, Hk=2, N=150, M=70, mask_kind=mask_kind, optimizer="nesterov")
    (q, k, b, dout), _ = make_inputs(2, 4, 2, 150, 70, 32, torch.bfloat16)
    kw = dict(num_steps=2, step_size=0.8, optimizer="momentum", momentum=0.6)
    first = run("triton", q, k, b, dout, **kw)
    again = run("triton", q, k, b, dout, **kw)
    for x, y in zip(first, again):
        assert torch.equal(x, y)


@pytest.mark.parametrize("optimizer,energies,keep_y", [
    ("gd", False, True), ("nesterov", False, True), ("momentum", True, True),
    ("nesterov", True, False)])
def test_key_kernel_reads_the_query_kernels_read_out_points(optimizer, energies, keep_y):
    """The query kernel writes ŷ_t (and round(ξ_T) with energies) for the key kernel, except
    under Nesterov with energies, whose key kernel also needs ξ_t and replays the iterates."""
    T, B, H, N, D = 3, 1, 2, 40, 16
    q = torch.empty(B, H, N, D, device="meta", dtype=torch.bfloat16)
    k = torch.empty(B, 1, 70, D, device="meta", dtype=torch.bfloat16)
    f32 = dict(device="meta", dtype=torch.float32)
    mu, lse = torch.empty(T, B * H, N, D, **f32), torch.empty(T, B * H, N, **f32)
    denergy = torch.empty(B, H, N, T + 1, **f32) if energies else None
    energy_lse = torch.empty(T + 1, B * H, N, **f32)
    (dq_launch, dk_launch), _ = kmod.plan_backward(
        torch.empty_like(q), denergy, q, k, None, None, mu, lse, energy_lse, 0.25, 0.8, 0.6, T,
        False, optimizer)
    assert dq_launch.meta["KEEP_Y"] is keep_y and dk_launch.meta["KEEP_Y"] is keep_y
    y = dq_launch.args["Y"]
    assert y is dk_launch.args["Y"] and y.dtype == q.dtype
    assert y.shape == ((T + energies, B * H, N, D) if keep_y else (0, B * H, N, D))


def test_key_kernel_parts_fill_the_gpu(monkeypatch):
    """Parts aim at DK_PROGRAMS_PER_SM programs per SM when few key tiles would run, keep at
    least 128 queries each, and stay 1 off CUDA and whenever the key tiles fill the GPU."""

    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    cuda = torch.device("cuda")
    target = kmod.DK_PROGRAMS_PER_SM * 132
    # The short-memory path: 64 heads of 64 keys (one key tile each).
    assert kmod.dk_parts(64, 64, 8192, cuda) == -(-target // 64)
    assert kmod.dk_parts(64, 256, 8192, cuda) == -(-target // 128)
    assert kmod.dk_parts(64, 64, 300, cuda) == 3  # at least 128 queries per part
    assert kmod.dk_parts(128, 8192, 8192, cuda) == 1  # 8192 key tiles already
    assert kmod.dk_parts(64, 64, 8192, torch.device("cpu")) == 1
    monkeypatch.setattr(kmod, "DK_PARTS", 5)
    assert kmod.dk_parts(64, 64, 8192, torch.device("cpu")) == 5


def test_energy_gradients_grouped_heads():
    mask, _ = make_mask("padding", 2, 47)
    (q, k, b, _), (q64, k64, b64, _) = make_inputs(2, 4, 2, 47, 47, 16, torch.float32)
    de = torch.randn(2, 4, 47, 3, dtype=f64, device=DEVICE)
    kw = dict(num_steps=2, step_size=0.7, optimizer="nesterov", momentum=0.6, mask=mask,
              return_energies=True)

    got, ref, truth = (run_energies(backend, *t, de, **kw) for backend, t in (
        ("triton", (q, k, b)), ("reference", (q, k, b)), ("reference", (q64, k64, b64))))
    for name, g, r, t in zip(["energies", "dq", "dk", "dkey_bias"], got, ref, truth):
        assert_close_to_truth(name, g, r, t, torch.float32)


def test_odd_head_dim_and_no_bias():
    compare(torch.float32, D=24, bias=False, optimizer="momentum", scale=0.3, step_size=1.3)


@pytest.mark.parametrize("optimizer", list(OPTS))
@pytest.mark.parametrize("num_steps", [0, 3])
def test_energies_and_their_gradients(optimizer, num_steps, key_path):
    """Energies of every iterate, and gradients of a loss on both ``ξ_T`` and the energies."""
    mask, causal = make_mask("causal+padding", 2, 47)
    (q, k, b, dout), (q64, k64, b64, dout64) = make_inputs(2, 2, 1, 47, 47, 16, torch.float32)
    de = torch.randn(2, 2, 47, num_steps + 1, dtype=f64, device=DEVICE)
    kw = dict(num_steps=num_steps, step_size=0.7, optimizer=optimizer, momentum=OPTS[optimizer],
              mask=mask, is_causal=causal, return_energies=True)

    def run_e(backend, q, k, b, dout):
        leaves = [t.detach().requires_grad_(True) for t in (q, k, b)]
        out, e = hopfield_descent(*leaves[:2], key_bias=leaves[2], backend=backend, **kw)
        grads = torch.autograd.grad((out, e), leaves, (dout, de.to(e.dtype)))
        return [out, e, *grads]

    got = run_e("triton", q, k, b, dout)
    ref = run_e("reference", q, k, b, dout)
    truth = run_e("reference", q64, k64, b64, dout64)
    assert got[1].shape == (2, 2, 47, num_steps + 1) and got[1].dtype == torch.float32
    for name, g, r, t in zip(["out", "energies", "dq", "dk", "dkey_bias"], got, ref, truth):
        assert_close_to_truth(name, g, r, t, torch.float32)
    # Without autograd the energies are the same numbers.
    with torch.no_grad():
        _, e_nograd = hopfield_descent(q, k, key_bias=b, backend="triton", **kw)
    torch.testing.assert_close(e_nograd, got[1].detach(), atol=0, rtol=0)


@pytest.mark.parametrize("optimizer", ["gd", "nesterov"])
def test_energy_gradients_half_precision(optimizer):
    (q, k, b, _), (q64, k64, b64, _) = make_inputs(1, 2, 2, 40, 70, 32, torch.float16)
    de = torch.randn(1, 2, 40, 3, dtype=f64, device=DEVICE)
    kw = dict(num_steps=2, step_size=0.8, optimizer=optimizer, momentum=OPTS[optimizer],
              return_energies=True)

    got, ref, truth = (run_energies(backend, *t, de, **kw) for backend, t in (
        ("triton", (q, k, b)), ("reference", (q, k, b)), ("reference", (q64, k64, b64))))
    for name, g, r, t in zip(["energies", "dq", "dk", "dkey_bias"], got, ref, truth):
        assert_close_to_truth(name, g, r, t, torch.float16)


def test_one_unit_step_is_softmax_attention():
    q = torch.randn(1, 2, 40, 64, device=DEVICE)
    k = torch.randn(1, 2, 50, 64, device=DEVICE)
    out = hopfield_descent(q, k, step_size=1.0, num_steps=1, backend="triton")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, k), atol=1e-6, rtol=0)


def test_fully_masked_rows_stay_finite_with_zero_readout():
    """docs/math.md §1.3: a row that sees nothing has μ = 0; GD shrinks it by (1 − η) per step."""
    q = torch.randn(1, 1, 20, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 1, 20, 16, device=DEVICE, requires_grad=True)
    mask = torch.zeros(1, 1, 1, 20, dtype=torch.bool, device=DEVICE)
    out, e = hopfield_descent(q.detach(), k.detach(), num_steps=2, step_size=0.5, mask=mask,
                              backend="triton", return_energies=True)
    torch.testing.assert_close(out, 0.25 * q.detach())
    torch.testing.assert_close(e[..., 0], 0.5 * q.detach().pow(2).sum(-1))
    out = hopfield_descent(q, k, num_steps=2, step_size=0.5, mask=mask, backend="triton")
    dq, dk = torch.autograd.grad(out.sum(), (q, k))
    torch.testing.assert_close(dq, torch.full_like(q, 0.25))
    assert (dk == 0).all()


def test_noncontiguous_inputs():
    q = torch.randn(2, 30, 2, 32, device=DEVICE).transpose(1, 2)  # [B, H, N, D] view
    k = torch.randn(2, 45, 1, 32, device=DEVICE).transpose(1, 2)
    kw = dict(num_steps=2, step_size=0.9)
    torch.testing.assert_close(hopfield_descent(q, k, backend="triton", **kw),
                               hopfield_descent(q, k, backend="reference", **kw))


def test_custom_op_passes_opcheck():
    """Schema, fake (meta) implementation and autograd registration of the library op."""
    q = torch.randn(1, 2, 20, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 1, 33, 16, device=DEVICE, requires_grad=True)
    b = torch.randn(1, 1, 33, device=DEVICE, requires_grad=True)
    pad = torch.ones(1, 33, dtype=torch.bool, device=DEVICE)
    args = (q, k, b, pad, 0.25, 0.8, 0.5, 2, False, "nesterov", False, True)
    torch.library.opcheck(kmod._fwd_op, args, test_utils=("test_schema", "test_faketensor",
                                                           "test_autograd_registration"))


def test_torch_compile_traces_through_the_op():
    q = torch.randn(1, 2, 24, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 2, 30, 16, device=DEVICE, requires_grad=True)

    def f(q, k):
        return hopfield_descent(q, k, num_steps=2, step_size=0.7, optimizer="momentum",
                                momentum=0.5, backend="triton").square().sum()

    compiled = torch.compile(f, backend="inductor", fullgraph=True)  # no graph break at the op
    loss_c = compiled(q, k)
    gq_c, gk_c = torch.autograd.grad(loss_c, (q, k))
    loss = f(q, k)
    gq, gk = torch.autograd.grad(loss, (q, k))
    torch.testing.assert_close(loss_c, loss)
    torch.testing.assert_close(gq_c, gq)
    torch.testing.assert_close(gk_c, gk)


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(optimizer="newton_light"), "optimizer='newton_light'"),
        (dict(optimizer="newton_2nd1st"), "optimizer='newton_2nd1st'"),
        (dict(mask=torch.ones(1, 2, 8, 8, dtype=torch.bool)), "mask of shape"),
        (dict(dtype=f64), "float64"),
        (dict(D=8), "head dim D=8"),
        (dict(D=320), "head dim D=320"),
    ],
)
def test_forced_triton_names_the_unsupported_option(over, match):
    D = over.pop("D", 16)
    dtype = over.pop("dtype", torch.float32)
    q = torch.randn(1, 2, 8, D, dtype=dtype)
    k = torch.randn(1, 2, 8, D, dtype=dtype)
    if "mask" in over:
        over["mask"] = over["mask"].to(DEVICE)
    with pytest.raises(ValueError, match=match):
        hopfield_descent(q.to(DEVICE), k.to(DEVICE), backend="triton", **over)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 1, 8, 16)
    why = kmod.unsupported_reason(q, q, mask=None, is_causal=False, key_bias=None,
                                  optimizer="gd", num_steps=1)
    assert "TRITON_INTERPRET" in why
    with pytest.raises(ValueError, match="cpu"):
        hopfield_descent(q, q, backend="triton")
    # auto falls back to the reference on CPU tensors
    torch.testing.assert_close(hopfield_descent(q, q), hopfield_descent(q, q, backend="reference"))


def test_launches_run_on_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device, which need not be the tensors' (a layer on
    cuda:1): every forward and backward launch runs inside ``torch.cuda.device(q.device)``."""
    from types import SimpleNamespace

    guard = kmod._on_device(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    inside, ran = [], []

    class Guard:
        def __enter__(self):
            inside.append(True)

        def __exit__(self, *exc):
            inside.pop()

    def on_device(t):
        assert t.device == q.device
        return Guard()

    run = kmod.Launch._run
    monkeypatch.setattr(kmod, "_on_device", on_device)
    monkeypatch.setattr(kmod.Launch, "_run",
                        lambda self: (ran.append(bool(inside)), run(self))[1])
    q = torch.randn(1, 2, 40, 16, device=DEVICE, requires_grad=True)
    hopfield_descent(q, q.detach(), num_steps=2, backend="triton").sum().backward()
    assert ran == [True, True, True]  # forward, query kernel, key kernel


def test_supported_key_padding_shapes():
    q = torch.randn(2, 2, 8, 16, device=DEVICE)
    for shape in [(2, 1, 1, 8), (1, 1, 1, 8), (8,), (1, 8), (2, 1, 1, 1)]:
        mask = torch.rand(shape, device=DEVICE) > 0.3
        assert kmod.unsupported_reason(q, q, mask=mask, is_causal=False, key_bias=None,
                                       optimizer="gd", num_steps=1) is None, shape
        torch.testing.assert_close(hopfield_descent(q, q, mask=mask, backend="triton"),
                                   hopfield_descent(q, q, mask=mask, backend="reference"))


@pytest.mark.slow
def test_saved_for_backward_is_O_T_N_D_plus_1():
    """docs/math.md §7.2: besides its inputs the op saves T·B·H·N·(D+1) float32 numbers, no N×M."""
    B, H, N, M, D, T = 1, 2, 40, 70, 16, 3
    q = torch.randn(B, H, N, D, device=DEVICE, requires_grad=True)
    k = torch.randn(B, 1, M, D, device=DEVICE, requires_grad=True)
    saved = []

    def pack(t):
        if not any(t is x for x in (q, k)):
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hopfield_descent(q, k, num_steps=T, optimizer="nesterov", momentum=0.5, backend="triton")
    assert sum(saved) == T * B * H * N * (D + 1) * 4


@pytest.mark.slow
def test_benchmark_script_smoke_run(tmp_path):
    """``benchmarks/kernels.py --smoke`` runs end to end and writes its JSON and table."""
    path = Path(__file__).parents[2] / "benchmarks" / "kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--smoke", "--reps", "1", "--out", str(tmp_path)])
    (js,) = tmp_path.glob("kernels-*.json")
    rows = json.loads(js.read_text())["rows"]
    assert {r["provider"] for r in rows} == {"triton", "reference", "autograd"}
    assert all(r["ms"] > 0 for r in rows if r["provider"] == "triton")
    # the target table's providers (flash×T: T chained SDPA calls; auto) and its table
    bench.main(["--smoke", "--target", "--reps", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "kernels-smoke-cpu-target.json").read_text())
    assert {r["provider"] for r in data["rows"]} == {"triton", "reference", "flash", "auto"}
    assert all(r["ms"] > 0 for r in data["rows"])
    # auto runs what its rule picks (on CPU tensors the reference), and the table says so
    for r in data["rows"]:
        if r["provider"] == "auto":
            M, D = r["M"], r["D"]
            short = kmod.takes_short_path(M, D, getattr(torch, r["dtype"]))
            want = DEVICE == "cuda" and hop.auto_picks_triton(
                "cuda", M, short, r["mode"] == "fwd+bwd", r["causal"], D,
                getattr(torch, r["dtype"]))
            assert r["auto_picked"] == ("triton" if want else "reference"), r
    # the same target cases at other head dims (to widen auto), each case once
    base_cases, wide = bench.target_grid(), bench.target_grid([32, 96, 256])
    assert {c[0] for c in wide} == {32, 96, 256} and len(set(wide)) == len(wide)
    assert {c[1:] for c in wide} == {c[1:] for c in base_cases}
    md = (tmp_path / "kernels-smoke-cpu-target.md").read_text()
    assert "flash×T ms" in md and "auto ÷ best" in md
    assert ("(triton)" if DEVICE == "cuda" else "(reference)") in md
    # the tile sweep times every candidate and names a winner per class
    winners = bench.main(["--smoke", "--tiles", "--reps", "1", "--out", str(tmp_path)])
    assert {w["kernel"] for w in winners} == set(bench_kernels(kmod))
    assert (tmp_path / "kernel-tiles-smoke-cpu.json").exists()


@pytest.mark.slow
def test_breakdown_script_smoke_run(tmp_path):
    """``benchmarks/kernel_breakdown.py --smoke`` times each launch under every variant and
    leaves the kernel module's knobs as it found them."""
    path = Path(__file__).parents[2] / "benchmarks" / "kernel_breakdown.py"
    spec = importlib.util.spec_from_file_location("bench_breakdown", path)
    bd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bd)
    names = ("SHORT_MAX_KEYS", "DQ_SHORT_MIN_HEAD_DIM", "DK_PARTS", "FUSED_BACKWARD")
    knobs = [getattr(kmod, name) for name in names]
    rows = bd.main(["--smoke", "--out", str(tmp_path)])
    assert [getattr(kmod, name) for name in names] == knobs
    assert {r["variant"] for r in rows} == {"default", "dq-short", "parts=2", "streaming",
                                            "fused-red", "fused-tma"}
    for r in rows:  # the fused backward is one launch: its time is in the dq column
        fused = r["variant"].startswith("fused-")
        assert r["fused"] == (1 if fused else 0)  # no TMA under the interpreter
        assert r["fwd_ms"] > 0 and r["dq_ms"] > 0 and (r["dk_ms"] == 0) is fused
    assert {r["dk_parts"] for r in rows if r["variant"] == "parts=2"} == {2}
    paths = {r["variant"]: (r["paths"]["fwd"], r["paths"]["dq"]) for r in rows if r["M"] == 40}
    assert paths == {"default": ("short", "stream"), "dq-short": ("short", "short"),
                     "parts=2": ("short", "stream"), "streaming": ("stream", "stream"),
                     "fused-red": ("short", "stream")}
    data = json.loads((tmp_path / "kernel-breakdown-smoke-cpu.json").read_text())
    assert len(data["rows"]) == len(rows)


@pytest.mark.slow
def test_accuracy_script_smoke_run(tmp_path):
    """``benchmarks/kernel_accuracy.py --smoke`` compares both backends with float64 and finds
    the backward bitwise repeatable."""
    path = Path(__file__).parents[2] / "benchmarks" / "kernel_accuracy.py"
    spec = importlib.util.spec_from_file_location("bench_accuracy", path)
    acc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(acc)
    meta = acc.main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "kernel-accuracy-smoke-cpu.json").exists()
    assert {r["tensor"] for r in meta["accuracy"]} == {"out", "dq", "dk", "dkey_bias"}
    assert all(r["finite"] and r["triton"] < 1e-5 for r in meta["accuracy"])  # float32
    assert meta["determinism"]["bitwise_repeatable"]
    assert meta["determinism"]["max_run_spread"] == 0
    # the one-kernel backward: as accurate, its file tagged, the module knob restored
    fused = acc.main(["--smoke", "--fused", "red", "--out", str(tmp_path)])
    assert (tmp_path / "kernel-accuracy-smoke-cpu-fused-red.json").exists()
    assert fused["fused_backward"] == "red" and kmod.FUSED_BACKWARD is None
    assert all(r["finite"] and r["triton"] < 1e-5 for r in fused["accuracy"])


def bench_kernels(kmod):
    return {key[0] for key in kmod._SPACE}


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 2), Hk=st.integers(1, 2), G=st.integers(1, 2), N=st.integers(1, 70),
    M=st.integers(1, 70), D=st.sampled_from([16, 20, 32]), T=st.integers(0, 3),
    mask_kind=st.sampled_from(MASKS), optimizer=st.sampled_from(list(OPTS)),
    bias=st.booleans(), short=st.booleans(), parts=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
# Found by CI: the only unmasked row sees one key, so d key_bias cancels to exactly 0.
@example(B=1, Hk=1, G=1, N=1, M=3, D=16, T=1, mask_kind="causal+padding", optimizer="gd",
         bias=True, short=False, parts=1, seed=0)
def test_fuzz_kernel_matches_reference(B, Hk, G, N, M, D, T, mask_kind, optimizer, bias, short,
                                      parts, seed):
    torch.manual_seed(seed)  # the example's data is a function of the example
    knobs = dict(key_path_knobs(short), DK_PARTS=parts)
    saved = {name: getattr(kmod, name) for name in knobs}
    for name, value in knobs.items():
        setattr(kmod, name, value)
    try:
        compare(torch.float32, B=B, H=Hk * G, Hk=Hk, N=N, M=M, D=D, mask_kind=mask_kind,
                optimizer=optimizer, num_steps=T, bias=bias)
    finally:
        for name, value in saved.items():
            setattr(kmod, name, value)
