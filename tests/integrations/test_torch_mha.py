import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from energy_attn import hopfield_descent
from energy_attn.integrations import EnergyMultiheadAttention, swap_attention

E, H, B, L, S = 8, 2, 3, 5, 6
TOL = {"atol": 16 * torch.finfo(torch.float32).eps, "rtol": 16 * torch.finfo(torch.float32).eps}
CONFIGS = {
    "default": {},
    "kdim_vdim": {"kdim": 5, "vdim": 7},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
    "no_bias": {"bias": False},
}


def pair(batch_first, num_steps=1, **config):
    ref = nn.MultiheadAttention(E, H, batch_first=batch_first, **config)
    energy = EnergyMultiheadAttention(E, H, batch_first=batch_first, num_steps=num_steps, **config)
    energy.load_state_dict(ref.state_dict())  # same keys, strict
    return ref, energy


def inputs(batch_first, kdim=E, vdim=E, batch=B):
    q, k, v = torch.randn(L, batch, E), torch.randn(S, batch, kdim), torch.randn(S, batch, vdim)
    return tuple(t.transpose(0, 1) for t in (q, k, v)) if batch_first else (q, k, v)


def mask_kinds():
    """Every nn.MultiheadAttention mask kind, no row fully masked (nn.MHA gives NaN there)."""
    kpm = torch.rand(B, S) < 0.4
    kpm[:, 0] = False
    am = torch.rand(L, S) < 0.4
    am[:, 0] = False
    am3 = torch.rand(B * H, L, S) < 0.4
    am3[..., 0] = False
    causal = nn.Transformer.generate_square_subsequent_mask(L)  # float, -inf above diagonal
    return {
        "none": {},
        "key_padding_bool": {"key_padding_mask": kpm},
        "key_padding_float": {"key_padding_mask": torch.zeros(B, S).masked_fill(kpm, -torch.inf)},
        "attn_bool_2d": {"attn_mask": am},
        "attn_bool_3d": {"attn_mask": am3},
        "attn_float_bias": {"attn_mask": torch.randn(L, S)},  # finite additive logits
        "attn_and_padding": {"attn_mask": am, "key_padding_mask": kpm},
        "causal_hint": {"attn_mask": causal[:, :S] if S == L else F.pad(causal, (0, S - L)),
                            "is_causal": False},
    }


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_num_steps_1_is_nn_multihead_attention(batch_first, config):
    kw = CONFIGS[config]
    ref, energy = pair(batch_first, **kw)
    q, k, v = inputs(batch_first, kw.get("kdim", E), kw.get("vdim", E))
    for mask_name, masks in mask_kinds().items():
        for need_weights, average in ((False, True), (True, True), (True, False)):
            args = dict(need_weights=need_weights, average_attn_weights=average, **masks)
            out_ref, w_ref = ref(q, k, v, **args)
            out, w = energy(q, k, v, **args)
            msg = f"{mask_name}, need_weights={need_weights}, average={average}"
            torch.testing.assert_close(out, out_ref, **TOL, msg=msg)
            if need_weights:
                torch.testing.assert_close(w, w_ref, **TOL, msg=msg)
            else:
                assert w is None and w_ref is None


