"""energy_attn.masks: every user convention -> one canonical form; the one SDPA call site."""

import ast
import pathlib

import pytest
import torch
import torch.nn.functional as F

from energy_attn import (
    GPT,
    MHA,
    EnergyBasedAttention,
    EnergyMultiheadAttention,
    GPTConfig,
    Hopfield,
    LightMHA2nd1st,
    MultiHeadSelfAttention,
    VanillaSoftmaxAttention,
    hopfield_descent,
    masks,
)
from energy_attn.ops.hopfield import hopfield_fixed_point

ROOT = pathlib.Path(__file__).resolve().parents[1]


# -- conventions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_additive_masks_block_only_at_or_below_the_dtype_lowest_value(dtype):
    low = torch.finfo(dtype).min
    mask = torch.tensor([0.0, -1e4, -3.0, float("-inf"), low, 1.5], dtype=dtype)
    if dtype != torch.float16:  # -1e9 is -inf in float16 already
        mask = torch.cat([mask, torch.tensor([-1e9], dtype=dtype)])
    m = masks.from_user("mask", mask)
    expected = torch.ones_like(mask, dtype=torch.bool)
    expected[3:5] = False
    assert torch.equal(m.allowed, expected)
    assert torch.equal(m.bias, mask.masked_fill(~expected, 0.0))  # finite everywhere
    assert m.bias.isfinite().all()
    nan = masks.from_user("mask", torch.tensor([0.0, float("nan")], dtype=dtype))
    assert nan.allowed.tolist() == [True, False] and nan.bias.isfinite().all()


def test_boolean_conventions_and_combination():
    blocked = torch.tensor([[True, False, False]])
    a = masks.from_user("m", blocked, blocked=True)
    b = masks.from_user("m", ~blocked)
    assert torch.equal(a.allowed, b.allowed) and a.bias is None and b.bias is None
    c = masks.combine(a, masks.from_user("f", torch.tensor([[0.0, -1e9, float("-inf")]])),
                      masks.Masks(is_causal=True))
    assert torch.equal(c.allowed, torch.tensor([[False, True, False]]))
    assert torch.equal(c.bias, torch.tensor([[0.0, -1e9, 0.0]])) and c.is_causal
    big = torch.tensor([0.0, -3e38, -2e38])  # finite, but their sum overflows
    d = masks.combine(masks.from_user("a", big), masks.from_user("b", big))
    assert d.allowed.tolist() == [True, False, False] and d.bias.isfinite().all()
    full = masks.full_allowed(masks.Masks(None, None, True), 3, 3, "cpu")
    assert torch.equal(full, torch.ones(3, 3, dtype=torch.bool).tril())
    with pytest.raises(TypeError, match="attn_mask.*True = blocked"):
        masks.from_user("attn_mask", torch.ones(2, dtype=torch.long), blocked=True)
    with pytest.raises(TypeError, match="attn_mask"):
        masks.from_user("attn_mask", [1, 0])


def test_key_padding_form():
    m = torch.tensor([True, False, True]).reshape(1, 1, 1, 3)
    assert masks.is_key_padding(m) and not masks.is_key_padding(torch.ones(2, 1, 3, 3))
    pad = masks.key_padding(m, 2, 3)
    assert pad.shape == (2, 3) and pad.is_contiguous() and pad.dtype == torch.bool


def test_readout_args_keep_fully_masked_rows_finite_and_zero():
    q = torch.randn(1, 1, 3, 4)
    k = torch.randn(1, 1, 5, 4)
    bias = torch.zeros(1, 1, 3, 5)
    bias[0, 0, 1] = float("-inf")  # query 1 may attend nothing
    bias[0, 0, 2, :4] = -1e9  # query 2 is weighed down on four keys, not blocked
    attn_mask, valid, causal = masks.readout_args(masks.from_user("m", bias), 3, 5, "cpu")
    out = masks.sdpa(q, k, k, attn_mask=attn_mask, valid=valid, is_causal=causal)
    assert out.isfinite().all() and (out[0, 0, 1] == 0).all()
    torch.testing.assert_close(out[0, 0, 2], k[0, 0, 4])  # exp(-1e9) is exactly 0 in float32


