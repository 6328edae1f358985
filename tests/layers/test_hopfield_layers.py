"""Hopfield, HopfieldPooling, HopfieldLayer: hopfield-layers semantics on the shared core."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tol

from energy_attn import Hopfield, HopfieldLayer, HopfieldPooling
from energy_attn.energies import hopfield_energy
from energy_attn.layers.hopfield import hflayers_state_dict

DT = torch.float64


def _manual(hop, stored, state, proj, allowed=None, steps=0, extra_kv=()):
    """softmax(β q kᵀ) v with the module's own normalisations and projections, by hand;
    ``extra_kv``: (key [H, d], value [H, dv]) pairs appended to every batch element."""
    h = hop.num_heads
    q = hop.q_proj(hop.norm_state_pattern(state))
    k = hop.k_proj(hop.norm_stored_pattern(stored))
    v = hop.v_proj(hop.norm_pattern_projection(proj))
    split = lambda t: t.unflatten(-1, (h, -1)).transpose(1, 2)  # noqa: E731  [B,L,(h d)]->[B,h,L,d]
    q, k, v = split(q), split(k), split(v)
    for ek, ev in extra_kv:
        k = torch.cat([k, ek[None, :, None].expand(k.shape[0], -1, 1, -1)], dim=2)
        v = torch.cat([v, ev[None, :, None].expand(v.shape[0], -1, 1, -1)], dim=2)
    for _ in range(steps):
        logits = hop.scaling * q @ k.transpose(-1, -2)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        q = logits.softmax(-1) @ k
    logits = hop.scaling * q @ k.transpose(-1, -2)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).flatten(2)
    return hop.out_proj(out)


def test_zero_steps_is_softmax_attention_with_same_projections():
    hop = Hopfield(8, num_heads=2, stored_pattern_size=6, pattern_projection_size=5,
                   output_size=7).to(DT)
    stored, state, proj = torch.randn(3, 9, 6, dtype=DT), torch.randn(3, 4, 8, dtype=DT), \
        torch.randn(3, 9, 5, dtype=DT)
    out = hop((stored, state, proj))
    assert out.shape == (3, 4, 7)
    assert hop.scaling == (8 // 2) ** -0.5
    atol, rtol = tol(DT)
    torch.testing.assert_close(out, _manual(hop, stored, state, proj), atol=atol, rtol=rtol)


@pytest.mark.parametrize("zero", [False, True])
def test_bias_and_zero_patterns_are_appended_keys_and_values(zero):
    # hflayers creates concat_bias_pattern's parameters but never applies them (so there is no
    # fixture for it); here they are a learned stored pattern and projection in the heads' space
    hop = Hopfield(8, num_heads=2, update_steps_max=2, update_steps_eps=0.0,
                   concat_bias_pattern=True, add_zero_association=zero).to(DT)
    assert hop.bias_k.shape == (8,) and hop.bias_v.shape == (8,)
    stored, state = torch.randn(2, 5, 8, dtype=DT), torch.randn(2, 3, 8, dtype=DT)
    extra = [(hop.bias_k.view(2, 4), hop.bias_v.view(2, 4))]
    if zero:
        extra.append((torch.zeros(2, 4, dtype=DT), torch.zeros(2, 4, dtype=DT)))
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1] = True  # element 1: only the appended patterns remain
    allowed = torch.cat([~pad, torch.ones(2, len(extra), dtype=torch.bool)], 1)[:, None, None]
    want = _manual(hop, stored, state, stored, allowed=allowed, steps=2, extra_kv=extra)
    atol, rtol = tol(DT)
    torch.testing.assert_close(hop((stored, state, stored), stored_pattern_padding_mask=pad), want,
                               atol=atol, rtol=rtol)
    assert hop.get_association_matrix((stored, state, stored)).shape == (2, 2, 3, 5 + len(extra))


def test_iterated_association_matches_hand_loop():
    hop = Hopfield(6, num_heads=3, update_steps_max=3, update_steps_eps=0.0).to(DT)
    x = torch.randn(2, 5, 6, dtype=DT)
    atol, rtol = tol(DT)
    torch.testing.assert_close(hop(x), _manual(hop, x, x, x, steps=3), atol=atol, rtol=rtol)


def test_padding_mask_equals_removing_padded_patterns():
    hop = Hopfield(8, num_heads=2, update_steps_max=2).to(DT)
    stored, state = torch.randn(2, 7, 8, dtype=DT), torch.randn(2, 3, 8, dtype=DT)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[:, 5:] = True  # True = padding (hopfield-layers convention)
    masked = hop((stored, state, stored), stored_pattern_padding_mask=pad)
    removed = hop((stored[:, :5], state, stored[:, :5]))
    atol, rtol = tol(DT)
    torch.testing.assert_close(masked, removed, atol=atol, rtol=rtol)
    # the padded patterns are really ignored: changing them changes nothing
    stored2 = stored.clone()
    stored2[:, 5:] = 1e3 * torch.randn(2, 2, 8, dtype=DT)
    torch.testing.assert_close(hop((stored2, state, stored2), stored_pattern_padding_mask=pad),
                               masked, atol=atol, rtol=rtol)


def test_association_mask_both_shapes_and_fully_blocked_rows_are_finite():
    hop = Hopfield(4, num_heads=2, update_steps_max=2)
    x = torch.randn(2, 5, 4, requires_grad=True)
    causal_blocked = torch.ones(5, 5, dtype=torch.bool).triu(1)  # True = blocked
    a = hop(x, association_mask=causal_blocked)
    b = hop(x, association_mask=causal_blocked.expand(2 * 2, 5, 5))
    torch.testing.assert_close(a, b)
    allowed = ~causal_blocked
    p = hop.get_association_matrix(x, association_mask=causal_blocked)
    assert p.shape == (2, 2, 5, 5)
    assert torch.all(p[..., ~allowed] == 0)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, 5))
    blocked = torch.ones(5, 5, dtype=torch.bool)
    blocked[:3] = causal_blocked[:3]  # rows 3, 4 see nothing
    out = hop(x, association_mask=blocked)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert torch.all(hop.get_association_matrix(x, association_mask=blocked)[:, :, 3:] == 0)


@pytest.mark.parametrize("eps", [0.0, 1e-3])  # hopfield_descent, and hflayers' stopping rule
def test_energy_and_trace(eps):
    hop = Hopfield(6, num_heads=2, update_steps_max=4, update_steps_eps=eps).to(DT)
    x = torch.randn(2, 5, 6, dtype=DT)
    e = hop.energy(x)
    trace = hop.energy(x, return_trace=True)
    assert e.shape == (2, 2, 5) and trace.shape == (2, 2, 5, 5)
    torch.testing.assert_close(trace[..., -1], e)
    q, k, _, _ = hop._project(x)
    torch.testing.assert_close(trace[..., 0], hopfield_energy(q, k, hop.scaling))
    # step 1 on the Hopfield energy is a CCCP step: the energy never increases
    atol, _ = tol(DT)
    assert torch.all(trace.diff(dim=-1) <= atol * trace.abs().max())


@pytest.mark.parametrize("return_trace", [False, True])
def test_energy_under_autocast_accumulates_in_float32(return_trace):
    # torch.autocast runs the energy's matmuls in bfloat16 unless they turn it off: the energy
    # must stay float32 and as accurate as a bfloat16 module's (float32 accumulation).
    torch.manual_seed(0)
    h = Hopfield(64, num_heads=1, update_steps_max=2, scaling=1.0)
    x = torch.randn(2, 32, 64)
    ref = copy.deepcopy(h).double().energy(x.double(), return_trace=return_trace)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = h.energy(x, return_trace=return_trace)
    low = copy.deepcopy(h).bfloat16().energy(x.bfloat16(), return_trace=return_trace)
    assert e.dtype == low.dtype == torch.float32
    assert (e.double() - ref).abs().max() <= 2 * (low.double() - ref).abs().max()


def test_input_dtype_is_the_parameters_outside_autocast():
    # as documented: another float dtype raises TypeError naming input, autocast accepts it
    hop = Hopfield(8, num_heads=2)
    x = torch.randn(2, 3, 8)
    with pytest.raises(TypeError, match="input"):
        hop(x.double())
    with pytest.raises(TypeError, match="input"):
        hop(x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            assert torch.isfinite(hop(x.to(dtype))).all()
    assert "of the parameters' float dtype" in " ".join(Hopfield.__doc__.split())


@pytest.mark.parametrize("pattern_size", [4, 2])
def test_hflayers_bias_patterns_load_when_pattern_size_is_hidden_size(pattern_size):
    # docs/zoo.md: hflayers sizes bias_k and bias_v num_heads·hidden_size, this package bias_v
    # num_heads·pattern_size: they load with concat_bias_pattern=True iff the two sizes agree
    kw = dict(input_size=8, hidden_size=4, pattern_size=pattern_size, num_heads=2)
    theirs = hflayers_state_dict(Hopfield(**kw))
    bias_k, bias_v = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    theirs.update({"association_core.bias_k": bias_k, "association_core.bias_v": bias_v})
    hop = Hopfield(**kw, concat_bias_pattern=True)
    if pattern_size == 4:
        hop.load_state_dict(theirs)
        assert torch.equal(hop.bias_k, bias_k.flatten()) and torch.equal(hop.bias_v,
                                                                          bias_v.flatten())
    else:
        with pytest.raises(RuntimeError, match="size mismatch for bias_v"):
            hop.load_state_dict(theirs)
    Hopfield(**kw).load_state_dict(theirs)  # without concat_bias_pattern: dropped
    assert "`pattern_size` equals `hidden_size`" in (
        Path(__file__).parents[2] / "docs" / "zoo.md").read_text()


def test_tolerance_stop_is_hflayers_rule_masked_per_head():
    x = torch.randn(2, 5, 6, dtype=DT)
    # hflayers keeps the update whose change is <= eps: with a huge eps exactly one step is taken
    loose = Hopfield(6, num_heads=2, update_steps_max=6, update_steps_eps=1e9).to(DT)
    one = Hopfield(6, num_heads=2, update_steps_max=1, update_steps_eps=0.0).to(DT)
    one.load_state_dict(loose.state_dict())
    torch.testing.assert_close(loose(x), one(x), atol=0, rtol=0)
    # per-head eps: head 0 stops after one step, head 1 runs all six; each head reads out as a
    # module running that head's step count
    kw = dict(num_heads=2, update_steps_max=6, scaling=2.0, disable_out_projection=True)
    mixed = Hopfield(6, **{**kw, "update_steps_eps": torch.tensor([1e9, 0.0])}).to(DT)
    with torch.no_grad():
        for p in mixed.parameters():
            p.normal_()
    six = Hopfield(6, **kw, update_steps_eps=0.0).to(DT)
    one = Hopfield(6, **{**kw, "update_steps_max": 1}, update_steps_eps=0.0).to(DT)
    for m in (six, one):
        m.load_state_dict(mixed.state_dict())
    out = mixed(x)
    atol, rtol = tol(DT)  # eps = 0 runs hopfield_descent, which rounds in another order
    torch.testing.assert_close(out[..., :3], one(x)[..., :3], atol=atol, rtol=rtol)
    torch.testing.assert_close(out[..., 3:], six(x)[..., 3:], atol=atol, rtol=rtol)
    assert not torch.allclose(one(x), six(x))


def test_per_head_tolerances_survive_a_dtype_cast():
    # module.to(dtype) casts floating buffers: float16 would turn eps = 1e-8 into 0, so the
    # heads would run past the step where their change fell below 1e-8
    torch.manual_seed(0)
    hop = Hopfield(8, num_heads=2, update_steps_max=8, scaling=2.0,
                   update_steps_eps=torch.tensor([1e-8, 2e-8])).to(DT)
    cast = copy.deepcopy(hop).half().to(DT)
    cast.load_state_dict(hop.state_dict())  # the weights as before; the tolerances must be too
    x = torch.randn(2, 5, 8, dtype=DT)
    assert torch.equal(cast(x), hop(x))


def test_static_patterns_and_batch_first_false():
    hop = Hopfield(4, num_heads=2, stored_pattern_as_static=True, state_pattern_as_static=True,
                   pattern_projection_as_static=True, normalize_stored_pattern=False,
                   normalize_stored_pattern_affine=False, normalize_state_pattern=False,
                   normalize_state_pattern_affine=False, normalize_pattern_projection=False,
                   normalize_pattern_projection_affine=False, disable_out_projection=True)
    assert hop.scaling == 1.0 and hop.q_proj is None and hop.out_proj is None
    assert len(list(hop.parameters())) == 0 and hop.input_size is None  # as hflayers
    s, q = torch.randn(2, 6, 4), torch.randn(2, 3, 4)
    out = hop((s, q, s))
    # hflayers' static-only mode: every head sees the whole raw patterns
    ref = F.scaled_dot_product_attention(q, s, s, scale=1.0)
    torch.testing.assert_close(out, torch.cat([ref, ref], dim=-1))
    seq_first = Hopfield(4, batch_first=False)
    seq_first.load_state_dict(Hopfield(4).state_dict())
    assert seq_first(q.transpose(0, 1)).shape == (3, 2, 4)


def test_pooling_shapes_gradients_parameters():
    pool = HopfieldPooling(8, quantity=3, num_heads=2, output_size=5, update_steps_max=1)
    names = dict(pool.named_parameters())
    assert "pooling_weights" in names and names["pooling_weights"].shape == (1, 3, 8)
    x = torch.randn(4, 10, 8)
    pad = torch.zeros(4, 10, dtype=torch.bool)
    pad[0, 6:] = True
    out = pool(x, stored_pattern_padding_mask=pad)
    assert out.shape == (4, 3 * 5)
    out.square().sum().backward()
    for n, p in pool.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert pool.pooling_weights.grad.abs().sum() > 0
    assert pool.get_association_matrix(x).shape == (4, 2, 3, 10)
    assert pool.energy(x).shape == (4, 2, 3)
    frozen = HopfieldPooling(8, trainable=False)
    assert not frozen.pooling_weights.requires_grad


def test_layer_shapes_gradients_parameters():
    layer = HopfieldLayer(6, quantity=7, num_heads=3, update_steps_max=2,
                          lookup_weights_as_separated=True)
    names = dict(layer.named_parameters())
    assert names["lookup_weights"].shape == (1, 7, 6)
    assert names["target_weights"].shape == (1, 7, 6)
    x = torch.randn(2, 4, 6, requires_grad=True)
    out = layer(x)
    assert out.shape == (2, 4, 6)
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for n, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert layer.get_association_matrix(x).shape == (2, 3, 4, 7)
    shared = HopfieldLayer(6, quantity=7)
    assert shared.target_weights is None
    assert shared(x).shape == (2, 4, 6)


def test_autograd_backend_without_tolerance_matches_reference():
    a = Hopfield(6, update_steps_max=2, update_steps_eps=0.0, backend="autograd").to(DT)
    b = Hopfield(6, update_steps_max=2, update_steps_eps=0.0).to(DT)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 6, dtype=DT)
    atol, rtol = tol(DT)
    torch.testing.assert_close(a(x), b(x), atol=atol, rtol=rtol)


def test_fixed_point_solver_in_hopfield_matches_long_unrolled():
    torch.manual_seed(1)
    unrolled = Hopfield(6, update_steps_max=80, update_steps_eps=0.0, scaling=0.3).to(DT)
    fixed = Hopfield(6, update_steps_max=80, scaling=0.3, solver="fixed_point").to(DT)
    fixed.load_state_dict(unrolled.state_dict())
    x = torch.randn(2, 5, 6, dtype=DT)
    torch.testing.assert_close(fixed(x), unrolled(x), atol=1e-7, rtol=1e-7)


def test_fixed_point_solver_gives_state_patterns_no_gradient_as_documented():
    kw = dict(update_steps_max=3, solver="fixed_point")
    pool = HopfieldPooling(8, quantity=2, **kw)
    pool(torch.randn(2, 5, 8)).sum().backward()
    assert pool.pooling_weights.grad is None and pool.hopfield.q_proj.weight.grad is None
    assert pool.hopfield.k_proj.weight.grad is not None
    layer = HopfieldLayer(8, quantity=3, **kw)
    x = torch.randn(2, 5, 8, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is None and layer.lookup_weights.grad is not None


@pytest.mark.parametrize("solver", ["unrolled", "fixed_point"])
def test_compile_fullgraph_with_steps(solver):
    # fullgraph=True fails on any graph break (a host sync, a Python branch on tensor values);
    # aot_eager traces forward and backward without paying for code generation.
    hop = Hopfield(8, num_heads=2, update_steps_max=3, solver=solver,
                   anderson=2 if solver == "fixed_point" else 0)
    x = torch.randn(2, 5, 8)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    eager = hop(x, stored_pattern_padding_mask=pad)
    (g_eager,) = torch.autograd.grad(eager.square().sum(), hop.k_proj.weight)
    compiled = torch.compile(hop, fullgraph=True, backend="aot_eager")
    out = compiled(x, stored_pattern_padding_mask=pad)
    (g_compiled,) = torch.autograd.grad(out.square().sum(), hop.k_proj.weight)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g_compiled, g_eager)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(update_steps_max=-1), ValueError),
        (dict(update_steps_max=None, update_steps_eps=0.0), ValueError),
        (dict(update_steps_max=1.5), TypeError),
        (dict(update_steps_eps=-1.0), ValueError),
        (dict(num_heads=3), ValueError),
        (dict(normalize_state_pattern=False), ValueError),
        (dict(pattern_projection_as_connected=True, stored_pattern_size=6), ValueError),
        (dict(solver="newton"), ValueError),
        (dict(anderson=2), ValueError),
        (dict(dropout=1.0), ValueError),
        (dict(update_steps_max=2, backend="autograd"), ValueError),  # eps > 0 needs reference
        (dict(update_steps_max=None, backend="autograd"), ValueError),  # so does unbounded T
        # per-head step counts run in PyTorch too (the backend was silently unused)
        (dict(num_heads=2, update_steps_max=torch.tensor([1, 3]), update_steps_eps=0.0,
              backend="autograd"), ValueError),
    ],
)
def test_bad_constructor_arguments(kwargs, error):
    with pytest.raises(error):
        Hopfield(8, **kwargs)


def test_bad_forward_inputs():
    hop = Hopfield(8, stored_pattern_size=6)
    s, q = torch.randn(2, 5, 6), torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="stored_pattern must have 6"):
        hop((torch.randn(2, 5, 7), q, torch.randn(2, 5, 8)))
    with pytest.raises(ValueError, match="same number of patterns"):
        hop((s, q, torch.randn(2, 4, 8)))
    with pytest.raises(ValueError, match="batch size"):
        hop((s, torch.randn(3, 3, 8), torch.randn(2, 5, 8)))
    with pytest.raises(TypeError, match="stored_pattern_padding_mask"):
        hop((s, q, torch.randn(2, 5, 8)), stored_pattern_padding_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="association_mask"):
        hop((s, q, torch.randn(2, 5, 8)),
            association_mask=torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="tuple"):
        hop((s, q))
