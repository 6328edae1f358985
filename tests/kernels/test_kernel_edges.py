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

