"""Every layer of the package compiles with torch.compile (CPU, inductor) and matches eager.

To cover a new layer add one ``case(...)`` to ``LAYERS``: a name, a factory returning the module
or function, and a factory returning its inputs (a tuple of tensors and a dict of keywords).
Every case is traced whole (``fullgraph=True``: no graph break) and checked forward and backward
with the ``aot_eager`` backend (Dynamo + AOTAutograd, no code generation: seconds); cases marked
``inductor=True`` also run through Inductor's generated C++ (about a minute each on 2 cores,
so only the layer that contains all the others' ops: EnergyMultiheadAttention runs the descent
and the SDPA read-out).
"""

from functools import partial

import pytest
import torch

from energy_attn import EnergyBasedAttention, VanillaSoftmaxAttention, hopfield_descent
from energy_attn.integrations import EnergyMultiheadAttention, swap_attention

pytestmark = pytest.mark.slow


def case(name, make, make_inputs, fullgraph=True, inductor=False):
    backends = ("aot_eager", "inductor") if inductor else ("aot_eager",)
    return [pytest.param(make, make_inputs, fullgraph, b, id=f"{name}-{b}") for b in backends]


def _tokens(b=2, n=6, d=16):
    return (torch.randn(b, n, d),), {}


def _padding(b=2, n=6):
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, -2:] = False  # True = may attend
    return mask


LAYERS = [
    *case("hopfield_descent",
          lambda: partial(hopfield_descent, num_steps=3, step_size=0.5, optimizer="nesterov",
                          momentum=0.5, is_causal=True),
          lambda: ((torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)), {})),
    *case("VanillaSoftmaxAttention",
          lambda: VanillaSoftmaxAttention(16, heads=2, dim_head=8),
          lambda: (_tokens()[0], {"mask": _padding()})),
    *case("EnergyBasedAttention",
          lambda: EnergyBasedAttention(16, heads=2, dim_head=8),
          lambda: (_tokens()[0], {"mask": _padding(), "num_steps": 3, "step_size": 0.5})),
    *case("EnergyMultiheadAttention",
          lambda: EnergyMultiheadAttention(16, 2, batch_first=True, num_steps=3, step_size=0.5),
          lambda: ((x := torch.randn(2, 6, 16), x, x), {"key_padding_mask": ~_padding()}),
          inductor=True),
    *case("swap_attention(TransformerEncoder)",
          lambda: swap_attention(torch.nn.TransformerEncoder(
              torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
              enable_nested_tensor=False), num_steps=2),
          lambda: (_tokens()[0], {"src_key_padding_mask": ~_padding()})),
]


@pytest.mark.parametrize("make,make_inputs,fullgraph,backend", LAYERS)
def test_compiled_matches_eager(make, make_inputs, fullgraph, backend):
    torch._dynamo.reset()
    fn = make()
    args, kwargs = make_inputs()
    args = tuple(a.requires_grad_() if a.is_floating_point() else a for a in args)
    compiled = torch.compile(fn, fullgraph=fullgraph, backend=backend)

    def run(f):
        out = f(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out  # nn.MultiheadAttention: (out, weights)
        params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
        leaves = [a for a in args if a.requires_grad] + params
        grads = torch.autograd.grad(out.square().sum(), leaves)
        return out, grads

    out_eager, grads_eager = run(fn)
    out_comp, grads_comp = run(compiled)
    eps = torch.finfo(out_eager.dtype).eps
    torch.testing.assert_close(out_comp, out_eager, atol=64 * eps, rtol=64 * eps)
    for g_c, g_e in zip(grads_comp, grads_eager):
        torch.testing.assert_close(g_c, g_e, atol=256 * eps, rtol=256 * eps)
