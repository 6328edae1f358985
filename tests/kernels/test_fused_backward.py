"""The experimental one-kernel backward (``FUSED_BACKWARD``) against the reference.

The same comparisons as the two-kernel backward's (test_hopfield_descent_kernel.py): every
gradient, every mask kind, optimizer and dtype, grouped heads, energies and both key paths,
and every tile of its autotuning space. Under the interpreter it runs its relaxed-reduction
form (``"red"``; the interpreter has no TMA); on a CUDA GPU these tests run both forms, and
test_compile_check.py compiles the TMA form for sm_90 without one.
"""

import pytest
import test_hopfield_descent_kernel as base
import torch
from conftest import DEVICE, key_path_knobs
from energy_attn.kernels import hopfield_descent as kmod

from energy_attn import hopfield_descent


@pytest.fixture(params=["red", "tma"] if DEVICE == "cuda" else ["red"], autouse=True)
def fused(request, monkeypatch):
    monkeypatch.setattr(kmod, "FUSED_BACKWARD", request.param)
    return request.param


@pytest.mark.parametrize("optimizer", list(base.OPTS))
@pytest.mark.parametrize("mask_kind", base.MASKS)
def test_every_mask_and_optimizer_float32(mask_kind, optimizer, key_path):
    base.compare(torch.float32, mask_kind=mask_kind, optimizer=optimizer, H=4, Hk=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("optimizer", list(base.OPTS))
def test_half_precision(dtype, optimizer, key_path):
    base.compare(dtype, mask_kind="causal+padding", optimizer=optimizer, Hk=2)


@pytest.mark.parametrize("optimizer", list(base.OPTS))
@pytest.mark.parametrize("num_steps", [0, 3])
def test_energies_and_their_gradients(optimizer, num_steps, key_path):
    base.test_energies_and_their_gradients(optimizer, num_steps, key_path)


def test_energy_gradients_grouped_heads():
    base.test_energy_gradients_grouped_heads()


@pytest.mark.parametrize("optimizer", ["gd", "nesterov"])
def test_energy_gradients_half_precision(optimizer):
    base.test_energy_gradients_half_precision(optimizer)


def test_odd_head_dim_and_no_bias():
    base.test_odd_head_dim_and_no_bias()


def test_fully_masked_rows_stay_finite_with_zero_readout():
    base.test_fully_masked_rows_stay_finite_with_zero_readout()


PAIRS = sorted({c[:2] for key, space in kmod._SPACE.items() if key[0] == "dqk" for c in space}
               | {(16, 64), (64, 16)})


@pytest.mark.parametrize("bn,bm", PAIRS, ids=[f"{n}x{m}" for n, m in PAIRS])
def test_every_tile_of_its_space(bn, bm, monkeypatch):
    """Each ``(BLOCK_N, BLOCK_M)`` of the fused kernel's space (and the asymmetric 16×64 /
    64×16), at sizes that cross its tiles, causal + padding, key bias, grouped heads."""
    monkeypatch.setattr(kmod, "FORCE_TILES", {"fwd": (32, 32, 4, 1), "dqk": (bn, bm, 4, 1)})
    monkeypatch.setattr(kmod, "SHORT_MAX_KEYS", 0)
    n = 2 * max(bn, bm) + 3
    base.compare(torch.float32, B=2, H=4, Hk=2, N=n, M=n, D=16, mask_kind="causal+padding",
                 optimizer="nesterov", num_steps=2)
    for name, value in key_path_knobs(short=True).items():  # the short path: every key, once
        monkeypatch.setattr(kmod, name, value)
    base.compare(torch.float32, B=2, H=4, Hk=2, N=2 * bn + 3, M=45, D=16, mask_kind="padding",
                 optimizer="momentum", num_steps=2)


def test_rows_past_the_last_query_add_nothing():
    """A query tile's rows past N load no query; with a large key bias their logits would
    overflow ``exp2`` unless their log-sum-exp is +inf: the key gradient stays finite and
    right."""
    (q, k, b, dout), (q64, k64, b64, dout64) = base.make_inputs(1, 2, 1, 40, 50, 16,
                                                                 torch.float32)
    b, b64 = b + 150.0, b64 + 150.0  # exp2(150·log2 e) overflows float32
    kw = dict(num_steps=2, step_size=0.8)
    got = base.run("triton", q, k, b, dout, **kw)
    ref = base.run("reference", q, k, b, dout, **kw)
    truth = base.run("reference", q64, k64, b64, dout64, **kw)
    terms = dout64.abs().max().item() * k64.abs().max().item()
    for name, g, r, t in zip(["out", "dq", "dk", "dkey_bias"], got, ref, truth):
        base.assert_close_to_truth(name, g, r, t, torch.float32,
                                   scale=terms if name != "out" else 0.0)


def test_the_plan_is_one_launch_into_zeroed_key_gradients(fused):
    """One query-kernel launch (``FUSED`` set, no ``dμ_t``/``Δ_t``/``ŷ_t`` buffers), adding into
    zeroed float32 key gradients; TMA only where it can run (sm_90+ planning, D % 4 == 0)."""
    T, B, H, Hk, N, M = 3, 2, 4, 2, 40, 70
    f32 = dict(device="meta", dtype=torch.float32)
    for D, want in ((16, 2 if fused == "tma" else 1), (18, 1)):
        q = torch.empty(B, H, N, D, device="meta", dtype=torch.bfloat16)
        k = torch.empty(B, Hk, M, D, device="meta", dtype=torch.bfloat16)
        bias = torch.empty(B, Hk, M, **f32)
        mu, lse = torch.empty(T, B * H, N, D, **f32), torch.empty(T, B * H, N, **f32)
        launches, (dq, dk, dbias) = kmod.plan_backward(
            torch.empty_like(q), None, q, k, bias, None, mu, lse, torch.empty(0, **f32), 0.25,
            0.8, 0.6, T, False, "momentum")
        (launch,) = launches
        assert launch.kernel is kmod._bwd_dq_kernel and launch.meta["FUSED"] == want
        assert not launch.meta["KEEP_Y"]
        assert all(launch.args[name].numel() == 0 for name in ("DMU", "DELTA", "Y"))
        assert launch.args["DK"] is dk and dk.shape == (1, B, Hk, M, D)
        assert launch.args["DBIAS"] is dbias and dbias.shape == (1, B, Hk, M)
        assert dk.dtype == dbias.dtype == torch.float32


def test_cpu_tensors_reduce_and_a_bad_mode_is_named(monkeypatch):
    q = torch.empty(1, 1, 8, 16)
    assert kmod.fused_backward_mode(q) == 1  # the interpreter has no TMA: "tma" reduces too
    monkeypatch.setattr(kmod, "FUSED_BACKWARD", None)
    assert kmod.fused_backward_mode(q) == 0
    monkeypatch.setattr(kmod, "FUSED_BACKWARD", "atomic")
    with pytest.raises(ValueError, match="FUSED_BACKWARD"):
        kmod.fused_backward_mode(q)
    x = torch.randn(1, 1, 8, 16, requires_grad=True)
    with pytest.raises(ValueError, match="FUSED_BACKWARD"):
        hopfield_descent(x, x.detach(), backend="triton").sum().backward()


def test_deterministic_algorithms_keep_the_two_kernels(fused):
    q = torch.empty(1, 1, 8, 16)
    assert kmod.fused_backward_mode(q) == 1
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert kmod.fused_backward_mode(q) == 0
    finally:
        torch.use_deterministic_algorithms(before)
    assert kmod.fused_backward_mode(q) == 1


def test_tma_scratch_is_lent_for_the_launches_only():
    """The TMA form's descriptors need a Triton allocator: the backward lends one for its own
    launches and restores Triton's setting after; an allocator the caller set is kept."""
    from triton.runtime import _allocation

    before = _allocation._allocator.get()
    assert isinstance(before, _allocation.NullAllocator)  # nobody set one in this process
    with kmod._tma_scratch():
        assert _allocation._allocator.get() is kmod._scratch
    assert _allocation._allocator.get() is before

    def mine(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    token = _allocation._allocator.set(mine)
    try:
        with kmod._tma_scratch():
            assert _allocation._allocator.get() is mine
        assert _allocation._allocator.get() is mine
    finally:
        _allocation._allocator.reset(token)
