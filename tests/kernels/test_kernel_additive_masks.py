"""A per-key additive float mask runs on the kernel (folded into its per-key bias); a dense one
is refused by name (docs/zoo.md, "Masks")."""

import pytest
import torch
from energy_attn.kernels import hopfield_descent as kernels  # noqa: F401  (skips without Triton)

from energy_attn import hopfield_descent

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("value", [-1e4, -1e9, float("-inf"), torch.finfo(torch.float32).min])
def test_per_key_float_mask_on_the_kernel_equals_the_reference(value):
    torch.manual_seed(0)
    B, H, N, M, D = 2, 2, 5, 9, 16
    q = torch.randn(B, H, N, D, device=DEVICE)
    k = torch.randn(B, 1, M, D, device=DEVICE)
    key_bias = torch.randn(B, 1, M, device=DEVICE)
    mask = 0.3 * torch.randn(B, 1, 1, M, device=DEVICE)
    mask[0, ..., -3:] = value  # padded keys
    mask[1, ..., :N] = value  # batch 1: only keys N.. are visible

    def run(backend, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, key_bias)]
        out = hopfield_descent(leaves[0], leaves[1], key_bias=leaves[2], mask=mask.to(dtype),
                               num_steps=3, step_size=0.8, backend=backend)
        return (out, *torch.autograd.grad(out.square().sum(), leaves))

    outs = [run("triton", torch.float32), run("reference", torch.float32)]
    truth = run("reference", torch.float64)
    eps = torch.finfo(torch.float32).eps
    for got, ref, exact in zip(*outs, truth):
        # the kernel's error against float64 is of the reference's own float32 error
        err_ref = (ref.double() - exact).abs().max().item()
        bound = 2 * err_ref + 8 * eps * exact.abs().max().item()
        assert got.isfinite().all() and (got.double() - exact).abs().max().item() <= bound
    assert (outs[0][2][0, :, -3:] == 0).all()  # the kernel never reads a padded key


def test_auto_falls_back_and_triton_names_dense_float_masks():
    q, k = torch.randn(1, 2, 4, 16, device=DEVICE), torch.randn(1, 2, 4, 16, device=DEVICE)
    dense = torch.randn(1, 1, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="additive float mask"):
        hopfield_descent(q, k, mask=dense, backend="triton")
    torch.testing.assert_close(hopfield_descent(q, k, mask=dense),
                               hopfield_descent(q, k, mask=dense, backend="reference"))
