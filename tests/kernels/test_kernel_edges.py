"""The kernels at the edges a user hits, against the reference backend and a float64 truth.

What test_hopfield_descent_kernel.py and test_fused_backward.py already cover is not repeated
here; each test below names the edge it adds. Every test runs both backward forms: the two
kernels and the one-kernel backward (``FUSED_BACKWARD``; "red" under the interpreter).
"""

import pytest
import test_hopfield_descent_kernel as base
import torch
from conftest import DEVICE
from energy_attn.kernels import hopfield_descent as kmod

f64 = torch.float64


@pytest.fixture(params=[None, "red"], ids=["two-kernel", "fused"], autouse=True)
def backward_form(request, monkeypatch):
    monkeypatch.setattr(kmod, "FUSED_BACKWARD", request.param)
    return request.param


def compare_to_truth(dtype, q, k, b, dout, **kw):
    """Output and every gradient of the kernel within the helpers' dtype-derived bound of the
    float64 truth (``q, k, b, dout`` in float64)."""
    cast = [t.to(dtype) if t is not None else None for t in (q, k, b, dout)]
    got = base.run("triton", *cast, **kw)
    ref = base.run("reference", *cast, **kw)
    truth = base.run("reference", q, k, b, dout, **kw)
    for name, g, r, t in zip(["out", "dq", "dk", "dkey_bias"], got, ref, truth):
        base.assert_close_to_truth(name, g, r, t, dtype)
    return got


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("optimizer", ["gd", "nesterov"])
def test_half_precision_keys_and_queries_far_from_zero(dtype, optimizer):
    """Queries and keys around a common offset (20 per coordinate, unit spread): the logits'
    gradient ``dS ∝ dμ·k_j − Δ`` is a difference of two large, nearly equal numbers. ``Δ`` must
    be formed from the same input-dtype ``dμ`` as the dot ``dμ·k_j``, or dμ's rounding times
    the offset lands in every ``dS`` (bf16 ``dq`` was off by 25 where the reference's error
    is 7e-4)."""
    g = torch.Generator().manual_seed(0)
    B, H, N, M, D = 1, 2, 19, 37, 32
    q = (20.0 + torch.randn(B, H, N, D, generator=g, dtype=f64)).to(DEVICE)
    k = (20.0 + 0.5 * torch.randn(B, 1, M, D, generator=g, dtype=f64)).to(DEVICE)
    b = 0.5 * torch.randn(B, 1, M, generator=g, dtype=f64).to(DEVICE)
    dout = torch.randn(B, H, N, D, generator=g, dtype=f64).to(DEVICE)
    compare_to_truth(dtype, q, k, b, dout, num_steps=2, step_size=0.8, optimizer=optimizer,
                     momentum=base.OPTS[optimizer])


def test_key_bias_blocking_a_whole_head():
    """A key bias of −inf on every key of one key head (and on some keys of another), with
    grouped heads and key padding: that head's queries have an empty memory (μ = 0), its keys
    and bias get exactly zero gradient, and everything stays finite and matches the truth."""
    g = torch.Generator().manual_seed(1)
    B, H, Hk, N, M, D = 2, 4, 2, 19, 37, 16
    q = torch.randn(B, H, N, D, generator=g, dtype=f64).to(DEVICE)
    k = 0.5 * torch.randn(B, Hk, M, D, generator=g, dtype=f64).to(DEVICE)
    b = 0.5 * torch.randn(B, Hk, M, generator=g, dtype=f64).to(DEVICE)
    dout = torch.randn(B, H, N, D, generator=g, dtype=f64).to(DEVICE)
    b[0, 0] = float("-inf")  # query heads 0, 1 of batch 0 see nothing
    b[1, 1, 30:] = float("-inf")
    mask = torch.ones(B, 1, 1, M, dtype=torch.bool, device=DEVICE)
    mask[1, ..., :4] = False
    eta, T = 0.8, 2
    out, dq, dk, db = compare_to_truth(torch.float32, q, k, b, dout, num_steps=T,
                                       step_size=eta, optimizer="momentum", momentum=0.6,
                                       mask=mask)
    assert (dk[0, 0] == 0).all() and (db[0, 0] == 0).all()
    assert (dk[1, 1, 30:] == 0).all() and (db[1, 1, 30:] == 0).all()
    # μ = 0: v_1 = −η q, ξ_1 = (1 − η) q; v_2 = ρ v_1 − η ξ_1, ξ_2 = ξ_1 + v_2
    xi_1 = (1 - eta) * q[0, :2].float()
    torch.testing.assert_close(out[0, :2], xi_1 - 0.6 * eta * q[0, :2].float() - eta * xi_1)


