"""The nn.Module contract of every public layer, block and model, as a training codebase uses it.

One table of tiny configurations (CPU, float32/float64) covers: state dicts, deepcopy and
pickling, dtype and device moves, meta-device construction with ``to_empty`` +
``reset_parameters``, train/eval and no-grad modes, double backward, ``torch.func``, ``repr`` and
empty batches / single tokens.
"""

import copy
import io
import pickle

import pytest
import torch
from helpers import tol
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import energy_attn as ea
from energy_attn.energies import elastic_energy
from energy_attn.layers.hopfield import hflayers_state_dict

D = 8  # model width of every case


def _user_energy(state, stored, scale, mask=None):
    """A user energy (no closed-form gradient): descended with autograd."""
    return ea.hopfield_energy(state, stored, scale, mask=mask)


class Case:
    """``make()`` builds the module; ``run(module, x [B, N, D])`` returns one tensor."""

    def __init__(self, make, run=lambda m, x: m(x), repr_has=(), dropout=False):
        self.make, self.run, self.repr_has, self.dropout = make, run, repr_has, dropout


# per-head settings, made outside any torch.device("meta") block (a meta tensor has no values)
STEPS, EPS = torch.tensor([1, 3]), torch.tensor([1e-4, 0.0])
_STEP = ("scale=", "num_steps=", "step_size=", "optimizer=")
CASES = {
    "VanillaSoftmaxAttention": Case(
        lambda: ea.VanillaSoftmaxAttention(D, heads=2, dim_head=4),
        repr_has=("heads=2", "dim_head=4", "scale=")),
    "EnergyBasedAttention": Case(
        lambda: ea.EnergyBasedAttention(D, heads=2, dim_head=4, optimizer="nesterov",
                                        momentum=0.5),
        lambda m, x: m(x, num_steps=2, step_size=0.5),
        repr_has=("heads=2", "scale=", "optimizer='nesterov'", "momentum=0.5")),
    "EnergyBasedAttention-elastic": Case(
        lambda: ea.EnergyBasedAttention(D, heads=2, dim_head=4, energy_func=elastic_energy),
        lambda m, x: m(x, num_steps=2, step_size=0.5), repr_has=("energy_func=elastic_energy",)),
    "EnergyBasedAttention-user-energy": Case(
        lambda: ea.EnergyBasedAttention(D, heads=2, dim_head=4, energy_func=_user_energy),
        lambda m, x: m(x, num_steps=2, step_size=0.5), repr_has=("energy_func=_user_energy",)),
    "EnergyTransformerAttention": Case(
        lambda: ea.EnergyTransformerAttention(D, heads=2, dim_head=4, num_steps=2,
                                              normalize=True),
        repr_has=(*_STEP, "heads=2", "normalize=True")),
    "Hopfield": Case(
        lambda: ea.Hopfield(D, num_heads=2, update_steps_max=2, update_steps_eps=0, dropout=0.5),
        repr_has=("num_heads=2", "scaling=", "update_steps_max=2", "update_steps_eps=0"),
        dropout=True),
    "Hopfield-eps-rule": Case(  # hflayers' stopping rule, per head
        lambda: ea.Hopfield(D, num_heads=2, update_steps_max=STEPS, update_steps_eps=EPS,
                            concat_bias_pattern=True, add_zero_association=True),
        repr_has=("update_steps_max=[1, 3]",)),
    "Hopfield-fixed-point": Case(
        lambda: ea.Hopfield(D, num_heads=2, update_steps_max=2, solver="fixed_point",
                            normalize_hopfield_space=True, normalize_hopfield_space_affine=True),
        repr_has=("solver='fixed_point'",)),
    "HopfieldLayer": Case(
        lambda: ea.HopfieldLayer(D, quantity=3, lookup_weights_as_separated=True),
        repr_has=("quantity=3",)),
    "HopfieldPooling": Case(lambda: ea.HopfieldPooling(D, quantity=2), repr_has=("quantity=2",)),
    "LinearAttention": Case(
        lambda: ea.LinearAttention(D, 2, gated=True), lambda m, x: m(x, is_causal=True),
        repr_has=("n_head=2", "gated=True", "scale=")),
    "MultiHeadSelfAttention-energy": Case(
        lambda: ea.MultiHeadSelfAttention(D, 2, attention="energy", num_steps=3, step_size=0.5,
                                          optimizer="momentum", momentum=0.3, dropout=0.5),
        lambda m, x: m(x, is_causal=True),
        repr_has=("num_steps=3", "step_size=0.5", "optimizer='momentum'", "momentum=0.3",
                  "dropout=0.5"),
        dropout=True),
    "MultiHeadSelfAttention-2nd1st": Case(
        lambda: ea.MultiHeadSelfAttention(D, 2, second_order="2nd1st"),
        lambda m, x: m(x, is_causal=True)),
    "MHA": Case(lambda: ea.MHA(D, 2, dropout=0.5), lambda m, x: m(x)[0],
                repr_has=("variant='mha'",), dropout=True),
    "MomenMHA": Case(lambda: ea.MomenMHA(D, 2), lambda m, x: m(x)[0],
                     repr_has=("variant='momen'",)),
    "NagMHA": Case(lambda: ea.NagMHA(D, 2, learn_rho=False), lambda m, x: m(x, 0.1 * x)[0]),
    "MHA2nd1st": Case(lambda: ea.MHA2nd1st(D, 2), lambda m, x: m(x)[0]),
    "LightMHA2nd1st": Case(lambda: ea.LightMHA2nd1st(D, 2, learn_gamma=False),
                           lambda m, x: m(x)[0]),
    "EnergyMultiheadAttention": Case(
        lambda: ea.EnergyMultiheadAttention(D, 2, dropout=0.5, batch_first=True, num_steps=3,
                                            add_bias_kv=True, kdim=6, vdim=5,
                                            optimizer="momentum", momentum=0.5, scale=0.4),
        lambda m, x: m(x, x[..., :6], x[..., :5])[0],
        repr_has=("num_steps=3", "step_size=1.0", "optimizer='momentum'", "momentum=0.5",
                  "scale=0.4"),
        dropout=True),
    "GPT": Case(  # tokens from the input's signs: [B, N, D] -> [B, N] ids in [0, 11)
        lambda: ea.GPT(ea.GPTConfig(vocab_size=11, n_layer=2, n_head=2, d_model=D, context=6,
                                    block="nag", dropout=0.5)),
        lambda m, x: m((x > 0).sum(-1))[0], repr_has=("block=nag",), dropout=True),
}
IDS = list(CASES)
# The autograd path of a user energy differentiates inside the forward: not under torch.func
# transforms (docs/zoo.md §3).
NEEDS_AUTOGRAD_IN_FORWARD = {"EnergyBasedAttention-user-energy"}


