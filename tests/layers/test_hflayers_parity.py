"""Drop-in parity with hopfield-layers (hflayers, ml-jku, commit f56f929).

The core checks read fixtures of hflayers' published behaviour (fixtures/hflayers_f56f929.pt,
written by fixtures/make_hflayers_fixtures.py from the real package), so they run without it:
its state dicts load here (every pattern/static combination), outputs, association matrices and
gradients match in float64, and what this package exports loads there (same names and shapes).
Where hflayers sits beside the clone (../shared/peers/hopfield-layers, as in CI), the signature,
round-trip, transformer-wrapper and demo-notebook checks also run it directly.
"""

import inspect
import pathlib
import sys

import pytest
import torch
from helpers import tol

import energy_attn
from energy_attn.layers.hopfield import Hopfield, hflayers_state_dict

DT = torch.float64
FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "hflayers_f56f929.pt"
# the fixture also records the peer's torch version and signatures (inspect's empty default)
with torch.serialization.safe_globals([torch.torch_version.TorchVersion, inspect.Parameter.empty]):
    FIXTURES = torch.load(FIXTURE, weights_only=True)
CASES = FIXTURES["cases"]
# the peer checkout in shared/peers/ beside the clone (CI) or beside the folder holding it
PEER = next((p / "shared" / "peers" / "hopfield-layers" for p in pathlib.Path(__file__).resolve()
             .parents[3:5] if (p / "shared" / "peers" / "hopfield-layers").is_dir()), None)


def _hflayers():
    if PEER is None:
        return None
    if str(PEER) not in sys.path:
        sys.path.insert(0, str(PEER))
    import hflayers

    return hflayers


def _ours(case, **extra):
    torch.manual_seed(0)
    return getattr(energy_attn, case["cls"])(**case["kwargs"], **extra).to(DT).eval()


def _grads_by_hflayers_name(model):
    """The parameter gradients of ``model`` under hflayers' names (as hflayers_state_dict)."""
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
             for n, p in model.named_parameters()}
    for name, sub in model.named_modules():
        if isinstance(sub, Hopfield):
            sub._to_hflayers(grads, f"{name}." if name else "")
    return grads


@pytest.mark.parametrize("name", sorted(CASES))
def test_hflayers_state_dict_loads_and_exports_back(name):
    case = CASES[name]
    kwargs = dict(case["kwargs"])
    ours = _ours(case)
    ours.load_state_dict(case["state_dict"])  # strict: every name recognised, nothing missing
    exported = hflayers_state_dict(ours)
    theirs = dict(case["state_dict"])
    if not kwargs.get("concat_bias_pattern"):
        assert set(exported) == set(theirs)
    for key, value in theirs.items():
        if key.endswith("in_proj_bias") and kwargs.get("pattern_projection_as_static"):
            # hflayers keeps (and never uses) value rows for a static projection: exported as 0
            hop = ours if isinstance(ours, Hopfield) else ours.hopfield
            rows = hop.num_heads * hop.pattern_size
            assert exported[key].shape == value.shape
            torch.testing.assert_close(exported[key][:-rows], value[:-rows], atol=0, rtol=0)
            assert torch.all(exported[key][-rows:] == 0)
            continue
        assert exported[key].shape == value.shape, key
        torch.testing.assert_close(exported[key], value, atol=0, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_seed_gives_hflayers_initial_values(name):
    case = CASES[name]
    ours = hflayers_state_dict(_ours(case))  # built after torch.manual_seed(0), as the fixture
    theirs = case["init_state_dict"]
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items()
                                        if c["out"] is not None and n != "static_batch_mixing"))
