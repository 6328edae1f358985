import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from energy_attn import GPT, GPTConfig

BLOCKS = ["mha", "momen", "nag", "2nd1st", "light2nd1st"]


def tiny(**kw):
    cfg = dict(vocab_size=31, n_layer=2, n_head=2, d_model=16, context=12)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("attention", ["softmax", "energy"])
def test_gpt_is_causal_and_loss_is_cross_entropy(block, attention):
    model = tiny(block=block, attention=attention, num_steps=2, step_size=0.5).double().eval()
    idx = torch.randint(0, 31, (2, 12))
    logits, loss = model(idx, idx.roll(-1, 1))
    assert logits.shape == (2, 12, 31) and loss.ndim == 0
    # float64 stays float64 (16-bit logits: float32), as the module's own reductions do
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 31),
                                                     idx.roll(-1, 1).reshape(-1)))
    t = 5
    idx2 = idx.clone()
    idx2[:, t + 1:] = (idx2[:, t + 1:] + 1) % 31
    logits2, _ = model(idx2)
    torch.testing.assert_close(logits2[:, : t + 1], logits[:, : t + 1], atol=0, rtol=0)
    assert not torch.allclose(logits2[:, t + 1:], logits[:, t + 1:])


def test_init_loss_is_near_uniform_and_parameters_are_counted_once():
    model = tiny(vocab_size=97, d_model=32, n_layer=3)
    idx = torch.randint(0, 97, (4, 12))
    _, loss = model(idx, torch.randint(0, 97, (4, 12)))
    assert abs(loss.item() - math.log(97)) < 0.1  # small init: near-uniform predictions
    assert model.lm_head.weight is model.wte.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_parameters() == sum(unique.values())
    assert model.num_parameters(non_embedding=True) == (
        model.num_parameters() - 97 * 32 - 12 * 32)
    # per layer: qkv + out + 2 LN + FFN (4x) with biases
    d = 32
    per_layer = ((3 * d * d + 3 * d) + (d * d + d) + 2 * 2 * d + (4 * d * d + 4 * d)
                 + (4 * d * d + d))
    assert model.num_parameters(non_embedding=True) == 3 * per_layer + 2 * d


def test_16bit_loss_is_float32():
    model = tiny().bfloat16()
    idx = torch.randint(0, 31, (2, 12))
    logits, loss = model(idx, idx)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 31).float(),
                                                     idx.reshape(-1)), atol=0, rtol=0)


def test_targets_minus_one_are_ignored():
    model = tiny()
    idx = torch.randint(0, 31, (2, 12))
    tgt = idx.clone()
    tgt[:, :6] = -1
    logits, loss = model(idx, tgt)
    torch.testing.assert_close(loss, F.cross_entropy(logits[:, 6:].reshape(-1, 31),
                                                     tgt[:, 6:].reshape(-1)))


@pytest.mark.parametrize("block", ["mha", "nag", "light2nd1st"])
def test_a_few_adam_steps_fit_a_fixed_batch(block):
    torch.manual_seed(0)
    model = tiny(block=block)
    idx = torch.randint(0, 31, (4, 12))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_generate():
    model = tiny().eval()
    idx = torch.randint(0, 31, (3, 4))
    out = model.generate(idx, 10, top_k=1)
    assert out.shape == (3, 14) and torch.equal(out[:, :4], idx)
    # greedy (top_k=1) equals argmax decoding, and runs past the context by cropping
    x = idx
    for _ in range(10):
        x = torch.cat([x, model(x[:, -12:])[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, x)
    sampled = model.generate(idx, 5, temperature=0.7, top_k=3)
    assert sampled.shape == (3, 9) and sampled.max() < 31


def test_bad_inputs():
    with pytest.raises(ValueError, match="block"):
        GPTConfig(block="adam")
    with pytest.raises(TypeError, match="n_layer"):
        GPTConfig(n_layer=2.0)
    with pytest.raises(ValueError, match="n_head"):
        tiny(d_model=15)
    with pytest.raises(TypeError, match="config"):
        GPT(dict(vocab_size=3))
    model = tiny()
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(TypeError, match="idx"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), 2, temperature=0.0)



@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(dropout=1.5), ValueError, "dropout"),
        (dict(dropout=-0.1), ValueError, "dropout"),
        (dict(attention="x"), ValueError, "attention"),
        (dict(mlp_ratio=0), ValueError, "mlp_ratio"),
        (dict(num_steps=0), ValueError, "num_steps"),
        (dict(step_size=-1.0), ValueError, "step_size"),
        (dict(optimizer="adam"), ValueError, "optimizer"),
    ],
)
def test_bad_config_fails_at_construction(kw, exc, match):
    with pytest.raises(exc, match=match):
        GPTConfig(**kw)  # not only later, at GPT(config)


def test_bad_tokens_and_targets_are_named():
    model = tiny()
    idx = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(TypeError, match="idx"):
        model.generate(torch.zeros(2, dtype=torch.long), 2)  # was an IndexError
    with pytest.raises(ValueError, match="idx"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="targets"):
        model(idx, torch.zeros(2, 4))  # was a RuntimeError from cross_entropy
    with pytest.raises(TypeError, match="targets"):
        model(idx, idx.int())
    with pytest.raises(ValueError, match="targets"):
        model(idx, idx.flatten())
    V = model.config.vocab_size
    with pytest.raises(ValueError, match="idx"):  # was an IndexError from the embedding
        model(torch.full((2, 4), V, dtype=torch.long))
    with pytest.raises(ValueError, match="idx"):
        model(torch.full((2, 4), -1, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model(idx, torch.full((2, 4), V, dtype=torch.long))
    ignored = torch.full((2, 4), -1, dtype=torch.long)
    ignored[:, 0] = V - 1
    assert torch.isfinite(model(idx, ignored)[1])  # -1 = ignored, V - 1 is the last token


@pytest.mark.parametrize("block", ["mha", "momen", "nag", "2nd1st", "light2nd1st"])
def test_every_parameter_gets_a_gradient(block):
    # DDP (find_unused_parameters=False, the default) needs every parameter in the graph; the
    # first momentum block's ρ multiplies m_{−1} = 0 and must still be used (zero gradient).
    model = GPT(GPTConfig(n_layer=2, n_head=2, d_model=16, context=8, block=block))
    idx = torch.randint(0, 256, (2, 8))
    _, loss = model(idx, targets=idx)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_weights_stay_tied_after_loading_with_assign():
    # load_state_dict(assign=True) (the fast way to load into a model built on the meta device)
    # assigned wte and lm_head two Parameters: num_parameters counted the matrix twice and an
    # optimizer kept two sets of moments for it.
    model = tiny()
    with torch.device("meta"):
        loaded = tiny()
    loaded.load_state_dict(model.state_dict(), assign=True)
    assert loaded.lm_head.weight is loaded.wte.weight
    assert loaded.num_parameters() == model.num_parameters()
    loaded = pickle.loads(pickle.dumps(loaded.double()))  # the hook keeps it picklable
    assert loaded.lm_head.weight is loaded.wte.weight
    idx = torch.randint(0, 31, (2, 12))
    torch.testing.assert_close(loaded(idx)[0], model.double()(idx)[0], atol=0, rtol=0)