def _x(b=2, n=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, D, generator=g, dtype=dtype)


def _build(name, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return CASES[name].make().to(dtype).eval()


def _forward(name, m, x):
    torch.manual_seed(1)  # dropout masks, where a case trains
    return CASES[name].run(m, x)


def _tensors(m):
    return {**dict(m.named_parameters()), **dict(m.named_buffers())}


@pytest.mark.parametrize("name", IDS)
def test_state_dict_round_trip_into_a_fresh_instance(name):
    m, x = _build(name, seed=0), _x()
    fresh = _build(name, seed=1)
    assert list(fresh.state_dict()) == list(m.state_dict())  # stable key names
    fresh.load_state_dict(m.state_dict(), strict=True)
    assert torch.equal(_forward(name, fresh, x), _forward(name, m, x))


@pytest.mark.parametrize("name", IDS)
def test_deepcopy_pickle_and_torch_save_of_the_whole_module(name):
    m, x = _build(name), _x()
    ref = _forward(name, m, x)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m)),
                  torch.load(buf, weights_only=False)):
        assert torch.equal(_forward(name, other, x), ref)


# Plain tensor attributes that never enter a computation: hflayers' configuration, echoed back
# by the update_steps_max / update_steps_eps properties (the per-head values live in buffers).
CONFIG_ECHOES = {"_update_steps_max", "_update_steps_eps"}


@pytest.mark.parametrize("name", IDS)
def test_every_tensor_is_a_parameter_or_buffer(name):
    for mod_name, mod in _build(name).named_modules():
        plain = {k for k, v in vars(mod).items() if isinstance(v, torch.Tensor)} - CONFIG_ECHOES
        assert not plain, f"{mod_name}: {plain} would not move with .to()"