def test_outputs_association_and_gradients_match_hflayers(name):
    case = CASES[name]
    extra = {}
    if case["kwargs"].get("concat_bias_pattern"):
        extra["concat_bias_pattern"] = False  # hflayers never applies its bias patterns
    kwargs = {**case["kwargs"], **extra}
    torch.manual_seed(0)
    ours = getattr(energy_attn, case["cls"])(**kwargs).to(DT).eval()
    ours.load_state_dict(case["state_dict"])
    leaves = [t.clone().requires_grad_(True) for t in case["inputs"]]
    arg = leaves[0] if len(leaves) == 1 else tuple(leaves)
    out = ours(arg, **case["masks"])
    atol, rtol = tol(DT)
    scale = case["out"].abs().max().item() or 1.0
    torch.testing.assert_close(out, case["out"], atol=atol * scale, rtol=rtol)
    assoc = ours.get_association_matrix(arg, **case["masks"])
    torch.testing.assert_close(assoc, case["assoc"], atol=atol, rtol=rtol)
    projected = ours.get_projected_pattern_matrix(arg, **case["masks"])
    torch.testing.assert_close(projected, case["projected"], atol=atol, rtol=rtol)
    if name == "eps_rule_extreme":
        # β = 2e10 on patterns of norm 1e-5: every step multiplies rounding errors by ‖βΣ‖ ≈ 2
        # (an expanding map), so gradients agree only to ~2^T ulp; the case is about which
        # steps the stopping rule keeps, checked above by the outputs and association matrices
        return
    (out * case["weight"]).sum().backward()
    # gradients are sums of terms of the size of the largest gradient (a gradient that is zero
    # in exact arithmetic, e.g. of a shift of every stored pattern, is pure rounding), and every
    # update step adds its rounding: compare at the case's gradient scale times (T + 1)
    with torch.no_grad():
        passes = ours.energy(arg, **case["masks"], return_trace=True).shape[-1] \
            if case["cls"] == "Hopfield" else 1
    g_atol = atol * passes * max(g.abs().max().item() for g in case["input_grads"])
    for got, want in zip(leaves, case["input_grads"]):
        torch.testing.assert_close(got.grad, want, atol=g_atol, rtol=rtol)
    grads = _grads_by_hflayers_name(ours)
    g_atol = atol * passes * max((g.abs().max().item() for g in case["param_grads"].values()),
                                 default=0.0)
    for key, want in case["param_grads"].items():
        torch.testing.assert_close(grads[key], want, atol=g_atol, rtol=rtol,
                                   msg=lambda m, k=key: f"{k}: {m}")


def test_static_patterns_stay_in_their_batch_element():
    case = CASES["static_batch_mixing"]
    ours = _ours(case)
    ours.load_state_dict(case["state_dict"])
    stored, state, proj = case["inputs"]
    out = ours((stored, state, proj))
    alone = torch.cat([ours((stored[i:i + 1], state[i:i + 1], proj[i:i + 1])) for i in range(2)])
    torch.testing.assert_close(out, alone)
    assert not torch.allclose(out, case["out"])  # hflayers mixes the batch elements' patterns


def _signature(cls):
    return [(p.name, p.default, p.kind.name) for p in inspect.signature(cls).parameters.values()]


@pytest.mark.parametrize("name", ["Hopfield", "HopfieldPooling", "HopfieldLayer"])
def test_signatures_match_hflayers(name):
    theirs = FIXTURES["signatures"][name]
    hflayers = _hflayers()
    if hflayers is not None:
        assert _signature(getattr(hflayers, name)) == theirs
    ours = _signature(getattr(energy_attn, name))
    assert ours[:len(theirs)] == theirs  # names, defaults, positional order
    assert all(kind == "KEYWORD_ONLY" for *_, kind in ours[len(theirs):])


def test_positional_arguments_and_attributes():
    pool = energy_attn.HopfieldPooling(16, 8)  # hidden_size positional, as hflayers
    assert pool.hidden_size == 8 and pool.output_size == 16 and pool.batch_first
    hop = Hopfield(8, 4, 6, 3, 2, 0.5, 2, 1e-3, False, False)
    assert (hop.hidden_size, hop.output_size, hop.pattern_size, hop.num_heads, hop.scaling,
            hop.update_steps_max, hop.update_steps_eps) == (4, 6, 3, 2, 0.5, 2, 1e-3)
    assert not hop.normalize_stored_pattern and hop.normalize_state_pattern_affine
    assert (hop.state_pattern_dim, hop.stored_pattern_dim, hop.pattern_projection_dim) == (8,) * 3
    assert hop.get_projected_pattern_matrix(torch.randn(2, 5, 8)).shape == (2, 2, 5, 3)
    layer = energy_attn.HopfieldLayer(8, quantity=3, update_steps_max=2)
    assert (layer.output_size, layer.input_size, layer.update_steps_max, layer.scaling) == \
        (8, 8, 2, 8**-0.5)