def test_sdpa_mask_materialises_the_last_dim_and_casts_without_overflow():
    q = torch.randn(2, 1, 3, 4, dtype=torch.float16)
    for mask in (torch.ones(2, 1, 1, 1, dtype=torch.bool),
                 torch.zeros(2, 1, 3, 1).expand(2, 1, 3, 5),
                 torch.full((5,), -1e9).expand(2, 1, 3, 5)):
        out = masks.sdpa_mask(mask, q.dtype, 5)
        assert out.shape[-1] == 5 and out.stride(-1) == 1
        assert out.dtype in (torch.bool, q.dtype) and not out.isneginf().any()
    lean = masks.sdpa_mask(torch.ones(1, 1, 1, 1, dtype=torch.bool).expand(8, 4, 16, 1), q.dtype,
                           32)
    assert lean.shape == (8, 4, 16, 32) and lean.stride() == (0, 0, 0, 1)  # one row stored
    kept = masks.sdpa_mask(torch.tensor([0.0, float("-inf")]), torch.float16, 2)
    assert kept[1] == float("-inf")
    ready = masks.sdpa_mask(torch.zeros(3, 5, dtype=torch.float16), torch.float16, 5)
    assert masks.sdpa_mask(ready, torch.float16, 5) is ready  # idempotent, free


def test_sdpa_mask_turns_a_boolean_mask_into_sdpas_additive_one_once():
    """SDPA converts a boolean mask on every call (and saves each copy for backward): prepared
    once, it is the float mask SDPA would make, still broadcast where the input was."""
    allowed = torch.rand(2, 1, 3, 5) > 0.4
    ready = masks.sdpa_mask(allowed, torch.bfloat16, 5)
    assert ready.dtype == torch.bfloat16 and ready.shape == allowed.shape
    assert torch.equal(ready, torch.zeros(()).masked_fill(~allowed, float("-inf")).bfloat16())
    assert masks.sdpa_mask(ready, torch.bfloat16, 5) is ready
    lean = masks.sdpa_mask((torch.rand(2, 1, 1, 5) > 0.4).expand(2, 4, 3, 5), torch.float32, 5)
    assert lean.stride() == (5, 0, 0, 1)  # one row per batch element stored
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 5, 8)
    mask = torch.rand(2, 4, 3, 5) > 0.4
    mask[..., 0] = True
    torch.testing.assert_close(masks.sdpa(q, k, k, attn_mask=mask),
                               F.scaled_dot_product_attention(q, k, k, attn_mask=mask))


@pytest.mark.parametrize("dv", [3, 16], ids=["narrower", "wider"])
def test_sdpa_with_values_of_another_head_dim_is_exact_and_keeps_no_attention_matrix(dv):
    """On CPU, SDPA's fused kernel needs one head dim: masks.sdpa zero-pads (exactly), where
    SDPA's math path would keep the N×M attention matrix for backward."""
    n, m, d = 6, 40, 8
    q = torch.randn(2, 3, n, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, m, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, m, dv, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(2, 1, n, m, dtype=torch.float64)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = masks.sdpa(q, k, v, attn_mask=mask)  # default scale: d ** -0.5 of the real q
    assert out.shape == (2, 3, n, dv)
    assert not [s for s in shapes if s[-2:] == (n, m) and s[1] != 1], shapes  # mask only
    p = (q @ k.transpose(-1, -2) * d**-0.5 + mask).softmax(-1)
    truth = p @ v
    torch.testing.assert_close(out, truth)
    w = torch.randn_like(truth)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), w),
                    torch.autograd.grad(truth, (q, k, v), w)):
        torch.testing.assert_close(a, b)
    keys = masks.sdpa_keys(k, dv)  # prepared once for many calls: the same result
    assert keys.shape[-1] == max(d, dv)
    torch.testing.assert_close(masks.sdpa(q, keys, v, attn_mask=mask), out)


# -- one SDPA call site, and what it passes ------------------------------------------------------