@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtype_casts_move_every_tensor_and_forward_runs(name, dtype):
    m, x = _build(name), _x()
    ref = _forward(name, m, x)
    method = {torch.float64: "double", torch.float16: "half", torch.bfloat16: "bfloat16"}[dtype]
    for cast in (copy.deepcopy(m).to(dtype), getattr(copy.deepcopy(m), method)()):
        for key, t in _tensors(cast).items():
            assert not t.is_floating_point() or t.dtype == dtype, key
        out = _forward(name, cast, x.to(dtype))
        assert out.dtype == dtype and out.shape == ref.shape
        if dtype == torch.float64:
            torch.testing.assert_close(out.float(), ref, atol=1e-5, rtol=1e-5)
        else:
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", IDS)
def test_built_under_a_device_context_every_tensor_is_on_that_device(name):
    """``with torch.device("cuda"): model = ...`` builds on the GPU: every parameter and buffer
    must land there. The meta device stands in for CUDA; a forward of meta inputs then infers
    the eager output's shape without memory."""
    with torch.device("meta"):
        m = CASES[name].make().eval()
    assert {k: t.device.type for k, t in _tensors(m).items() if t.device.type != "meta"} == {}
    x = _x()
    want = _forward(name, _build(name), x)
    got = _forward(name, m, x.to("meta"))
    assert got.device.type == "meta" and got.shape == want.shape


@pytest.mark.parametrize("name", IDS)
def test_meta_construction_then_to_empty_and_reset_parameters(name):
    """Built under torch.device("meta"), materialised with to_empty (memory of any value, here
    NaN / -7) and reset_parameters -- the module's own, else every submodule's, as FSDP does --
    every tensor is initialised; tensors the constructor sets deterministically get exactly
    those values. (nn.MultiheadAttention, and so EnergyMultiheadAttention, initialises its own
    tensors in the private ``_reset_parameters``: PyTorch's convention, kept by the drop-in.)"""
    with torch.device("meta"):
        m = CASES[name].make()
    m = m.to_empty(device="cpu")
    with torch.no_grad():
        for t in _tensors(m).values():
            t.fill_(float("nan") if t.is_floating_point() else -7)
    if hasattr(m, "reset_parameters"):
        m.reset_parameters()
    else:
        for sub in m.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
        for sub in m.modules():
            if isinstance(sub, nn.MultiheadAttention):
                sub._reset_parameters()
    got, a, b = _tensors(m), _tensors(_build(name, seed=0)), _tensors(_build(name, seed=1))
    assert list(got) == list(a)
    for key, t in got.items():
        assert not (t.is_floating_point() and t.isnan().any()), f"{key} left uninitialised"
        if torch.equal(a[key], b[key]):  # a deterministic initial value
            assert torch.equal(t, a[key]), key
    if isinstance(m, ea.GPT):
        assert m.lm_head.weight is m.wte.weight, "to_empty unties; reset_parameters reties"
    assert torch.isfinite(_forward(name, m.eval(), _x())).all()


@pytest.mark.parametrize("name", IDS)
def test_dropout_acts_in_training_only_and_no_grad_modes_agree(name):
    m, x = _build(name), _x()
    ref = _forward(name, m, x)
    assert torch.equal(_forward(name, m, x), ref)
    with torch.no_grad():
        torch.testing.assert_close(_forward(name, m, x), ref, atol=tol(x.dtype)[0], rtol=0)
    with torch.inference_mode():
        torch.testing.assert_close(_forward(name, m, x), ref, atol=tol(x.dtype)[0], rtol=0)
    if CASES[name].dropout:
        m.train()
        torch.manual_seed(2)
        a = CASES[name].run(m, x)
        assert not torch.equal(a, ref) and not torch.equal(a, _forward(name, m, x))


# GPT's input is token ids (nothing to differentiate); its blocks are cases of their own. The
# fixed-point solver's implicit gradient is first order only (test below).
TWICE_DIFFERENTIABLE = [n for n in IDS if n not in ("GPT", "Hopfield-fixed-point")]