def test_unbatched_and_causal_flag_match_nn_multihead_attention():
    ref, energy = pair(batch_first=True)
    x = torch.randn(L, E)  # unbatched [L, E]
    for need_weights in (False, True):
        torch.testing.assert_close(energy(x, x, x, need_weights=need_weights)[0],
                                   ref(x, x, x, need_weights=need_weights)[0], **TOL)
    # is_causal alone means "causal" here (nn.MultiheadAttention needs the mask as well).
    x = torch.randn(B, L, E)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    expected, _ = ref(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    torch.testing.assert_close(energy(x, x, x, is_causal=True, need_weights=False)[0], expected,
                               **TOL)
    torch.testing.assert_close(energy(x, x, x, is_causal=True)[0], expected, **TOL)


@pytest.mark.parametrize("num_steps", [1, 3])
@pytest.mark.parametrize("need_weights", [False, True])
def test_fully_masked_rows_are_finite(num_steps, need_weights):
    ref, energy = pair(batch_first=True, num_steps=num_steps)
    q, k, v = inputs(batch_first=True)
    am = torch.rand(L, S) < 0.4
    am[:, 0] = False
    am[2] = True  # query 2 may attend nothing
    out, w = energy(q, k, v, attn_mask=am, need_weights=need_weights)
    assert out.isfinite().all()
    # The empty row reads out 0: only the output bias is left.
    torch.testing.assert_close(out[:, 2], energy.out_proj.bias.expand(B, E))
    if need_weights:
        assert w.isfinite().all() and (w[:, 2] == 0).all()
    if num_steps == 1:
        out_ref, _ = ref(q, k, v, attn_mask=am, need_weights=need_weights)
        rows = torch.arange(L) != 2
        torch.testing.assert_close(out[:, rows], out_ref[:, rows], **TOL)


@pytest.mark.parametrize("optimizer,momentum", [("gd", 0.0), ("nesterov", 0.5)])
def test_semantics_are_descent_then_read_out(optimizer, momentum):
    """num_steps=T: T-1 hopfield_descent steps of the projected queries, then softmax(.)V."""
    energy = EnergyMultiheadAttention(E, H, batch_first=True, num_steps=3, step_size=0.7,
                                      optimizer=optimizer, momentum=momentum, scale=0.8)
    q_in, k_in, v_in = inputs(batch_first=True)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, -2:] = True
    w_q, w_k, w_v = energy.in_proj_weight.chunk(3)
    b_q, b_k, b_v = energy.in_proj_bias.chunk(3)

    def heads(x, w, b):  # [B, n, E] -> [B, H, n, D]
        return F.linear(x, w, b).unflatten(-1, (H, -1)).transpose(1, 2)

    q, k, v = heads(q_in, w_q, b_q), heads(k_in, w_k, b_k), heads(v_in, w_v, b_v)
    allowed = ~kpm[:, None, None, :]
    xi = hopfield_descent(q, k, scale=0.8, step_size=0.7, num_steps=2, mask=allowed,
                          optimizer=optimizer, momentum=momentum)
    o = F.scaled_dot_product_attention(xi, k, v, attn_mask=allowed, scale=0.8)
    expected = energy.out_proj(o.transpose(1, 2).flatten(2))
    out, _ = energy(q_in, k_in, v_in, key_padding_mask=kpm, need_weights=False)
    torch.testing.assert_close(out, expected, **TOL)
    plain, _ = nn.MultiheadAttention.forward(energy, q_in, k_in, v_in, key_padding_mask=kpm)
    assert (out - plain).abs().max() > 1e-3  # the descent did something


def test_masked_keys_are_invisible_to_the_descent():
    energy = EnergyMultiheadAttention(E, H, batch_first=True, num_steps=4, optimizer="momentum",
                                      momentum=0.5)
    q, k, v = inputs(batch_first=True)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[:, -2:] = True
    out, w = energy(q, k, v, key_padding_mask=kpm)
    k2, v2 = k.clone(), v.clone()
    k2[:, -2:], v2[:, -2:] = 100.0, -100.0
    out2, _ = energy(q, k2, v2, key_padding_mask=kpm)
    torch.testing.assert_close(out, out2, **TOL)
    assert (w[..., -2:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tracks_float64(dtype):
    """The error in a low-precision dtype is of the order of that dtype's rounding."""
    ref = EnergyMultiheadAttention(E, H, batch_first=True, num_steps=3, step_size=0.5).double()
    low = copy.deepcopy(ref).to(dtype)
    q, k, v = (t.double() for t in inputs(batch_first=True))
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, -3:] = True
    expected, _ = ref(q, k, v, key_padding_mask=kpm, need_weights=False)
    out, _ = low(q.to(dtype), k.to(dtype), v.to(dtype), key_padding_mask=kpm, need_weights=False)
    assert out.dtype == dtype and out.isfinite().all()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), expected, atol=4 * eps, rtol=4 * eps)  # seen: < 1 eps


