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

from energy_attn import (
    GPT,
    EnergyBasedAttention,
    EnergyTransformerAttention,
    GPTConfig,
    Hopfield,
    HopfieldLayer,
    HopfieldPooling,
    LinearAttention,
    OptimizerBlock,
    VanillaSoftmaxAttention,
    hopfield_descent,
)
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
    *case("EnergyMultiheadAttention(float causal mask)",
          lambda: EnergyMultiheadAttention(16, 2, batch_first=True, num_steps=3, step_size=0.5),
          lambda: ((x := torch.randn(2, 6, 16), x, x),
                   {"attn_mask": torch.zeros(6, 6).masked_fill(
                       ~torch.ones(6, 6, dtype=torch.bool).tril(), -1e9)})),
    *case("swap_attention(TransformerEncoder)",
          lambda: swap_attention(torch.nn.TransformerEncoder(
              torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
              enable_nested_tensor=False), num_steps=2),
          lambda: (_tokens()[0], {"src_key_padding_mask": ~_padding()})),
    *[c for variant in ("mha", "momen", "nag", "2nd1st", "light2nd1st") for c in case(
        f"OptimizerBlock({variant})",
        lambda variant=variant: OptimizerBlock(16, 2, variant),
        lambda: ((torch.randn(2, 6, 16), torch.randn(2, 6, 16)), {"is_causal": True}))],
    *case("OptimizerBlock(momen, energy attention)",
          lambda: OptimizerBlock(16, 2, "momen", attention="energy", num_steps=3, step_size=0.5),
          lambda: (_tokens()[0], {"is_causal": True})),
    *case("GPT(nag)",
          lambda: GPT(GPTConfig(n_layer=2, n_head=2, d_model=16, context=8, block="nag")),
          lambda: ((torch.randint(0, 256, (2, 8)),), {})),
    *case("LinearAttention(gated, causal)",
          lambda: LinearAttention(16, 2, gated=True),
          lambda: (_tokens()[0], {"is_causal": True})),
    *case("Hopfield(update_steps_max=3)",
          lambda: Hopfield(16, num_heads=2, update_steps_max=3),
          lambda: (_tokens()[0], {"stored_pattern_padding_mask": ~_padding()})),
    *case("HopfieldPooling",
          lambda: HopfieldPooling(16, quantity=2, num_heads=2, update_steps_max=2),
          lambda: (_tokens()[0], {"stored_pattern_padding_mask": ~_padding()})),
    *case("HopfieldLayer",
          lambda: HopfieldLayer(16, quantity=5, num_heads=2),
          lambda: (_tokens()[0], {})),
    *case("EnergyTransformerAttention",
          lambda: EnergyTransformerAttention(16, heads=2, dim_head=8, num_steps=3),
          lambda: (_tokens()[0], {"mask": _padding()})),
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
        # Some leaves may be unused by design (e.g. a block's momentum state when it has none).
        grads = torch.autograd.grad(out.square().sum(), leaves, allow_unused=True)
        return out, grads

    out_eager, grads_eager = run(fn)
    out_comp, grads_comp = run(compiled)
    eps = torch.finfo(out_eager.dtype).eps
    torch.testing.assert_close(out_comp, out_eager, atol=64 * eps, rtol=64 * eps)
    for g_c, g_e in zip(grads_comp, grads_eager):
        assert (g_c is None) == (g_e is None)
        if g_e is not None:
            torch.testing.assert_close(g_c, g_e, atol=256 * eps, rtol=256 * eps)
