"""Bad input at the public boundary: a clear ValueError/TypeError naming the argument.

Each case was first reproduced failing silently (a negative step size raised the energy) or deep
inside PyTorch (ZeroDivisionError, torch.empty, einsum, F.linear, layer_norm).
"""

import functools

import pytest
import torch
from torch import nn

import energy_attn as ea
from energy_attn import (
    GPT,
    MHA,
    EnergyBasedAttention,
    EnergyMultiheadAttention,
    EnergyTransformerAttention,
    GPTConfig,
    Hopfield,
    HopfieldLayer,
    HopfieldPooling,
    LinearAttention,
    MultiHeadSelfAttention,
    VanillaSoftmaxAttention,
    hopfield_descent,
    hopfield_energy,
    minimize_energy,
)
from energy_attn.integrations import swap_attention
from energy_attn.layers.blocks import BLOCKS
from energy_attn.ops.hopfield import hopfield_fixed_point

NEG = -0.5


def q4():
    return torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)


def q3():
    return torch.randn(2, 3, 8), torch.randn(2, 5, 8)


def _hf_attention():
    from energy_attn.integrations.huggingface import make_attention_function

    return make_attention_function(step_size=NEG)


NEGATIVE_STEP = {
    "hopfield_descent": lambda: hopfield_descent(*q4(), step_size=NEG),
    "hopfield_descent_fixed_point": lambda: hopfield_descent(*q4(), step_size=NEG,
                                                             solver="fixed_point"),
    "hopfield_fixed_point": lambda: hopfield_fixed_point(*q4(), step_size=NEG),
    "minimize_energy": lambda: minimize_energy(hopfield_energy, *q3(), step_size=NEG),
    "EnergyBasedAttention.forward": lambda: EnergyBasedAttention(8)(q3()[0], step_size=NEG,
                                                                    num_steps=2),
    "MultiHeadSelfAttention": lambda: MultiHeadSelfAttention(8, 2, attention="energy",
                                                             num_steps=2, step_size=NEG),
    "blocks": lambda: MHA(8, 2, attention="energy", num_steps=2, step_size=NEG),
    "GPT": lambda: GPT(GPTConfig(n_layer=1, n_head=2, d_model=8, attention="energy",
                                 num_steps=2, step_size=NEG)),
    "EnergyMultiheadAttention": lambda: EnergyMultiheadAttention(8, 2, step_size=NEG),
    "swap_attention": lambda: swap_attention(nn.TransformerEncoderLayer(8, 2), step_size=NEG),
    "EnergyTransformerAttention": lambda: EnergyTransformerAttention(8, step_size=NEG),
    "EnergyTransformerAttention.forward": lambda: EnergyTransformerAttention(8)(
        q3()[0], step_size=NEG),
    "huggingface": _hf_attention,
}


@pytest.mark.parametrize("where", sorted(NEGATIVE_STEP))
def test_negative_step_size_is_rejected_everywhere(where):
    with pytest.raises(ValueError, match=r"step_size must be >= 0.*minimises.*negate the energy"):
        NEGATIVE_STEP[where]()


def test_zero_step_size_is_allowed():
    q, k = q4()
    torch.testing.assert_close(hopfield_descent(q, k, step_size=0.0, num_steps=3), q)


