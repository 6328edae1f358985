"""Float masks in the drop-in adapters act in every descent step (docs/math.md §1).

A ``−1e4`` / ``−1e9`` entry next to a visible key gets softmax weight ``exp(−1e4 + Δ)`` = exactly
0 in float32 (as in ``nn.MultiheadAttention``), in every step; so the gradient of an output
with respect to a key it may not see is exactly 0 for every value users write for "blocked".
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from energy_attn.integrations import EnergyMultiheadAttention, swap_attention

OPTS = [("gd", 0.0), ("momentum", 0.6), ("nesterov", 0.6), ("newton_2nd1st", 0.0),
        ("newton_light", 0.0)]
BLOCKING = ["-1e4", "-1e9", "-inf", "finfo.min"]
TOL = {"atol": 16 * torch.finfo(torch.float32).eps, "rtol": 16 * torch.finfo(torch.float32).eps}


def causal_float_mask(L, value):
    v = torch.finfo(torch.float32).min if value == "finfo.min" else float(value)
    return torch.zeros(L, L).masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), v)


def test_the_issue_case_minus_1e9_causal_mask_is_causal_in_every_step():
    """E=8, H=2, L=4, sequence-first, [L, L] −1e9 above the diagonal: ∂out_1/∂x_{2,3} = 0."""
    torch.manual_seed(0)
    E, H, L = 8, 2, 4
    mha = EnergyMultiheadAttention(E, H, num_steps=3)
    x = torch.randn(L, 1, E)  # sequence first
    mask = causal_float_mask(L, "-1e9")
    jac = torch.autograd.functional.jacobian(
        lambda x: mha(x, x, x, attn_mask=mask, need_weights=False)[0][1], x)  # [1, E, L, 1, E]
    assert (jac[:, :, 2:] == 0).all()
    assert jac[:, :, :2].abs().max() > 0  # it does depend on the tokens it may see


@pytest.mark.parametrize("value", BLOCKING)
@pytest.mark.parametrize("num_steps", [1, 3])
@pytest.mark.parametrize("optimizer,rho", OPTS)
def test_no_output_depends_on_a_future_or_padded_token(value, num_steps, optimizer, rho):
    E, H, L, B = 8, 2, 5, 2
    mha = EnergyMultiheadAttention(E, H, num_steps=num_steps, batch_first=True,
                                   optimizer=optimizer, momentum=rho, step_size=0.7)
    mask = causal_float_mask(L, value)
    x = torch.randn(B, L, E)
    jac = torch.autograd.functional.jacobian(
        lambda x: mha(x, x, x, attn_mask=mask, need_weights=False)[0], x)  # [B, L, E, B, L, E]
    for i in range(L - 1):
        assert (jac[:, i, :, :, i + 1:] == 0).all(), (value, i)
    # float key padding: the padded keys/values never reach any output
    blocked = float(causal_float_mask(2, value)[0, 1])
    kpm = torch.zeros(B, L).masked_fill(torch.arange(L) >= 3, blocked)
    kv = torch.randn(B, L, E)
    jac = torch.autograd.functional.jacobian(
        lambda kv: mha(x, kv, kv, key_padding_mask=kpm, need_weights=False)[0], kv)
    assert (jac[..., 3:, :] == 0).all() and jac[..., :3, :].abs().max() > 0
    # and a finite blocking value acts exactly as a boolean block would
    boolean = ~torch.ones(L, L, dtype=torch.bool).tril()
    torch.testing.assert_close(mha(x, x, x, attn_mask=mask)[0],
                               mha(x, x, x, attn_mask=boolean)[0], **TOL)


@pytest.mark.parametrize("value", BLOCKING + ["random"])
def test_num_steps_1_equals_nn_multihead_attention_for_float_masks(value):
    E, H, L, B = 8, 2, 5, 3
    ref = nn.MultiheadAttention(E, H)
    energy = EnergyMultiheadAttention(E, H, num_steps=1)
    energy.load_state_dict(ref.state_dict())
    x = torch.randn(L, B, E)
    mask = torch.randn(L, L) if value == "random" else causal_float_mask(L, value)
    kpm = torch.zeros(B, L)
    kpm[0, -2:] = -1e4
    for kw in ({"attn_mask": mask}, {"attn_mask": mask, "key_padding_mask": kpm}):
        out_ref, w_ref = ref(x, x, x, **kw)
        out, w = energy(x, x, x, **kw)
        torch.testing.assert_close(out, out_ref, **TOL)
        torch.testing.assert_close(w, w_ref, **TOL)


@pytest.mark.parametrize("value", ["-1e9", "-inf"])
def test_swapped_transformer_is_causal_with_float_masks(value):
    E, L = 8, 5
    layer = nn.TransformerEncoderLayer(E, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = swap_attention(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                           num_steps=3, optimizer="nesterov", momentum=0.5).eval()
    mask = causal_float_mask(L, value)
    x = torch.randn(1, L, E)
    jac = torch.autograd.functional.jacobian(lambda x: model(x, mask=mask), x)  # [1,L,E,1,L,E]
    for i in range(L - 1):
        assert (jac[:, i, :, :, i + 1:] == 0).all(), i


def test_hugging_face_user_4d_float_mask_acts_in_every_step():
    pytest.importorskip("transformers")
    from energy_attn.integrations.huggingface import make_attention_function  # noqa: PLC0415

    B, H, Hk, N, D = 2, 4, 2, 5, 8
    attend = make_attention_function(num_steps=3, optimizer="newton_2nd1st")
    q = torch.randn(B, H, N, D)
    k = torch.randn(B, Hk, N, D, requires_grad=True)
    v = torch.randn(B, Hk, N, D)
    for value in BLOCKING:
        mask = causal_float_mask(N, value).expand(B, 1, N, N)  # a user's 4-D additive mask
        out, _ = attend(None, q, k, v, mask)  # [B, N, H, D]
        for i in range(N - 1):
            (g,) = torch.autograd.grad(out[:, i].sum(), k, retain_graph=True)
            assert (g[:, :, i + 1:] == 0).all(), (value, i)


@settings(max_examples=20, deadline=None)
@given(L=st.integers(1, 5), S=st.integers(1, 6), H=st.sampled_from([1, 2]),
       T=st.integers(1, 3), optimizer=st.sampled_from([o for o, _ in OPTS]),
       batch_first=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fuzz_no_output_depends_on_a_key_its_float_mask_blocks(L, S, H, T, optimizer,
                                                               batch_first, seed):
    """Random float masks mixing small biases with every blocking value users write: the
    output of query i never depends on key/value j where mask[i, j] <= -1e4."""
    torch.manual_seed(seed)  # the example's data is a function of the example
    E, B = 4 * H, 2
    rho = 0.5 if optimizer in ("momentum", "nesterov") else 0.0
    mha = EnergyMultiheadAttention(E, H, num_steps=T, optimizer=optimizer, momentum=rho,
                                   step_size=0.6, batch_first=batch_first)
    values = torch.tensor([-1e4, -1e9, float("-inf"), torch.finfo(torch.float32).min])
    mask = 0.5 * torch.randn(L, S)
    blocked = torch.rand(L, S) < 0.5
    blocked[torch.arange(L), torch.randint(0, S, (L,))] = False  # each query sees a key
    mask[blocked] = values[torch.randint(0, 4, (int(blocked.sum()),))]
    x = torch.randn(B, L, E) if batch_first else torch.randn(L, B, E)
    kv = torch.randn(B, S, E) if batch_first else torch.randn(S, B, E)
    jac = torch.autograd.functional.jacobian(
        lambda kv: mha(x, kv, kv, attn_mask=mask, need_weights=False)[0], kv)
    if not batch_first:  # [L, B, E, S, B, E] -> [B, L, E, B, S, E]
        jac = jac.permute(1, 0, 2, 4, 3, 5)
    assert jac.isfinite().all()
    for i, j in blocked.nonzero().tolist():
        assert (jac[:, i, :, :, j] == 0).all(), (i, j, mask[i, j].item())


def test_hugging_face_model_with_a_user_4d_float_mask_is_causal_in_every_step():
    transformers = pytest.importorskip("transformers")
    from energy_attn.integrations.huggingface import register  # noqa: PLC0415

    register("energy_float_mask_test", num_steps=3, step_size=0.5)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                   initializer_range=0.3)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="energy_float_mask_test").eval()
    N = 6
    mask = causal_float_mask(N, "-1e9").expand(2, 1, N, N)  # the user's own additive 4-D mask
    emb = model.get_input_embeddings()(torch.randint(1, 64, (2, N))).detach().requires_grad_()
    logits = model(inputs_embeds=emb, attention_mask=mask).logits
    for i in range(N - 1):
        (g,) = torch.autograd.grad(logits[:, i].sum(), emb, retain_graph=True)
        assert (g[:, i + 1:] == 0).all() and g[:, :i + 1].abs().max() > 0, i


@pytest.mark.parametrize("value", ["-inf", "finfo.min"])
@pytest.mark.parametrize("num_steps", [1, 3])
def test_float_masks_fully_blocked_rows_read_out_zero(value, num_steps):
    E, H, L, B = 8, 2, 4, 2
    mha = EnergyMultiheadAttention(E, H, num_steps=num_steps, batch_first=True)
    mask = torch.randn(L, L)
    mask[2] = float(causal_float_mask(2, value)[0, 1])  # query 2 may attend nothing
    x = torch.randn(B, L, E, requires_grad=True)
    out, w = mha(x, x, x, attn_mask=mask)
    assert out.isfinite().all() and w.isfinite().all() and (w[:, 2] == 0).all()
    torch.testing.assert_close(out[:, 2], mha.out_proj.bias.expand(B, E))
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g.isfinite().all()
