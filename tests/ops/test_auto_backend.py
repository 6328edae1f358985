"""``backend="auto"``: the fused kernel only where it was measured faster than the reference.

The rule is a pure function of (device type, key count, key path), so it is tested here on CPU
with descriptors; the measurement it cites lives in the repository.
"""

from pathlib import Path

import pytest
import torch

from energy_attn.ops import hopfield as hop

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "device,M,short,with_grad,causal,D,want",
    [
        ("cuda", 64, True, True, False, 64, True),  # measured: forward+backward 3.6x
        ("cuda", 256, False, True, False, 64, True),  # streaming, T=8: forward+backward 2.46x
        ("cuda", 2048, False, True, False, 128, True),  # forward+backward 1.04x (D=64: 1.12x)
        ("cuda", 2048, False, True, True, 128, True),  # causal forward+backward 1.37x
        ("cuda", 4096, False, True, False, 64, False),  # forward+backward beyond 2048: slower
        ("cuda", 8192, False, False, False, 64, True),  # forward 1.01-1.06x at D=64
        ("cuda", 8192, False, False, False, 128, False),  # forward 0.95-0.97x at D=128
        ("cuda", 8192, False, True, True, 64, False),  # forward+backward 0.86x
        ("cuda", 16384, False, False, False, 64, False),  # beyond the measured region
        ("cpu", 64, True, False, False, 64, False),  # the interpreter is for tests, never picked
        ("cuda", 64, True, True, False, 128, False),  # short path at D=128: never timed
        ("cuda", 2048, False, True, False, 96, False),  # D=96 pads to 128-wide tiles: untimed
        ("cuda", 2048, False, False, False, 32, False),  # D=32: untimed
    ],
)
def test_auto_rule(device, M, short, with_grad, causal, D, want):
    assert hop.auto_picks_triton(device, M, short, with_grad, causal, D, torch.bfloat16) is want


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M,short,with_grad", [(64, True, True), (2048, False, True),
                                               (8192, False, False)])
def test_auto_rule_needs_a_measured_dtype(dtype, M, short, with_grad):
    """Only bfloat16 was timed: float16 and float32 (true float32 dots, not TF32) are not picked,
    not even where bfloat16 wins."""
    assert hop.auto_picks_triton("cuda", M, short, with_grad, False, 64, torch.bfloat16)
    assert not hop.auto_picks_triton("cuda", M, short, with_grad, False, 64, dtype)


def test_rule_cites_measurements_in_the_repository():
    assert all("ff95511" in w.note for w in hop.AUTO_TRITON_WINS)
    table = (ROOT / "benchmarks" / "results" / "h200-ff95511" / "kernels-nvidia-h200-target.md")
    text = table.read_text()
    for row in ("| 64 | 8192 | 256 | 8 | 64 | no | fwd+bwd |",
                "| 128 | 2048 | 2048 | 4 | 128 | yes | fwd+bwd |",
                "| 64 | 8192 | 8192 | 4 | 32 | no | fwd |"):
        assert row in text
    assert "benchmarks/results/h200-ff95511/" in Path(hop.__file__).read_text()


def test_widening_the_rule_is_one_row(monkeypatch):
    f16 = torch.float16
    assert not hop.auto_picks_triton("cuda", 8192, False, True, False, 128, f16)
    wide = hop.TritonWin(short_path=False, max_keys=1 << 30, with_grad=True, causal_only=False,
                         dtypes=(f16,), note="hypothetical")
    monkeypatch.setattr(hop, "AUTO_TRITON_WINS", (*hop.AUTO_TRITON_WINS, wide))
    assert hop.auto_picks_triton("cuda", 8192, False, True, False, 128, f16)


def test_short_path_descriptor():
    kmod = pytest.importorskip("energy_attn.kernels.hopfield_descent")
    bf16 = torch.bfloat16
    assert kmod.takes_short_path(64, 64, bf16) and kmod.takes_short_path(64, 128, bf16)
    assert not kmod.takes_short_path(65, 64, bf16)  # M=128 streamed faster (D=64)
    assert not kmod.takes_short_path(64, 256, bf16)  # 64 x 256 x 2 B = 32 KiB
    # the query kernel only from D = 128 on, the key kernel never
    assert kmod.takes_short_path(64, 128, bf16, "dq")
    assert not kmod.takes_short_path(64, 64, bf16, "dq")
    assert not kmod.takes_short_path(64, 128, bf16, "dk")
    assert kmod.short_path_keys(64, bf16) == 64 and kmod.short_path_keys(256, bf16) == 32


def test_auto_on_cpu_is_the_reference():
    q = torch.randn(1, 2, 8, 16)
    torch.testing.assert_close(hop.hopfield_descent(q, q, num_steps=2),
                               hop.hopfield_descent(q, q, num_steps=2, backend="reference"),
                               atol=0, rtol=0)


@pytest.mark.parametrize(
    "M,mask_kind,optimizer,grad,causal,want",
    [
        (64, None, "gd", True, False, "triton"),  # short path, inside the measured region
        (64, "padding", "nesterov", True, False, "triton"),
        (64, "dense_float", "gd", False, False, "reference"),  # no kernel form: falls back
        (64, None, "newton_light", False, False, "reference"),  # not a kernel optimizer
        (512, None, "gd", False, False, "triton"),  # streaming, inference: measured faster
        (512, None, "gd", True, False, "triton"),  # streaming, training: faster up to 2048
        (512, None, "gd", True, True, "triton"),  # streaming, causal training: faster
        (4096, None, "gd", True, False, "reference"),  # training beyond 2048 keys: slower
        (4096, None, "gd", False, False, "triton"),  # inference, D=64: faster up to 8192
    ],
)
def test_auto_dispatch_on_a_cuda_device(monkeypatch, M, mask_kind, optimizer, grad, causal,
                                        want):
    """The whole ``auto`` decision as it runs for CUDA tensors (device type passed explicitly;
    the kernel's support check runs through the interpreter on CPU tensors)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("energy_attn.kernels.hopfield_descent")
    from energy_attn import masks

    N = M if causal else 8
    q = torch.randn(2, 2, N, 64, dtype=torch.bfloat16, requires_grad=grad)
    k = torch.randn(2, 2, M, 64, dtype=torch.bfloat16)
    m = masks.Masks()
    if mask_kind == "padding":
        m = masks.from_blocked(torch.zeros(2, 1, 1, M, dtype=torch.bool))
    elif mask_kind == "dense_float":
        m = masks.from_additive(torch.randn(2, 2, N, M))
    assert hop._auto_backend(q, k, m, None, causal, optimizer, 2, "cuda") == want
    assert hop._auto_backend(q, k, m, None, causal, optimizer, 2, "cpu") == "reference"
    if grad and want == "reference":  # under no_grad nothing is recorded: inference rows apply
        with torch.no_grad():
            assert hop._auto_backend(q, k, m, None, causal, optimizer, 2, "cuda") == "triton"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_auto_dispatch_of_an_untimed_dtype_is_the_reference(monkeypatch, dtype):
    """The same call that runs the kernel in bfloat16 (streaming, inference, D=64) runs the
    reference in a dtype that was never timed."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("energy_attn.kernels.hopfield_descent")
    from energy_attn import masks

    for dt, want in ((torch.bfloat16, "triton"), (dtype, "reference")):
        q = torch.randn(2, 2, 8, 64, dtype=dt)
        k = torch.randn(2, 2, 512, 64, dtype=dt)
        assert hop._auto_backend(q, k, masks.Masks(), None, False, "gd", 2, "cuda") == want