def test_only_masks_py_calls_scaled_dot_product_attention():
    offenders = []
    sources = [*(ROOT / "energy_attn").rglob("*.py"), *(ROOT / "energy_attn_kernels").rglob("*.py")]
    for path in sources:
        if path.name == "masks.py" and path.parent.name == "energy_attn":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "scaled_dot_product_attention":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_fixed_point_solver_does_not_import_the_ops():
    """ops.hopfield imports fixed_point; fixed_point takes masks from masks.py, not from ops."""
    tree = ast.parse((ROOT / "energy_attn" / "fixed_point.py").read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert imported and not [m for m in imported if "ops" in m.split(".")], imported


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Wrap F.scaled_dot_product_attention: assert what CUDA's backends need of every mask."""
    calls = []
    real = F.scaled_dot_product_attention

    def checked(q, k, v, attn_mask=None, *args, **kwargs):
        if attn_mask is not None:
            assert attn_mask.shape[-1] == k.shape[-2], "mask's last dim is broadcast"
            assert attn_mask.stride(-1) == 1, "mask's last dim is not contiguous"
            assert attn_mask.dtype in (torch.bool, q.dtype), (attn_mask.dtype, q.dtype)
        calls.append(attn_mask is not None)
        return real(q, k, v, attn_mask, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", checked)
    return calls


B, H, N, D = 2, 2, 5, 8


def broadcast_masks():
    """Masks whose last dim is broadcast or strided (CPU takes them; CUDA's kernels do not)."""
    kp = torch.rand(B, 1, 1, 1) > 0.3
    col = torch.rand(B, 1, N, 1) > 0.3
    strided = (torch.rand(B, 1, 1, 2 * N) > 0.3)[..., ::2]
    expanded = (torch.rand(B, 1, 1, N) > 0.3).expand(B, H, N, N)
    additive = torch.zeros(N).masked_fill(torch.rand(N) > 0.6, -1e9).expand(B, 1, N, N)
    return {"[B,1,1,1]": kp, "[B,1,N,1]": col, "strided": strided, "expanded": expanded,
            "additive float32": additive}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("optimizer", ["gd", "nesterov", "newton_2nd1st", "newton_light"])
def test_every_op_call_passes_a_cuda_ready_mask(sdpa_calls, dtype, optimizer):
    q, k = torch.randn(B, H, N, D, dtype=dtype), torch.randn(B, H, N, D, dtype=dtype)
    for name, mask in broadcast_masks().items():
        out = hopfield_descent(q, k, num_steps=2, mask=mask, optimizer=optimizer,
                               momentum=0.5 if optimizer == "nesterov" else 0.0,
                               backend="reference")
        assert out.isfinite().all(), name
        hopfield_fixed_point(q, k, num_steps=2, mask=mask, is_causal=True)
    assert any(sdpa_calls)


def test_every_layer_and_adapter_call_passes_a_cuda_ready_mask(sdpa_calls):
    x = torch.randn(B, N, 16)
    for name, mask in broadcast_masks().items():
        allowed = masks.from_user("m", mask).allowed  # layers take boolean masks
        bhnm = allowed[:, :1].expand(B, 1, N, N)
        for layer in (MultiHeadSelfAttention(16, 2, attention="energy", num_steps=2),
                      MultiHeadSelfAttention(16, 2, second_order="light")):
            assert layer(x, mask=bhnm, is_causal=True).isfinite().all(), name
        blog = bhnm[:, 0]  # [b, n, m]
        assert VanillaSoftmaxAttention(16, heads=2, dim_head=8)(x, mask=blog).isfinite().all()
        assert EnergyBasedAttention(16, heads=2, dim_head=8)(x, mask=blog,
                                                             num_steps=2).isfinite().all()
        hop = Hopfield(16, num_heads=2, batch_first=True, update_steps_max=2)
        assert hop(x, stored_pattern_padding_mask=~bhnm[:, 0, 0],
                   association_mask=~bhnm[0, 0]).isfinite().all()
        mha = EnergyMultiheadAttention(16, 2, batch_first=True, num_steps=2)
        float_mask = mask.float().masked_fill(~allowed, float("-inf")) if mask.dtype == \
            torch.bool else mask
        am = float_mask.expand(B, H, N, N).reshape(B * H, N, N)
        assert mha(x, x, x, attn_mask=am, need_weights=False)[0].isfinite().all(), name
    for block in (MHA(16, 2), LightMHA2nd1st(16, 2)):
        assert block(x, is_causal=True)[0].isfinite().all()
    gpt = GPT(GPTConfig(vocab_size=11, n_layer=1, n_head=2, d_model=16, context=8,
                        attention="energy", num_steps=2))
    assert gpt(torch.randint(0, 11, (B, N)))[0].isfinite().all()
    assert any(sdpa_calls)


def test_hugging_face_attention_function_passes_a_cuda_ready_mask(sdpa_calls):
    pytest.importorskip("transformers")
    from energy_attn.integrations.huggingface import make_attention_function  # noqa: PLC0415

    attend = make_attention_function(num_steps=3)
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    for mask in broadcast_masks().values():
        out, _ = attend(None, q, k, v, mask[:, :1].expand(B, 1, N, N))
        assert out.isfinite().all()
    assert any(sdpa_calls)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_key_weighed_up_beyond_the_dtype_range_is_read_not_nan(dtype):
    """A float32 additive entry above the query dtype's range (``1e5`` in float16) or ``+inf``
    is clamped to the largest finite value, not cast to ``+inf`` (which made the row NaN)."""
    cast = masks.sdpa_mask(torch.tensor([0.0, 1e5, float("inf"), float("-inf")]), dtype, 4)
    assert cast[:3].isfinite().all() and cast[3] == float("-inf")
    assert masks.from_additive(torch.tensor([0.0, float("inf")])).bias.isfinite().all()
    q, k = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4)
    for big in (1e5, float("inf")):
        mask = torch.zeros(1, 1, 2, 3)
        mask[..., 0, 1] = big
        out = hopfield_descent(q.to(dtype), k.to(dtype), mask=mask, step_size=1.0)
        torch.testing.assert_close(out[0, 0, 0], k.to(dtype)[0, 0, 1])  # reads key 1 only
