"""hopfield-layers' two runnable demo notebooks, model sections, with only the import changed.

The model-building, forward and training-step code of every Hopfield section of
``examples/bit_pattern/bit_pattern_demo.ipynb`` and
``examples/latch_sequence/latch_sequence_demo.ipynb`` (ml-jku/hopfield-layers f56f929), written
out as the notebooks have it, at small size and on random data of the notebooks' shapes
(their datasets come from hflayers). ``hf`` stands for the imported module: the notebooks'
``from hflayers import Hopfield, HopfieldPooling, HopfieldLayer`` becomes
``from energy_attn import ...``. Where hflayers sits beside the clone, the same sections built
with it from the same seed are the same networks (same initial parameters, outputs and
gradients).
"""

import types

import pytest
import torch
from helpers import tol
from test_hflayers_parity import _grads_by_hflayers_name, _hflayers, hflayers_state_dict
from torch.nn import Flatten, Linear, Sequential
from torch.nn.functional import binary_cross_entropy_with_logits
from torch.nn.utils import clip_grad_norm_
from torch.optim import AdamW

import energy_attn

# (num_bits or num_characters, num_instances) of the two notebooks
DEMOS = {"bit_pattern": (8, 16), "latch_sequence": (20, 32)}


def section(hf, demo, name, unique):
    """The notebook's cells for one model section (``set_seed()`` is the caller's)."""
    size, instances = DEMOS[demo]
    if name == "hopfield":
        hopfield = hf.Hopfield(input_size=size)
        output_projection = Linear(in_features=hopfield.output_size * instances, out_features=1)
        return Sequential(hopfield, Flatten(), output_projection, Flatten(start_dim=0))
    if name == "hopfield_adapted":
        hopfield = hf.Hopfield(input_size=size, hidden_size=8, num_heads=8, update_steps_max=3,
                               scaling=0.25, dropout=0.5)
        output_projection = Linear(in_features=hopfield.output_size * instances, out_features=1)
        return Sequential(hopfield, Flatten(), output_projection, Flatten(start_dim=0))
    if name == "pooling":
        hopfield_pooling = hf.HopfieldPooling(input_size=size)
        output_projection = Linear(in_features=hopfield_pooling.output_size, out_features=1)
        return Sequential(hopfield_pooling, output_projection, Flatten(start_dim=0))
    if name == "pooling_adapted":
        hopfield_pooling = hf.HopfieldPooling(input_size=size, hidden_size=8, num_heads=8,
                                              update_steps_max=3, scaling=0.25, dropout=0.5)
        output_projection = Linear(in_features=hopfield_pooling.output_size, out_features=1)
        return Sequential(hopfield_pooling, output_projection, Flatten(start_dim=0))
    if name == "lookup":
        hopfield_lookup = hf.HopfieldLayer(input_size=size, quantity=len(unique))
    else:  # lookup_adapted
        extra = dict(normalize_stored_pattern_affine=True,
                     normalize_pattern_projection_affine=True) if demo == "bit_pattern" else {}
        hopfield_lookup = hf.HopfieldLayer(input_size=size, quantity=len(unique),
                                           lookup_weights_as_separated=True,
                                           lookup_targets_as_trainable=False, **extra)
        with torch.no_grad():
            hopfield_lookup.lookup_weights[:] = unique.unsqueeze(dim=0)
    output_projection = Linear(in_features=hopfield_lookup.output_size * instances,
                               out_features=1)
    return Sequential(hopfield_lookup, Flatten(start_dim=1), output_projection,
                      Flatten(start_dim=0))


def train_step(network, optimiser, data, target):
    """The notebooks' ``train_epoch`` body for one batch."""
    model_output = network.forward(input=data)
    optimiser.zero_grad()
    loss = binary_cross_entropy_with_logits(input=model_output, target=target, reduction=r'mean')
    loss.backward()
    clip_grad_norm_(parameters=network.parameters(), max_norm=1.0, norm_type=2)
    optimiser.step()
    return loss.detach()


def batches(demo):
    size, instances = DEMOS[demo]
    gen = torch.Generator().manual_seed(7)
    data = torch.randint(0, 2, (2, 4, instances, size), generator=gen).float()
    target = torch.randint(0, 2, (2, 4), generator=gen).float()
    unique = data.view(-1, size).unique(dim=0)
    return list(zip(data, target)), unique


NAMES = ["hopfield", "hopfield_adapted", "pooling", "pooling_adapted", "lookup", "lookup_adapted"]


@pytest.mark.parametrize("demo", sorted(DEMOS))
@pytest.mark.parametrize("name", NAMES)
def test_demo_section_runs_with_the_import_changed(demo, name):
    hf = types.SimpleNamespace(Hopfield=energy_attn.Hopfield,
                               HopfieldPooling=energy_attn.HopfieldPooling,
                               HopfieldLayer=energy_attn.HopfieldLayer)
    data, unique = batches(demo)
    torch.manual_seed(42)
    network = section(hf, demo, name, unique)
    optimiser = AdamW(params=network.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in network.parameters()]
    network.train()
    for x, y in data:
        assert torch.isfinite(train_step(network, optimiser, x, y))
    assert any(not torch.equal(a, p) for a, p in zip(before, network.parameters()))
    network.eval()
    with torch.no_grad():
        out = network.forward(input=data[0][0])
    assert out.shape == data[0][1].shape and torch.isfinite(out).all()

    hflayers = _hflayers()
    if hflayers is None:
        return  # the comparison below needs hflayers itself
    torch.manual_seed(42)
    ours = section(hf, demo, name, unique)
    torch.manual_seed(42)
    theirs = section(hflayers, demo, name, unique)
    exported = hflayers_state_dict(ours)  # the notebook's set_seed() gives the same network
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(exported[key], value, atol=0, rtol=0, msg=key)
    ours.eval(), theirs.eval()  # no dropout: the two draw different masks
    atol, rtol = tol(torch.float32)
    x, y = data[0]
    torch.testing.assert_close(ours(x), theirs(x), atol=atol, rtol=rtol)
    for net in (ours, theirs):
        loss = binary_cross_entropy_with_logits(input=net.forward(input=x), target=y)
        loss.backward()
    # gradients at the scale of the largest one (AdamW would turn rounding-level differences of
    # near-zero gradients into steps of ±lr, so parameters after a step are not compared)
    got = _grads_by_hflayers_name(ours)
    want = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    g_atol = atol * max(g.abs().max().item() for g in want.values())
    # While the three input LayerNorms are equal (at initialisation), hflayers' torch.equal
    # shortcuts project the normalised state (or stored) pattern for the keys and values too, so
    # their gradients all land on norm_state_pattern (norm_stored_pattern): the forward is the
    # same, and only the sum over the three LayerNorms is comparable.
    norms = ("norm_stored_pattern", "norm_state_pattern", "norm_pattern_projection")
    compared = 0
    for key in sorted(set(got) | set(want)):
        prefix, _, leaf = key.rpartition(".")
        base, _, module = prefix.rpartition(".")
        if module in norms:
            if module != norms[0]:
                continue
            base = f"{base}." if base else ""
            pair = [sum(g.get(f"{base}{n}.{leaf}", 0) for n in norms) for g in (got, want)]
        else:
            pair = [got[key], want.get(key, torch.zeros_like(got[key]))]
        torch.testing.assert_close(*pair, atol=g_atol, rtol=rtol, msg=lambda m, k=key: f"{k}: {m}")
        compared += 1
    assert compared >= 4