def test_strided_expanded_inputs_and_an_odd_head_dim():
    """Views as users pass them: a batch-``expand``ed ``q`` (stride 0), transposed ``[B, M, Hk,
    D]`` keys, a strided key bias, a zero-stride (expanded) padding mask; head dim 40 (padded
    to 64 inside the kernel), grouped heads and causal + padding. Gradients land in the
    inputs' shapes."""
    g = torch.Generator().manual_seed(2)
    B, H, Hk, N, D = 2, 4, 2, 21, 40
    q = torch.randn(1, H, N, D, generator=g, dtype=f64).to(DEVICE).expand(B, H, N, D)
    k = 0.5 * torch.randn(B, N, Hk, D, generator=g, dtype=f64).to(DEVICE).transpose(1, 2)
    b = 0.5 * torch.randn(B, N, 2 * Hk, generator=g, dtype=f64).to(DEVICE)[..., ::2]
    b = b.transpose(1, 2)
    dout = torch.randn(B, H, N, D, generator=g, dtype=f64).to(DEVICE)
    mask = (torch.arange(N, device=DEVICE) % 5 != 1).expand(B, 1, 1, N)
    assert q.stride(0) == 0 and not k.is_contiguous() and not b.is_contiguous()
    assert mask.stride(0) == 0
    got = compare_to_truth(torch.float32, q, k, b, dout, num_steps=2, step_size=0.8,
                           optimizer="nesterov", momentum=0.6, mask=mask, is_causal=True)
    assert [t.shape for t in got[1:]] == [q.shape, k.shape, b.shape]


@pytest.mark.parametrize("optimizer", list(base.OPTS))
@pytest.mark.parametrize("num_steps,step_size", [(0, 0.8), (2, 0.0)])
def test_no_step_is_the_identity(optimizer, num_steps, step_size):
    """``num_steps=0`` or ``step_size=0``: ``ξ_T = q`` and ``∂L/∂q = dout`` bit for bit, and the
    keys and bias get exactly zero gradient (a fully masked batch element included)."""
    (q, k, b, dout), _ = base.make_inputs(2, 2, 1, 19, 21, 16, torch.float32)
    mask = torch.ones(2, 1, 1, 21, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    out, dq, dk, db = base.run("triton", q, k, b, dout, num_steps=num_steps,
                               step_size=step_size, optimizer=optimizer,
                               momentum=base.OPTS[optimizer], mask=mask)
    assert torch.equal(out, q) and torch.equal(dq, dout)
    assert (dk == 0).all() and (db == 0).all()


@pytest.mark.parametrize("value", [torch.finfo(torch.float16).min, float("nan")],
                         ids=["finfo.min", "nan"])
def test_key_bias_at_finfo_min_or_nan_blocks_its_key(value):
    """A 16-bit key bias at ``finfo.min`` (or NaN) blocks its key, as in any additive mask: the
    kernel read −65504 as a finite bias (output 0.5 off the reference) and NaN as NaN
    everywhere."""
    (q, k, b, dout), (q64, k64, b64, dout64) = base.make_inputs(1, 4, 2, 19, 21, 16,
                                                                torch.float16)
    b[0, 0], b[0, 1, 5:9] = value, value
    b64[0, 0], b64[0, 1, 5:9] = float("-inf"), float("-inf")
    kw = dict(num_steps=2, step_size=0.8, optimizer="nesterov", momentum=0.6)
    got = base.run("triton", q, k, b, dout, **kw)
    ref = base.run("reference", q, k, b, dout, **kw)
    truth = base.run("reference", q64, k64, b64, dout64, **kw)
    for name, g, r, t in zip(["out", "dq", "dk", "dkey_bias"], got, ref, truth):
        base.assert_close_to_truth(name, g, r, t.nan_to_num(), torch.float16)
    assert (got[3][0, 0] == 0).all() and (got[2][0, 0] == 0).all()
