"""Energy attention inside tiny, randomly initialised Hugging Face models (built offline)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the [hf] extra; installed by [test]

from energy_attn.integrations.huggingface import make_attention_function, register  # noqa: E402

VOCAB, N = 64, 9
TOL = {"atol": 64 * torch.finfo(torch.float32).eps, "rtol": 16 * torch.finfo(torch.float32).eps}


def gpt2():
    return transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2,
                                   n_head=2, bos_token_id=0, eos_token_id=0,
                                   initializer_range=0.3)


def llama():  # grouped-query attention: 4 query heads share 2 key/value heads
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=32,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                    initializer_range=0.3)


CONFIGS = {"gpt2": gpt2, "llama": llama}


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register("energy", num_steps=3, step_size=0.5)
    register("energy_T1", num_steps=1)


def build(name, attn="energy"):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation=attn)
    return model.eval()


def left_padded(batch=3):  # rows: full, 3 pads, a single real token
    ids = torch.randint(1, VOCAB, (batch, N))
    mask = torch.ones(batch, N, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :N - 1] = 0  # a single real token
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids


@pytest.mark.parametrize("name", CONFIGS)
def test_num_steps_1_equals_sdpa(name):
    model = build(name, "sdpa")
    ids, mask, pos = left_padded()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, position_ids=pos).logits
        model.set_attn_implementation("energy_T1")
        out = model(ids, attention_mask=mask, position_ids=pos).logits
        model.set_attn_implementation("energy")
        energy = model(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], expected[real], **TOL)
    assert energy.isfinite().all()
    assert (energy[real] - expected[real]).abs().max() > 1e-3  # T=3 really is different


@pytest.mark.parametrize("name", CONFIGS)
def test_future_tokens_never_change_past_logits(name):
    model = build(name)
    ids = torch.randint(1, VOCAB, (2, N))
    changed = ids.clone()
    changed[:, 5:] = torch.randint(1, VOCAB, (2, N - 5))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :5], b[:, :5], **TOL)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", CONFIGS)
def test_padding_masks_are_respected(name):
    """A left-padded row equals the same sequence alone, whatever the padding tokens are."""
    model = build(name)
    ids, mask, pos = left_padded()
    noisy = ids.masked_fill(~mask.bool(), 7)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=pos).logits
        again = model(noisy, attention_mask=mask, position_ids=pos).logits
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            alone = model(ids[row:row + 1, real]).logits[0]
            torch.testing.assert_close(batch[row, real], alone, **TOL)
            torch.testing.assert_close(again[row, real], alone, **TOL)
    assert batch.isfinite().all()


@pytest.mark.parametrize("name", CONFIGS)
def test_generate_with_cache_equals_without(name):
    model = build(name)
    ids, mask, _ = left_padded()
    kw = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0,
              "return_dict_in_generate": True, "output_scores": True}
    uncached = model.generate(ids, use_cache=False, **kw)
    for cache in ("dynamic", "static"):  # static: keys longer than the sequence, masked
        cached = model.generate(ids, use_cache=True, cache_implementation=cache, **kw)
        assert torch.equal(cached.sequences, uncached.sequences), cache
        torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores),
                                   **TOL, msg=cache)


def test_training_step_and_attention_weights():
    model = build("llama")
    model.train()
    ids, mask, pos = left_padded()
    out = model(ids, attention_mask=mask, position_ids=pos, labels=ids.masked_fill(mask == 0, -100),
                output_attentions=True)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.isfinite().all() for g in grads)
    weights = out.attentions[0]  # [B, H, N, N], the read-out's, causal and padding-masked
    assert weights.shape == (3, 4, N, N)
    real = mask.bool()
    torch.testing.assert_close(weights.sum(-1)[real[:, None].expand(-1, 4, -1)],
                               torch.ones(()).expand(int(real.sum()) * 4), **TOL)
    assert (weights.triu(1) == 0).all()
    assert (weights[1, ..., :3] == 0).all()


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="num_steps"):
        register("energy_bad", num_steps=0)
    with pytest.raises(TypeError, match="name"):
        register("")
    fn = make_attention_function()
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match="softcap"):
        fn(torch.nn.Module(), q, k, k, None, softcap=30.0)
    with pytest.raises(ValueError, match="query"):
        fn(torch.nn.Module(), q[0], k, k, None)


# --- options stored in the model's config (config.energy_attention) ---------------------------

from energy_attn.integrations.huggingface import energy_options, set_energy_attention  # noqa: E402

NESTEROV = {"num_steps": 3, "step_size": 0.5, "optimizer": "nesterov", "momentum": 0.5}


def logits(model, ids, mask, pos):
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=pos).logits


@pytest.mark.parametrize("name", CONFIGS)
def test_save_pretrained_round_trip_reproduces_logits_exactly(name, tmp_path):
    model = set_energy_attention(build(name, "sdpa"), attn_implementation="energy_saved",
                                 **NESTEROV)
    assert model.config.energy_attention == {**NESTEROV, "scale": None}
    ids, mask, pos = left_padded()
    expected = logits(model, ids, mask, pos)
    kw = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    generated = model.generate(ids, use_cache=True, **kw)
    model.save_pretrained(tmp_path)
    # A process whose registered defaults differ: the saved config's options still rule.
    register("energy_saved", num_steps=2, step_size=1.0)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="energy_saved").eval()
    assert loaded.config.energy_attention == model.config.energy_attention
    assert (logits(loaded, ids, mask, pos) - expected).abs().max() == 0
    assert torch.equal(loaded.generate(ids, use_cache=True, **kw), generated)
    # ... and the defaults really are different: a config without options computes otherwise.
    del loaded.config.energy_attention
    assert (logits(loaded, ids, mask, pos) - expected).abs().max() > 1e-3


def test_two_differently_configured_models_coexist():
    ids, mask, pos = left_padded()
    a = set_energy_attention(build("llama", "sdpa"), **NESTEROV)
    before = logits(a, ids, mask, pos)
    b = set_energy_attention(build("llama", "sdpa"), num_steps=1)  # same weights, plain attention
    sdpa = logits(build("llama", "sdpa"), ids, mask, pos)
    real = mask.bool()
    torch.testing.assert_close(logits(b, ids, mask, pos)[real], sdpa[real], **TOL)
    assert (logits(a, ids, mask, pos) - before).abs().max() == 0
    assert (before[real] - sdpa[real]).abs().max() > 1e-3


def test_per_layer_options(tmp_path):
    ids, mask, pos = left_padded()
    real = mask.bool()
    same = set_energy_attention(build("gpt2", "sdpa"), [NESTEROV, NESTEROV])
    one = set_energy_attention(build("gpt2", "sdpa"), NESTEROV)
    assert (logits(same, ids, mask, pos) - logits(one, ids, mask, pos)).abs().max() == 0
    # layer 0 plain attention, layer 1 descends: differs from both uniform settings
    mixed = set_energy_attention(build("gpt2", "sdpa"), [{"num_steps": 1}, NESTEROV])
    plain = set_energy_attention(build("gpt2", "sdpa"), num_steps=1)
    out = logits(mixed, ids, mask, pos)
    for other in (one, plain):
        assert (out[real] - logits(other, ids, mask, pos)[real]).abs().max() > 1e-4
    assert energy_options(mixed.config, 0)["num_steps"] == 1
    assert energy_options(mixed.config, 1)["optimizer"] == "nesterov"
    mixed.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="energy").eval()
    assert (logits(loaded, ids, mask, pos) - out).abs().max() == 0


def test_bad_config_options_raise_value_errors_naming_them():
    model = build("gpt2", "sdpa")
    with pytest.raises(ValueError, match=r"unknown option.*'num_step'"):
        set_energy_attention(model, num_step=3)
    with pytest.raises(ValueError, match=r"energy_attention.*num_steps"):
        set_energy_attention(model, num_steps=0)
    with pytest.raises(ValueError, match=r"energy_attention.*num_steps"):
        set_energy_attention(model, num_steps=2.0)
    with pytest.raises(ValueError, match=r"energy_attention.*step_size"):
        set_energy_attention(model, step_size=float("nan"))
    with pytest.raises(ValueError, match=r"energy_attention.*optimizer"):
        set_energy_attention(model, optimizer="adamw")
    with pytest.raises(ValueError, match=r"energy_attention\[1\].*unknown.*'steps'"):
        set_energy_attention(model, [NESTEROV, {"steps": 2}])
    with pytest.raises(ValueError, match="one dict per layer"):
        set_energy_attention(model, [NESTEROV])
    with pytest.raises(ValueError, match="registered to another"):
        set_energy_attention(model, attn_implementation="sdpa")
    with pytest.raises(TypeError, match="not both"):
        set_energy_attention(model, NESTEROV, num_steps=2)
    assert not hasattr(model.config, "energy_attention")  # nothing was half-written
    # A hand-edited config is checked when the model runs; 1 and True are different options.
    model = set_energy_attention(model, num_steps=1)
    ids = torch.randint(1, VOCAB, (1, N))
    model.config.energy_attention = {"num_steps": True}
    with pytest.raises(ValueError, match=r"config\.energy_attention.*num_steps"):
        model(ids)
    model.config.energy_attention = {"num_steps": 2, "momentom": 0.5}
    with pytest.raises(ValueError, match=r"unknown option.*'momentom'"):
        model(ids)


def test_missing_transformers_says_how_to_install():
    import subprocess
    import sys
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import energy_attn, energy_attn.integrations\n"
            "try:\n"
            "    import energy_attn.integrations.huggingface\n"
            "except ImportError as e:\n"
            "    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ImportError ")  # not ModuleNotFoundError
    assert 'pip install "energy-attn[hf]"' in out.stdout


def test_compiled_attention_function_reads_the_config_without_warnings():
    """torch.compile traces the options check (its cache would warn of silent incorrectness)
    and recompiles when the config's options change."""
    import types
    import warnings

    fn = make_attention_function()
    module = torch.nn.Module()
    module.config = types.SimpleNamespace(energy_attention={"num_steps": 1})
    module.layer_idx, module.is_causal = 0, True
    q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 1, 5, 4)
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lru_cache")
        plain, _ = compiled(module, q, k, k, None)
        module.config.energy_attention = {"num_steps": 3, "step_size": 0.5}
        descended, _ = compiled(module, q, k, k, None)
    torch.testing.assert_close(descended, fn(module, q, k, k, None)[0], **TOL)
    module.config.energy_attention = {"num_steps": 1}
    torch.testing.assert_close(plain, fn(module, q, k, k, None)[0], **TOL)
    assert (descended - plain).abs().max() > 1e-3


def test_sub_configs_of_attention_modules_without_layer_idx_get_the_options(tmp_path):
    """CLIP's attention modules read text_config / vision_config and have no layer_idx; the
    options must reach them (not the registered defaults), and survive save_pretrained."""
    text = {"vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": N,
            "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 8, "patch_size": 4}
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8,
                                     initializer_factor=20.0)

    def clip_logits(model):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, VOCAB, (2, N), generator=g)
        pixels = torch.randn(2, 3, 8, 8, generator=g)
        with torch.no_grad():
            return model(input_ids=ids, pixel_values=pixels).logits_per_image

    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    model.set_attn_implementation("sdpa")
    sdpa = clip_logits(model)
    set_energy_attention(model, num_steps=1)  # the registered "energy" defaults are T=3
    assert model.config.text_config.energy_attention["num_steps"] == 1
    torch.testing.assert_close(clip_logits(model), sdpa, **TOL)
    set_energy_attention(model, NESTEROV)
    descended = clip_logits(model)
    assert (descended - sdpa).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    loaded = transformers.CLIPModel.from_pretrained(tmp_path, attn_implementation="energy").eval()
    assert (clip_logits(loaded) - descended).abs().max() == 0