@pytest.mark.parametrize("cls", [EnergyBasedAttention, VanillaSoftmaxAttention])
@pytest.mark.parametrize("kwargs, exc, name", [
    ({"heads": 0}, ValueError, "heads"),
    ({"dim_head": -1}, ValueError, "dim_head"),
    ({"heads": 1.5}, TypeError, "heads"),
    ({"context_dim": 0}, ValueError, "context_dim"),
])
def test_blog_modules_reject_bad_sizes(cls, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        cls(32, **kwargs)


def test_hopfield_energy_rejects_mismatched_pattern_sizes():
    with pytest.raises(ValueError, match="state_patterns and stored_patterns"):
        hopfield_energy(torch.randn(1, 4, 8), torch.randn(1, 6, 7), 0.3)
    with pytest.raises(TypeError, match="stored_patterns must be a torch.Tensor"):
        hopfield_energy(torch.randn(1, 4, 8), [[1.0]], 0.3)


def test_minimize_energy_with_the_bare_energy_uses_the_default_scale():
    # The README's API table: minimize_energy(energy_func, queries, keys, ...).
    q, k = q3()
    out = minimize_energy(hopfield_energy, q, k, num_steps=2, step_size=0.5)
    explicit = functools.partial(hopfield_energy, scale=8 ** -0.5)
    torch.testing.assert_close(out, minimize_energy(explicit, q, k, num_steps=2, step_size=0.5))
    for opt in ("newton_2nd1st", "newton_light"):
        torch.testing.assert_close(minimize_energy(hopfield_energy, q, k, optimizer=opt),
                                   minimize_energy(explicit, q, k, optimizer=opt))
    assert torch.equal(hopfield_energy(q, k), hopfield_energy(q, k, 8 ** -0.5))


def _layers():
    """Every public layer, its input names and a builder of inputs of a dtype."""
    x = lambda dt: {"x": torch.randn(2, 3, 8, dtype=dt)}  # noqa: E731
    return {
        "VanillaSoftmaxAttention": (lambda: VanillaSoftmaxAttention(8, heads=2, dim_head=4), x),
        "EnergyBasedAttention": (lambda: EnergyBasedAttention(8, heads=2, dim_head=4), x),
        "MultiHeadSelfAttention": (lambda: MultiHeadSelfAttention(8, 2), x),
        **{f"block-{n}": (functools.partial(cls, 8, 2), x) for n, cls in BLOCKS.items()},
        "LinearAttention": (lambda: LinearAttention(8, 2), x),
        "EnergyMultiheadAttention": (
            lambda: EnergyMultiheadAttention(8, 2, batch_first=True),
            lambda dt: {"query": torch.randn(2, 3, 8, dtype=dt),
                        "key": torch.randn(2, 3, 8, dtype=dt),
                        "value": torch.randn(2, 3, 8, dtype=dt)}),
        "Hopfield": (lambda: Hopfield(8), lambda dt: {"input": torch.randn(2, 3, 8, dtype=dt)}),
        "HopfieldPooling": (lambda: HopfieldPooling(8),
                            lambda dt: {"input": torch.randn(2, 3, 8, dtype=dt)}),
        "HopfieldLayer": (lambda: HopfieldLayer(8),
                          lambda dt: {"input": torch.randn(2, 3, 8, dtype=dt)}),
    }


LAYERS = _layers()
EXPECTED_NAME = {"Hopfield": "input", "HopfieldPooling": "input", "HopfieldLayer": "input",
                 "EnergyMultiheadAttention": "query"}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layers_reject_a_dtype_other_than_their_parameters(name):
    build, inputs = LAYERS[name]
    layer = build()
    layer(**inputs(torch.float32))  # the matching dtype runs
    with pytest.raises(TypeError, match=rf"{EXPECTED_NAME.get(name, 'x')} has dtype "
                                        r"torch.float64 but the module's parameters are"):
        layer(**inputs(torch.float64))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layers_reject_inputs_on_another_device(name):
    build, inputs = LAYERS[name]
    layer = build().to("meta")  # parameters on another device than the (CPU) input
    with pytest.raises(ValueError, match=rf"{EXPECTED_NAME.get(name, 'x')} is on cpu but the "
                                         r"module's parameters are on meta"):
        layer(**inputs(torch.float32))


def test_hopfield_names_the_tuple_part():
    layer = Hopfield(8)
    x = torch.randn(2, 3, 8)
    with pytest.raises(TypeError, match="state_pattern has dtype torch.float64"):
        layer((x, x.double(), x))


def test_gpt_rejects_tokens_on_another_device():
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=8)).to("meta")
    with pytest.raises(ValueError, match="idx is on cpu but the module's parameters are on meta"):
        model(torch.zeros(1, 3, dtype=torch.long))


def test_autocast_inputs_are_accepted():
    layer = MultiHeadSelfAttention(8, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(2, 3, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_autocast_does_not_excuse_what_it_cannot_cast(name):
    """Autocast casts neither float64 input nor a bf16 module's float32 input: both failed deep
    inside layer_norm/linear; they get the same named TypeError as outside autocast."""
    build, inputs = LAYERS[name]
    layer = build()
    expected = rf"{EXPECTED_NAME.get(name, 'x')} has dtype"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match=expected):
            layer(**inputs(torch.float64))
        with pytest.raises(TypeError, match=expected + ".*keep the module in float32"):
            layer.to(torch.bfloat16)(**inputs(torch.float32))


def test_energy_package_exports_the_checked_functions():
    # the checks live at the public names users call
    assert ea.hopfield_descent is hopfield_descent and ea.minimize_energy is minimize_energy
