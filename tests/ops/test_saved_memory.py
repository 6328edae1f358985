"""What the reference backend saves for backward (docs/math.md §7.2): O(N·d) per step, no N×M.

Counted with ``energy_attn._memory.saved_bytes`` (``per_storage=True``: one tensor saved by every
step, e.g. the keys or the mask, counts once), so the numbers are exact and device-independent.
The keys are many (M = 256) and narrow (D = 4), so one N×M tensor saved per step, even a
boolean one, would exceed the per-step bound.
"""

import pytest
import torch

from energy_attn import hopfield_descent
from energy_attn._memory import saved_bytes

B, H, N, M, D = 1, 4, 12, 256, 4
F32 = 4

OPTIMIZERS = [("gd", 0.0), ("momentum", 0.5), ("nesterov", 0.5), ("newton_light", 0.0)]
#: Numbers of width D saved per query and step: SDPA's query and output (2, for gd; newton_light
#: reads out 2D-wide values and forms its variance from them), plus the log-sum-exp and the
#: row-validity flag (the "+ 1" of (7.1), here 2 to hold both).
WIDTH = {"gd": 2, "momentum": 2, "nesterov": 2, "newton_light": 10}


def _mask(kind):
    g = torch.Generator().manual_seed(0)
    if kind == "none":
        return None, False
    if kind == "key padding":
        return torch.rand(B, 1, 1, M, generator=g) > 0.3, False
    if kind == "bool N×M":
        return torch.rand(B, H, N, M, generator=g) > 0.3, False
    if kind == "float N×M":
        return torch.randn(B, H, N, M, generator=g), False
    if kind == "causal":
        return None, True
    raise ValueError(kind)


def _saved(num_steps, optimizer, rho, kind, key_bias, Hk):
    torch.manual_seed(0)
    n = M if kind == "causal" else N  # is_causal needs N == M
    q = torch.randn(B, H, n, D, requires_grad=True)
    k = torch.randn(B, Hk, M, D, requires_grad=True)
    bias = torch.randn(B, Hk, M) if key_bias else None
    mask, causal = _mask(kind)
    _, nbytes = saved_bytes(
        lambda: hopfield_descent(q, k, num_steps=num_steps, optimizer=optimizer, momentum=rho,
                                 mask=mask, is_causal=causal, key_bias=bias,
                                 backend="reference"),
        per_storage=True)
    return nbytes, n


@pytest.mark.parametrize("Hk", [H, 1], ids=["mha", "gqa"])
@pytest.mark.parametrize("key_bias", [False, True], ids=["", "key_bias"])
@pytest.mark.parametrize("kind", ["none", "key padding", "bool N×M", "float N×M", "causal"])
@pytest.mark.parametrize("optimizer,rho", OPTIMIZERS)
def test_each_step_saves_O_N_D_and_no_N_by_M_matrix(optimizer, rho, kind, key_bias, Hk):
    one, n = _saved(1, optimizer, rho, kind, key_bias, Hk)
    three, _ = _saved(3, optimizer, rho, kind, key_bias, Hk)
    per_step = (three - one) / 2
    bound = B * H * n * (WIDTH[optimizer] * D + 2) * F32
    assert per_step <= bound, (per_step, bound)
    assert bound < B * H * n * M  # one boolean N×M per step would not fit


def test_a_boolean_mask_is_converted_once_per_call_not_once_per_step():
    """SDPA turns a boolean mask into a float one on every call and saves that copy: T float
    N×M masks. Converted once (masks.sdpa_mask), the T steps share one."""
    one, _ = _saved(1, "gd", 0.0, "bool N×M", False, H)
    four, _ = _saved(4, "gd", 0.0, "bool N×M", False, H)
    assert four - one < B * H * N * M * F32

