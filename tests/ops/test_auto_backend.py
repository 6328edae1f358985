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
    "device,M,short,with_grad,causal,want",
    [
        ("cuda", 64, True, True, False, True),  # measured: 17x forward, 2.0x forward+backward
        ("cuda", 256, True, True, False, True),  # measured: 2.4x forward, 1.4x forward+backward
        ("cuda", 257, True, True, False, False),  # beyond the measured region
        ("cuda", 2048, False, False, False, True),  # measured: forward 1.43-1.49x at M = 2048
        ("cuda", 2048, False, True, False, False),  # forward+backward: 0.96-1.01x
        ("cuda", 2048, False, True, True, True),  # causal forward+backward: 1.07x
        ("cuda", 8192, False, False, False, False),  # forward 0.94-0.95x at M = 8192
        ("cuda", 8192, False, True, True, False),
        ("cpu", 64, True, False, False, False),  # the interpreter is for tests, never picked
    ],
)
def test_auto_rule(device, M, short, with_grad, causal, want):
    assert hop.auto_picks_triton(device, M, short, with_grad, causal) is want


def test_rule_cites_measurements_in_the_repository():
    assert all("c0f48b6" in w.note for w in hop.AUTO_TRITON_WINS)
    table = (ROOT / "benchmarks" / "results" / "h200-c0f48b6" / "kernels-nvidia-h200-target.md")
    text = table.read_text()
    for row in ("| 64 | 8192 | 256 | 8 | 64 | no | fwd+bwd |",
                "| 128 | 2048 | 2048 | 4 | 128 | yes | fwd+bwd |"):
        assert row in text
    assert "benchmarks/results/h200-c0f48b6/" in Path(hop.__file__).read_text()


def test_widening_the_rule_is_one_row(monkeypatch):
    wide = hop.TritonWin(short_path=False, max_keys=1 << 30, with_grad=True, causal_only=False,
                         note="hypothetical")
    monkeypatch.setattr(hop, "AUTO_TRITON_WINS", (*hop.AUTO_TRITON_WINS, wide))
    assert hop.auto_picks_triton("cuda", 8192, False, True, False)


def test_short_path_descriptor():
    kmod = pytest.importorskip("energy_attn.kernels.hopfield_descent")
    assert kmod.takes_short_path(256, 64, torch.bfloat16)  # 256 x 64 x 2 B = 32 KiB
    assert not kmod.takes_short_path(257, 64, torch.bfloat16)
    assert kmod.takes_short_path(128, 128, torch.bfloat16)
    assert not kmod.takes_short_path(256, 128, torch.bfloat16)


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
        (512, None, "gd", True, False, "reference"),  # streaming, training: not faster
        (512, None, "gd", True, True, "triton"),  # streaming, causal training: faster
        (4096, None, "gd", False, False, "reference"),  # beyond the measured inference region
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
