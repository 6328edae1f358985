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
    "device,M,short,with_grad,want",
    [
        ("cuda", 64, True, True, True),  # measured: 17x forward, 2.3x forward+backward
        ("cuda", 256, True, True, True),  # measured: 2.4x forward, 1.17x forward+backward
        ("cuda", 257, True, True, False),  # beyond the measured region
        ("cuda", 2048, False, False, True),  # measured: forward 1.41-1.48x at M = 2048
        ("cuda", 2048, False, True, False),  # forward+backward: measured 0.72-0.98x
        ("cuda", 8192, False, False, False),  # forward 0.92-0.94x at M = 8192
        ("cpu", 64, True, False, False),  # the interpreter is for tests, never picked
    ],
)
def test_auto_rule(device, M, short, with_grad, want):
    assert hop.auto_picks_triton(device, M, short, with_grad) is want


def test_rule_cites_measurements_in_the_repository():
    short, inference = hop.AUTO_TRITON_WINS
    assert short.short_path and short.max_keys == 256 and short.with_grad
    assert "7b1daef" in short.note
    assert not inference.short_path and not inference.with_grad and "f7d6df6" in inference.note
    text = (ROOT / "benchmarks" / "results" / "gpu-H200-2026-11-29.md").read_text()
    assert "NVIDIA H200" in text and "7b1daef" in text
    target = (ROOT / "benchmarks" / "results" / "h200-f7d6df6" / "kernels-nvidia-h200-target.md")
    assert "| 128 | 2048 | 2048 | 4 | 128 | fwd |" in target.read_text()
    source = Path(hop.__file__).read_text()
    assert "benchmarks/results/gpu-H200-2026-11-29.md" in source
    assert "benchmarks/results/h200-f7d6df6/" in source


def test_widening_the_rule_is_one_row(monkeypatch):
    wide = hop.TritonWin(short_path=False, max_keys=1 << 30, with_grad=True, note="hypothetical")
    monkeypatch.setattr(hop, "AUTO_TRITON_WINS", (*hop.AUTO_TRITON_WINS, wide))
    assert hop.auto_picks_triton("cuda", 8192, False, True)


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
    "M,mask_kind,optimizer,grad,want",
    [
        (64, None, "gd", True, "triton"),  # short path, inside the measured region
        (64, "padding", "nesterov", True, "triton"),
        (64, "dense_float", "gd", False, "reference"),  # no kernel form: falls back
        (64, None, "newton_light", False, "reference"),  # not a kernel optimizer
        (512, None, "gd", False, "triton"),  # streaming, inference: measured faster
        (512, None, "gd", True, "reference"),  # streaming, training: measured slower
        (4096, None, "gd", False, "reference"),  # beyond the measured inference region
    ],
)
def test_auto_dispatch_on_a_cuda_device(monkeypatch, M, mask_kind, optimizer, grad, want):
    """The whole ``auto`` decision as it runs for CUDA tensors (device type passed explicitly;
    the kernel's support check runs through the interpreter on CPU tensors)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("energy_attn.kernels.hopfield_descent")
    from energy_attn import masks

    q = torch.randn(2, 2, 8, 64, dtype=torch.bfloat16, requires_grad=grad)
    k = torch.randn(2, 2, M, 64, dtype=torch.bfloat16)
    m = masks.Masks()
    if mask_kind == "padding":
        m = masks.from_blocked(torch.zeros(2, 1, 1, M, dtype=torch.bool))
    elif mask_kind == "dense_float":
        m = masks.from_additive(torch.randn(2, 2, 8, M))
    assert hop._auto_backend(q, k, m, None, False, optimizer, 2, "cuda") == want
    assert hop._auto_backend(q, k, m, None, False, optimizer, 2, "cpu") == "reference"
    if grad:  # under no_grad nothing is recorded: the inference rows apply
        with torch.no_grad():
            assert hop._auto_backend(q, k, m, None, False, optimizer, 2, "cuda") == "triton"