@pytest.mark.parametrize("name", TWICE_DIFFERENTIABLE)
def test_double_backward_is_exact_with_the_math_sdpa_backend(name):
    """Gradient penalties / meta-learning: gradgradcheck in float64. PyTorch's fused SDPA
    kernels (flash on CPU, flash/efficient on CUDA) raise on double backward; the math backend
    (``sdpa_kernel(SDPBackend.MATH)``, docs/zoo.md) makes every layer twice differentiable."""
    m = _build(name, torch.float64)
    x = _x(1, 3, torch.float64).requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        assert torch.autograd.gradgradcheck(lambda t: _forward(name, m, t), (x,))
        # and through the parameters: a gradient penalty trains them
        (g,) = torch.autograd.grad(_forward(name, m, x).square().sum(), x, create_graph=True)
        g.square().sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_fixed_point_solver_refuses_double_backward_loudly():
    m = _build("Hopfield-fixed-point", torch.float64)
    x = _x(1, 3, torch.float64).requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        (g,) = torch.autograd.grad(_forward("Hopfield-fixed-point", m, x).square().sum(), x,
                                   create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            g.square().sum().backward()


class _Bound(nn.Module):
    """``name``'s module with its case's forward (for torch.func)."""

    def __init__(self, name, m):
        super().__init__()
        self.name, self.m = name, m

    def forward(self, x):
        return _forward(self.name, self.m, x)


def _shifted(m, delta):
    return {k: v.detach() + delta for k, v in m.named_parameters()}


@pytest.mark.parametrize("name", IDS)
def test_functional_call_equals_the_module_with_those_parameters(name):
    m, x = _Bound(name, _build(name, torch.float64)), _x(dtype=torch.float64)
    params = _shifted(m, 0.01)
    out = functional_call(m, params, (x,))
    with torch.no_grad():  # as the detached parameters (SDPA's kernel choice depends on grad)
        for k, p in m.named_parameters():
            p.copy_(params[k])
        assert torch.equal(out, m(x))


# torch.func transforms cannot run a forward that calls torch.autograd itself (a user energy):
# PyTorch raises. elastic_energy's key bias is an SDPA mask needing a gradient, which vmap's
# fallback refuses.
FUNC_LIMITS = NEEDS_AUTOGRAD_IN_FORWARD


@pytest.mark.parametrize("name", [n for n in IDS if n not in FUNC_LIMITS])
def test_torch_func_grad_over_parameters_equals_autograd(name):
    m, x = _Bound(name, _build(name, torch.float64)), _x(dtype=torch.float64)
    got = grad(lambda p: functional_call(m, p, (x,)).square().sum())(_shifted(m, 0.0))
    m(x).square().sum().backward()
    for k, p in m.named_parameters():  # torch.func: zeros where autograd leaves grad None
        want = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got[k], want, atol=1e-12, rtol=1e-10, msg=k)


# PyTorch's note that its CPU flash kernel has no batching rule (vmap falls back to a loop)
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("name", [n for n in IDS if n not in FUNC_LIMITS
                                  and n != "EnergyBasedAttention-elastic"])
def test_vmap_over_a_batch_of_parameters(name):
    m, x = _Bound(name, _build(name, torch.float64)), _x(dtype=torch.float64)
    ps = [_shifted(m, d) for d in (0.0, 0.01)]
    stacked = {k: torch.stack([p[k] for p in ps]) for k in ps[0]}
    out = vmap(lambda p: functional_call(m, p, (x,)))(stacked)
    for i, p in enumerate(ps):
        torch.testing.assert_close(out[i], functional_call(m, p, (x,)), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("name", IDS)
def test_repr_names_the_configuration(name):
    text = repr(_build(name))
    for part in CASES[name].repr_has:
        assert part in text, (part, text)


@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("shape", [(0, 5), (2, 1), (0, 1)])
def test_empty_batch_and_single_token_forward_backward(name, shape):
    m = _build(name).train()
    x = _x(*shape).requires_grad_(True)
    out = _forward(name, m, x)
    ref_shape = _forward(name, m, _x(2, shape[1])).shape
    assert out.shape == (shape[0], *ref_shape[1:])
    out.sum().backward()
    assert x.grad is None or x.grad.shape == x.shape  # GPT's input only picks token ids
    for k, p in m.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), k


def test_hflayers_state_dict_of_a_fresh_module_loads_back():
    m, x = _build("Hopfield-eps-rule"), _x()
    fresh = _build("Hopfield-eps-rule", seed=1)
    fresh.load_state_dict(hflayers_state_dict(m), strict=True)
    assert torch.equal(_forward("Hopfield-eps-rule", fresh, x),
                       _forward("Hopfield-eps-rule", m, x))


def test_per_head_settings_given_as_meta_tensors_are_named():
    with torch.device("meta"), pytest.raises(ValueError, match="update_steps_max is a meta"):
        ea.Hopfield(D, num_heads=2, update_steps_max=torch.tensor([1, 3]))