def test_shapes_and_parameter_counts_of_issue_15():
    pool = energy_attn.HopfieldPooling(32, quantity=4, batch_first=False)
    assert pool(torch.randn(7, 3, 32)).shape == (4, 96)
    assert pool.pooling_weights.shape == (4, 1, 32)
    assert sum(p.numel() for p in Hopfield(16, input_bias=False).parameters()) == 1120
    hop = Hopfield(16, num_heads=4, stored_pattern_as_static=True, stored_pattern_size=4)
    assert hop((torch.randn(2, 5, 4), torch.randn(2, 3, 16), torch.randn(2, 5, 16))).shape == \
        (2, 3, 16)


@pytest.mark.parametrize("kwargs, match", [
    (dict(association_activation="gelu"), "association_activation"),
    # torch has them, but hflayers' call fails in forward (softmax needs dim) or returns a scalar
    (dict(association_activation="softmax"), "association_activation"),
    (dict(association_activation="sum"), "association_activation"),
    (dict(association_activation="isnan"), "association_activation"),
    (dict(scaling=torch.tensor([0.5, 1.0])), "per head"),
    (dict(concat_bias_pattern=True, stored_pattern_as_static=True, stored_pattern_size=4),
     "concat_bias_pattern"),
    (dict(update_steps_max=None, update_steps_eps=0.0), "update_steps_eps > 0"),
])
def test_values_that_cannot_apply_say_why(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Hopfield(8, num_heads=2, **kwargs)


def test_fully_padded_batch_element_is_finite_here():
    hop = Hopfield(8, num_heads=2, update_steps_max=2)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1] = True
    out = hop(torch.randn(2, 5, 8), stored_pattern_padding_mask=pad)
    assert torch.isfinite(out).all()


def test_hflayers_loads_exported_state_dicts_and_transformer_layers_wrap_ours():
    hflayers = _hflayers()
    if hflayers is None:
        pytest.skip("hflayers not beside the clone (../shared/peers/hopfield-layers)")
    from hflayers.transformer import HopfieldDecoderLayer, HopfieldEncoderLayer

    for cls, kwargs in (("Hopfield", dict(input_size=8, num_heads=2, pattern_size=3,
                                          normalize_hopfield_space=True,
                                          normalize_hopfield_space_affine=True, hidden_size=4)),
                        ("HopfieldPooling", dict(input_size=8, quantity=2, batch_first=False)),
                        ("HopfieldLayer", dict(input_size=8, quantity=3,
                                               lookup_weights_as_separated=True))):
        ours = getattr(energy_attn, cls)(**kwargs).to(DT).eval()
        theirs = getattr(hflayers, cls)(**kwargs).to(DT).eval()
        theirs.load_state_dict(hflayers_state_dict(ours))
        x = torch.randn(2, 5, 8, dtype=DT)
        torch.testing.assert_close(ours(x), theirs(x))
    torch.manual_seed(0)
    enc_ours = HopfieldEncoderLayer(Hopfield(8, num_heads=2), dim_feedforward=16).to(DT).eval()
    torch.manual_seed(0)
    enc_theirs = HopfieldEncoderLayer(hflayers.Hopfield(8, num_heads=2),
                                      dim_feedforward=16).to(DT).eval()
    enc_ours.load_state_dict(enc_theirs.state_dict())
    x = torch.randn(2, 5, 8, dtype=DT)
    torch.testing.assert_close(enc_ours(x), enc_theirs(x))
    dec_ours = HopfieldDecoderLayer(Hopfield(8), Hopfield(8), dim_feedforward=16).to(DT).eval()
    dec_theirs = HopfieldDecoderLayer(hflayers.Hopfield(8), hflayers.Hopfield(8),
                                      dim_feedforward=16).to(DT).eval()
    dec_ours.load_state_dict(dec_theirs.state_dict())
    memory = torch.randn(2, 4, 8, dtype=DT)
    torch.testing.assert_close(dec_ours(x, memory), dec_theirs(x, memory))
