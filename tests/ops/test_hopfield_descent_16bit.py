"""16-bit descent steps are as accurate as 16-bit softmax attention (docs/math.md §4).

Every optimizer, in float16 and bfloat16, is compared with the same computation in float64 on
the same (16-bit-rounded) inputs. Its relative error must stay within a small factor of plain
softmax attention's error on those inputs in the same dtype (computed here, not hard-coded),
with keys sharing a large offset (|k| > 256: float16 overflows k⊙k; the one-pass variance
cancels) and garbage (300) in key positions that are masked out.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from energy_attn import hopfield_descent

OPTS = [("gd", 0.0), ("momentum", 0.5), ("nesterov", 0.5), ("newton_2nd1st", 0.0),
        ("newton_light", 0.0)]
HALF = [torch.float16, torch.bfloat16]
GARBAGE = 300.0
FACTOR = 4  # "a small factor": the measured worst ratio over 60 random cases is below 2


def rel_err(out, truth):
    return ((out.double() - truth).norm() / truth.norm()).item()


def inputs(dtype, B=2, H=2, N=8, M=16, D=16, offset=300.0, spread=1.0, padded=True):
    """16-bit queries and offset keys, a key-padding mask with garbage behind it."""
    q = torch.randn(B, H, N, D, dtype=torch.float64)
    sign = torch.randn(1, 1, 1, D, dtype=torch.float64).sign()
    k = spread * torch.randn(B, H, M, D, dtype=torch.float64) + offset * sign
    mask = None
    if padded:
        mask = torch.ones(B, 1, 1, M, dtype=torch.bool)
        mask[0, ..., M // 2:] = False
        mask[-1, ..., -3:] = False
        k = k.masked_fill(~mask.transpose(-1, -2), GARBAGE)
    return q.to(dtype), k.to(dtype), mask


def softmax_error(q, k, mask):
    """Plain softmax attention's relative error (values = keys) in q's dtype."""
    out = F.scaled_dot_product_attention(q, k, k, attn_mask=mask)
    truth = F.scaled_dot_product_attention(q.double(), k.double(), k.double(), attn_mask=mask)
    return rel_err(out, truth)


def check(q, k, mask, optimizer, rho, num_steps=3):
    kw = {"mask": mask, "num_steps": num_steps, "step_size": 0.5, "optimizer": optimizer,
          "momentum": rho, "backend": "reference"}
    out = hopfield_descent(q, k, **kw)
    assert torch.isfinite(out).all(), f"{optimizer} {q.dtype}: non-finite output"
    truth = hopfield_descent(q.double(), k.double(), **kw)
    err = rel_err(out, truth)
    # The unit roundoff floors any relative error of an output rounded to the dtype.
    bound = FACTOR * (softmax_error(q, k, mask) + torch.finfo(q.dtype).eps / 2)
    assert err <= bound, f"{optimizer} {q.dtype}: error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("optimizer, rho", OPTS)
@pytest.mark.parametrize("padded", [False, True])
def test_offset_keys_and_masked_garbage(dtype, optimizer, rho, padded):
    q, k, mask = inputs(dtype, padded=padded)
    check(q, k, mask, optimizer, rho)


@pytest.mark.parametrize("optimizer, rho", OPTS)
def test_float16_masked_keys_beyond_256_give_no_nan(optimizer, rho):
    # The case: keys holding 300 in masked padding positions made every query NaN.
    q, k, mask = inputs(torch.float16, offset=0.0)
    assert (k.abs() > 256).any()
    check(q, k, mask, optimizer, rho, num_steps=1)


@pytest.mark.parametrize("dtype", HALF)
def test_newton_light_matches_gd_accuracy_at_offset_100(dtype):
    # bf16, offset 100: newton_light's error was 0.19 where gd's was 0.012.
    q, k, _ = inputs(dtype, offset=100.0, padded=False)
    kw = {"num_steps": 2, "step_size": 0.5, "backend": "reference"}
    errs = {}
    for opt in ("gd", "newton_light"):
        out = hopfield_descent(q, k, optimizer=opt, **kw)
        errs[opt] = rel_err(out, hopfield_descent(q.double(), k.double(), optimizer=opt, **kw))
    assert errs["newton_light"] <= FACTOR * (errs["gd"] + torch.finfo(dtype).eps / 2), errs


@settings(max_examples=30, deadline=None)
@given(
    N=st.integers(1, 8), M=st.integers(1, 12), D=st.integers(1, 16),
    offset=st.floats(0.0, 300.0), spread=st.floats(0.1, 4.0), padded=st.booleans(),
    dtype=st.sampled_from(HALF), opt=st.sampled_from(OPTS), seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_16bit_error_within_a_factor_of_softmax(N, M, D, offset, spread, padded, dtype,
                                                     opt, seed):
    torch.manual_seed(seed)  # the example's data is a function of the example
    M = max(M, 4) if padded else M  # every batch keeps an unmasked key
    q, k, mask = inputs(dtype, B=2, H=2, N=N, M=M, D=D, offset=offset, spread=spread,
                        padded=padded)
    check(q, k, mask, *opt)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("optimizer, rho", OPTS)
def test_key_bias_stays_float32_in_the_reference_backend(dtype, optimizer, rho):
    """The elastic key bias −½β‖k‖² of keys near 20 per coordinate is about −650: rounded to
    bfloat16 (SDPA's mask dtype) it is off by 2 per logit, 15x the output's own rounding error."""
    from energy_attn.energies import elastic_key_bias

    g = torch.Generator().manual_seed(0)
    D = 16
    centre = torch.randn(D, generator=g, dtype=torch.float64).abs() * 20
    k = (centre + torch.randn(2, 2, 8, D, generator=g, dtype=torch.float64)).to(dtype)
    q = (centre + torch.randn(2, 2, 8, D, generator=g, dtype=torch.float64)).to(dtype)
    bias = elastic_key_bias(k, D**-0.5)
    assert bias.dtype == torch.float32 and bias.max() < -300
    kw = dict(key_bias=bias, num_steps=2, step_size=0.5, optimizer=optimizer, momentum=rho,
              backend="reference")
    out = hopfield_descent(q, k, **kw)
    kw["key_bias"] = bias.double()
    truth = hopfield_descent(q.double(), k.double(), **kw)
    floor = rel_err(truth.to(dtype), truth) + torch.finfo(dtype).eps / 2
    assert rel_err(out, truth) <= FACTOR * floor


@pytest.mark.parametrize("optimizer", ["newton_2nd1st", "newton_light"])
def test_newton_moments_stay_float32_under_autocast(optimizer):
    """Under torch.autocast an SDPA call runs in 16 bits whatever its inputs: newton_light's
    moment read-out ran in bfloat16, and its variance (a second moment minus a squared mean,
    keys in two clusters at ±30) was off by 10 where it is at most 2 (docs/math.md §4.4)."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 32, 8, generator=g)
    k[..., :16, :] += 30
    k[..., 16:, :] -= 30
    q = k[..., :8, :] + 0.3 * torch.randn(1, 2, 8, 8, generator=g)
    kw = dict(num_steps=1, step_size=1.0, scale=0.5, optimizer=optimizer, backend="reference")
    want = hopfield_descent(q, k, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hopfield_descent(q, k, **kw)
    torch.testing.assert_close(got, want)