def test_gradients_flow_to_every_parameter():
    energy = EnergyMultiheadAttention(E, H, num_steps=3, add_bias_kv=True, kdim=5, vdim=7)
    q, k, v = inputs(batch_first=False, kdim=5, vdim=7)
    energy(q, k, v)[0].square().sum().backward()
    for name, p in energy.named_parameters():
        assert p.grad is not None and p.grad.isfinite().all() and p.grad.abs().sum() > 0, name


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="num_steps"):
        EnergyMultiheadAttention(E, H, num_steps=0)
    with pytest.raises(ValueError, match="optimizer"):
        EnergyMultiheadAttention(E, H, optimizer="adam")
    with pytest.raises(ValueError, match="step_size"):
        EnergyMultiheadAttention(E, H, step_size=float("nan"))
    energy = EnergyMultiheadAttention(E, H, batch_first=True)
    q, k, v = inputs(batch_first=True)
    with pytest.raises(ValueError, match="key_padding_mask"):
        energy(q, k, v, key_padding_mask=torch.zeros(B, S + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        energy(q, k, v, attn_mask=torch.zeros(L + 1, S, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask"):
        energy(q, k, v, attn_mask=torch.zeros(L, S, dtype=torch.long))
    with pytest.raises(ValueError, match="query"):
        energy(torch.randn(B, L, E + 1), k, v)
    with pytest.raises(TypeError, match="query"):
        energy(q.long(), k, v)
    with pytest.raises(ValueError, match="is_causal"):
        energy(q, k, v, is_causal=True)  # L != S and no mask
    with pytest.raises(TypeError, match="attn_mask"):
        energy(q, k, v, attn_mask=[[0]])
    with pytest.raises(TypeError, match="key_padding_mask"):
        energy(q, k, v, key_padding_mask=[[False] * S] * B)
    with pytest.raises(TypeError, match="key_padding_mask"):
        energy(q[0], k[0], v[0], key_padding_mask=[False] * S)  # unbatched
    with pytest.raises(ValueError, match="embed_dim.*num_heads"):
        EnergyMultiheadAttention(10, 3)
    with pytest.raises(ValueError, match="num_heads"):
        EnergyMultiheadAttention(8, 0)
    with pytest.raises(TypeError, match="embed_dim"):
        EnergyMultiheadAttention(8.0, 2)


# --- swap_attention -------------------------------------------------------------------------

def encoder(batch_first=True):
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0,
                                       batch_first=batch_first)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


@pytest.mark.parametrize("mode", ["train", "eval_no_grad"])
def test_swap_on_transformer_encoder(mode):
    """Identical at num_steps=1; different but finite at 3 (in eval + no_grad too, where
    nn.TransformerEncoderLayer's fast path would skip a plain MHA's forward)."""
    model = encoder()
    model.train(mode == "train")
    x = torch.randn(B, L, E)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[0, -2:] = True
    ctx = torch.no_grad() if mode == "eval_no_grad" else torch.enable_grad()
    with ctx:
        expected = model(x, src_key_padding_mask=kpm)
        params = {n: p for n, p in model.named_parameters()}
        same, report = swap_attention(copy.deepcopy(model), num_steps=1, return_report=True)
        assert report == ["layers.0.self_attn", "layers.1.self_attn"]
        torch.testing.assert_close(same(x, src_key_padding_mask=kpm), expected, **TOL)
        swap_attention(model, num_steps=3, step_size=0.5)
        assert all(isinstance(m.self_attn, EnergyMultiheadAttention) for m in model.layers)
        assert all(p is params[n] for n, p in model.named_parameters())  # weights carried
        out = model(x, src_key_padding_mask=kpm)
    assert out.isfinite().all()
    assert (out - expected).abs().max() > 1e-3


def test_swap_trains():
    torch.manual_seed(0)
    model = swap_attention(nn.Sequential(encoder(), nn.Linear(E, 1)), num_steps=3, step_size=0.5)
    x, y = torch.randn(16, L, E), torch.randn(16, L, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("config", CONFIGS)
def test_from_mha_shares_parameters_for_every_config(config):
    kw = CONFIGS[config]
    mha = nn.MultiheadAttention(E, H, dropout=0.1, **kw).eval()
    energy = EnergyMultiheadAttention.from_mha(mha, num_steps=1)
    assert not energy.training and energy.dropout == 0.1
    assert [n for n, _ in energy.named_parameters()] == [n for n, _ in mha.named_parameters()]
    assert all(a is b for a, b in zip(energy.parameters(), mha.parameters()))
    q, k, v = inputs(False, kw.get("kdim", E), kw.get("vdim", E))
    torch.testing.assert_close(energy(q, k, v)[0], mha(q, k, v)[0], **TOL)


def test_swap_edge_cases():
    mha = nn.MultiheadAttention(E, H)
    new, report = swap_attention(mha, num_steps=2, return_report=True)
    assert isinstance(new, EnergyMultiheadAttention) and report == [""]
    assert new.in_proj_weight is mha.in_proj_weight
    shared = nn.ModuleDict({"a": mha, "b": mha})
    swap_attention(shared)
    assert shared["a"] is shared["b"] and isinstance(shared["a"], EnergyMultiheadAttention)
    _, report = swap_attention(shared, return_report=True)
    assert report == []  # already energy attention: left alone
    with pytest.raises(TypeError):
        swap_attention(mha, num_stepz=2)
    with pytest.raises(ValueError, match="num_steps"):
        swap_attention(nn.Linear(2, 2), num_steps=0)


def test_swap_keeps_frozen_parameters_frozen():
    """Fine-tuning setups freeze parameters; the swap leaves every requires_grad as it was (on
    the original module too: the parameters are the same objects)."""
    mha = nn.MultiheadAttention(E, H, add_bias_kv=True)
    mha.in_proj_weight.requires_grad_(False)
    mha.bias_k.requires_grad_(False)
    frozen = {n: p.requires_grad for n, p in mha.named_parameters()}
    (energy,) = swap_attention(nn.ModuleList([mha]), num_steps=2)
    assert {n: p.requires_grad for n, p in mha.named_parameters()} == frozen
    assert {n: p.requires_grad for n, p in energy.named_parameters()} == frozen
    energy(*inputs(batch_first=False))[0].square().sum().backward()
    assert energy.in_proj_weight.grad is None and energy.bias_k.grad is None
    assert energy.in_proj_bias.grad is not None


def test_swap_takes_over_a_wrapped_out_proj():
    """A parametrization (weight norm) or hooks on out_proj survive the swap."""
    mha = nn.MultiheadAttention(E, H)
    nn.utils.parametrizations.weight_norm(mha.out_proj)
    seen = []
    mha.out_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    q, k, v = inputs(batch_first=False)
    expected, _ = mha(q, k, v)
    energy = swap_attention(mha, num_steps=1)
    assert energy.out_proj is mha.out_proj
    seen.clear()  # (nn.MultiheadAttention itself reads out_proj's weights, not its forward)
    out, _ = energy(q, k, v)
    torch.testing.assert_close(out, expected, **TOL)
    assert seen == [(B, L, E)]  # the hook still runs


def test_from_mha_rejects_subclasses_with_other_parameters():
    quantizable = torch.ao.nn.quantizable.MultiheadAttention(E, H)
    with pytest.raises(TypeError, match="mha.*quantizable.*linear_Q"):
        EnergyMultiheadAttention.from_mha(quantizable)


def test_swap_walks_a_large_model_a_fixed_number_of_times():
    """Once per swap, not once per module (that was quadratic: ~10 s at 4000 modules)."""
    class Counting(nn.Sequential):
        walks = 0

        def named_modules(self, *args, **kwargs):
            Counting.walks += 1
            return super().named_modules(*args, **kwargs)

    model = Counting(*[nn.Sequential(nn.Linear(2, 2), nn.ReLU()) for _ in range(50)], encoder())
    _, report = swap_attention(model, return_report=True)
    assert report == ["50.layers.0.self_attn", "50.layers.1.self_attn"]
    assert not model[50].use_nested_tensor
    assert Counting.walks <= 2
