import pytest
import torch
import torch.nn.functional as F

from energy_attn import (
    MHA,
    LightMHA2nd1st,
    MHA2nd1st,
    MomenMHA,
    MultiHeadSelfAttention,
    NagMHA,
    OptimizerBlock,
    hopfield_descent,
)

f64 = torch.float64
VARIANTS = ["mha", "momen", "nag", "2nd1st", "light2nd1st"]
B, N, D, H = 2, 7, 16, 4


def x_and_state(dtype=f64):
    return torch.randn(B, N, D, dtype=dtype), torch.randn(B, N, D, dtype=dtype)


def twin(cls, base, **kw):
    """A block of class ``cls`` carrying ``base``'s weights."""
    blk = cls(D, H, **kw).to(base.ln_attn.weight.dtype)
    missing, unexpected = blk.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(m.startswith(("rho.", "attn.gamma.")) for m in missing)
    return blk.eval()


def test_rho_zero_momentum_blocks_equal_mha_exactly():
    base = MHA(D, H).double().eval()
    x, m = x_and_state()
    ref, _ = base(x)
    for cls in (MomenMHA, NagMHA):
        blk = twin(cls, base, rho=0.0, learn_rho=False)
        for state in (None, m):  # first layer and a later layer with a live buffer
            out, new_state = blk(x, state)
            assert torch.equal(out, ref), cls.__name__
            assert new_state.shape == x.shape


@pytest.mark.parametrize("cls", [MHA2nd1st, LightMHA2nd1st])
def test_gamma_zero_newton_blocks_equal_mha(cls):
    base = MHA(D, H).double().eval()
    x, _ = x_and_state()
    blk = twin(cls, base, gamma=0.0, learn_gamma=False)
    eps = torch.finfo(f64).eps
    torch.testing.assert_close(blk(x)[0], base(x)[0], atol=64 * eps, rtol=64 * eps)


def test_momentum_and_nesterov_follow_the_recursions():
    torch.manual_seed(1)
    x, m = x_and_state()
    momen = MomenMHA(D, H, rho=0.7).double().eval()
    nag = twin(NagMHA, momen, rho=0.7)
    nag.rho.raw.data.copy_(momen.rho.raw.data)
    rho = torch.sigmoid(momen.rho.raw)
    with torch.no_grad():
        out, state = momen(x, m)
        exp_state = rho * m + momen.step(x)
        half = x + exp_state
        torch.testing.assert_close(state, exp_state)
        torch.testing.assert_close(out, half + momen.ffn(momen.ln_ffn(half)))
        out, state = nag(x, m)
        exp_state = rho * m + nag.step(x + rho * m)
        half = x + exp_state
        torch.testing.assert_close(state, exp_state)
        torch.testing.assert_close(out, half + nag.ffn(nag.ln_ffn(half)))
        # a missing buffer is a zero buffer
        torch.testing.assert_close(momen(x)[0], momen(x, torch.zeros_like(x))[0])
        torch.testing.assert_close(nag(x)[0], nag(x, torch.zeros_like(x))[0])


def dense_newton(q, k, v, gamma, kind, allowed=None, read=None):
    """Per-(batch, head, query) float64 loops with the explicit covariance (docs/math.md §5.2).

    ``read`` ``[B, H, N, d]`` replaces the read-out ``μ`` in ``r = μ − v`` and in the output
    (the dropout read-out); the covariance stays that of the attention's ``P``."""
    Bq, Hq, Nq, d = q.shape
    out = torch.zeros_like(q) if read is None else read.clone()
    for b in range(Bq):
        for h in range(Hq):
            for i in range(Nq):
                logits = k[b, h] @ q[b, h, i] / d**0.5
                if allowed is not None:
                    row = allowed[b, h, i]
                    if not row.any():
                        continue  # empty memory: reads out nothing
                    logits = logits.masked_fill(~row, float("-inf"))
                p = logits.softmax(-1)
                mu = p @ v[b, h]
                first = mu if read is None else read[b, h, i]
                r = first - v[b, h, i]
                cen = v[b, h] - mu  # [M, d]
                cov = (p[:, None, None] * cen[:, :, None] * cen[:, None, :]).sum(0)  # Σ_i
                corr = cov @ r if kind == "2nd1st" else torch.diagonal(cov) * r
                out[b, h, i] = first + gamma[h] * corr
    return out


@pytest.mark.parametrize("kind", ["2nd1st", "light"])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "random+causal"])
def test_newton_attention_equals_dense_covariance(kind, mask_kind):
    attn = MultiHeadSelfAttention(D, H, second_order=kind, gamma=0.3).double()
    with torch.no_grad():
        attn.gamma.raw.copy_(torch.randn(H))
    q, k, v = (torch.randn(B, H, N, D // H, dtype=f64) for _ in range(3))
    causal = mask_kind != "none"
    mask = None
    allowed = torch.ones(N, N, dtype=torch.bool).tril().expand(B, H, N, N) if causal else None
    if mask_kind == "random+causal":
        mask = torch.rand(B, 1, N, N) > 0.3
        mask[1, :, 4] = False  # a fully masked row
        allowed = allowed & mask
    got = attn.attend(q, k, v, mask=mask, is_causal=causal)
    want = dense_newton(q, k, v, attn.gamma().detach(), kind, allowed)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_layer_stack_equals_float64_reference(variant):
    # docs/math.md §5 written out by hand: LayerNorm, projections, the dense per-query attention
    # (with its covariance) above, the momentum recursions, and the FFN with an erf GELU.
    torch.manual_seed(0)
    blks = [OptimizerBlock(D, H, variant, rho=0.3 + 0.4 * i).double().eval() for i in range(2)]
    with torch.no_grad():
        for p in (p for blk in blks for p in blk.parameters()):
            p.add_(0.3 * torch.randn_like(p))
    x = 2 * torch.randn(B, N, D, dtype=f64) + 1
    mask = torch.rand(B, 1, N, N) > 0.3
    mask[1, :, 4] = False  # a fully masked row
    allowed = (torch.ones(N, N, dtype=torch.bool).tril() & mask).expand(B, H, N, N)

    def step(blk, y):  # a_l(y) = MHA_l(LN(y))
        a = blk.attn
        h = F.layer_norm(y, (D,), blk.ln_attn.weight, blk.ln_attn.bias)
        q, k, v = (h @ a.to_qkv.weight.T + a.to_qkv.bias).view(B, N, 3, H, D // H).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, d]
        gamma = a.gamma() if a.second_order else torch.zeros(H, dtype=f64)  # 0: plain
        o = dense_newton(q, k, v, gamma, a.second_order or "light", allowed)
        return o.transpose(1, 2).reshape(B, N, D) @ a.to_out.weight.T + a.to_out.bias

    got, state, want, m = x, None, x, torch.zeros_like(x)
    with torch.no_grad():
        for blk in blks:
            got, state = blk(got, state, mask=mask, is_causal=True)
            if variant in ("momen", "nag"):
                rho = torch.sigmoid(blk.rho.raw)
                m = rho * m + step(blk, want + (rho * m if variant == "nag" else 0))
                want = want + m
                torch.testing.assert_close(state, m, atol=1e-12, rtol=0)
            else:
                want = want + step(blk, want)
            f = blk.ffn
            h = F.layer_norm(want, (D,), blk.ln_ffn.weight, blk.ln_ffn.bias)
            h = h @ f[0].weight.T + f[0].bias
            want = want + (0.5 * h * (1 + torch.erf(h / 2**0.5))) @ f[2].weight.T + f[2].bias
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["2nd1st", "light"])
def test_newton_dropout_preconditions_the_dropped_read_out(kind):
    # Dropout acts on the read-out μ' = P'V as in attention; the curvature is the covariance of
    # the attention's own P: o = μ' + γ Σ_P (μ' − v), affine in P' (E[o] = the eval output).
    # The literal (P'⊙S')V of the dropped weights was not shift-invariant: a value offset c
    # entered as c³ (offset 10: training outputs 12x the eval ones; float16 overflowed to NaN).
    torch.manual_seed(0)
    kw = dict(second_order=kind, dropout=0.3)
    attn = MultiHeadSelfAttention(D, H, gamma=0.7, **kw).double().train()
    plain = MultiHeadSelfAttention(D, H, gamma=0.0, learn_gamma=False, **kw).double().train()
    q, k, v = (torch.randn(B, H, N, D // H, dtype=f64) for _ in range(3))
    v = v + 10.0
    mask = torch.rand(B, 1, N, N) > 0.3
    mask[1, :, 4] = False  # a fully masked row
    allowed = torch.ones(N, N, dtype=torch.bool).tril() & mask
    torch.manual_seed(1)
    got = attn.attend(q, k, v, mask=mask, is_causal=True)
    torch.manual_seed(1)  # the same dropout draws: γ = 0 reads out μ' alone
    read = plain.attend(q, k, v, mask=mask, is_causal=True)
    assert not torch.allclose(read, plain.eval().attend(q, k, v, mask=mask, is_causal=True))
    want = dense_newton(q, k, v, attn.gamma().detach(), kind, allowed.expand(B, H, N, N), read)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", ["2nd1st", "light"])
@pytest.mark.parametrize("causal", [False, True])
def test_newton_attention_accumulates_in_float32_under_autocast(kind, causal):
    # torch.autocast runs matmul/SDPA in bfloat16 whatever the inputs' dtype: the float32
    # products of the upcast q, k, v must run in float32 under it too (as outside it).
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(D, H, second_order=kind, gamma=0.3)
    q, k, v = (torch.randn(B, H, 32, D // H) for _ in range(3))
    k, v = 4 * k + 3, 2 * v + 20  # large logits and a value offset: 16-bit products lose them
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    want = attn.attend(q, k, v, is_causal=causal)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attn.attend(q, k, v, is_causal=causal)
    truth = attn.double().attend(q.double(), k.double(), v.double(), is_causal=causal)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert (got.double() - truth).abs().max() <= (want.double() - truth).abs().max()


@pytest.mark.parametrize("kind", [None, "2nd1st", "light"])
def test_attention_gradcheck(kind):
    attn = MultiHeadSelfAttention(4, 2, second_order=kind).double()
    q, k, v = (torch.randn(1, 2, 4, 2, dtype=f64, requires_grad=True) for _ in range(3))
    mask = torch.rand(1, 2, 4, 4) > 0.3
    mask[0, 0, 1] = False
    assert torch.autograd.gradcheck(lambda q, k, v: attn.attend(q, k, v, mask=mask, is_causal=True),
                                    (q, k, v))


def test_energy_attention_is_descent_then_value_readout():
    attn = MultiHeadSelfAttention(D, H, attention="energy", num_steps=3, step_size=0.5,
                                  optimizer="nesterov", momentum=0.4).double()
    x, _ = x_and_state()
    q, k, v = attn.to_qkv(x).view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
    xi = hopfield_descent(q, k, step_size=0.5, num_steps=2, is_causal=True,
                          optimizer="nesterov", momentum=0.4)
    o = F.scaled_dot_product_attention(xi, k, v, is_causal=True)
    want = attn.to_out(o.transpose(1, 2).reshape(B, N, D))
    torch.testing.assert_close(attn(x, is_causal=True), want)
    # one step is plain softmax attention, exactly
    one = MultiHeadSelfAttention(D, H, attention="energy", num_steps=1).double()
    one.load_state_dict(attn.state_dict())
    plain = MultiHeadSelfAttention(D, H).double()
    plain.load_state_dict(attn.state_dict())
    assert torch.equal(one(x), plain(x))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("attention", ["softmax", "energy"])
def test_blocks_are_causal(variant, attention):
    blk = OptimizerBlock(D, H, variant, attention=attention, num_steps=3, step_size=0.5).double()
    x, m = x_and_state()
    out, state = blk(x, m, is_causal=True)
    t = 3
    x2, m2 = x.clone(), m.clone()
    x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
    m2[:, t + 1:] = torch.randn_like(m2[:, t + 1:])
    out2, state2 = blk(x2, m2, is_causal=True)
    torch.testing.assert_close(out2[:, : t + 1], out[:, : t + 1], atol=0, rtol=0)
    assert not torch.allclose(out2[:, t + 1:], out[:, t + 1:])
    if variant in ("momen", "nag"):
        torch.testing.assert_close(state2[:, : t + 1], state[:, : t + 1], atol=0, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_two_layer_stack_never_leaks_in_training(variant, dtype):
    # Padded and future tokens (garbage, a large value offset) move no other output bit, at
    # any layer, through the momentum buffer, with dropout (the same draws) and in 16 bits.
    torch.manual_seed(0)
    blks = [OptimizerBlock(D, H, variant, dropout=0.2).to(dtype).train() for _ in range(2)]
    with torch.no_grad():
        for blk in blks:
            blk.attn.to_qkv.bias[2 * D:] += 50.0
    x = 3 * torch.randn(B, N, D)
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[0, 2], pad[1, 5] = True, True
    t = 4  # tokens after t are the future; padded tokens are no one's keys
    keep = ~pad & (torch.arange(N) <= t)

    def run(x):
        torch.manual_seed(1)
        outs, state = [], None
        for blk in blks:
            x, state = blk(x, state, mask=(~pad)[:, None, None, :], is_causal=True)
            outs += [x] if state is None else [x, state]
        return outs

    x2 = x.clone()
    x2[pad] = 300 * torch.randn(2, D)
    x2[:, t + 1:] = 100 * torch.randn(B, N - t - 1, D)
    for a, b in zip(run(x.to(dtype)), run(x2.to(dtype))):
        assert torch.isfinite(a[keep]).all()
        assert torch.equal(a[keep], b[keep])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("attention", ["softmax", "energy"])
def test_fully_masked_rows_stay_finite(variant, attention):
    blk = OptimizerBlock(D, H, variant, attention=attention, num_steps=2).float()
    x = torch.randn(B, N, D, requires_grad=True)
    mask = torch.rand(B, 1, N, N) > 0.4
    mask[0, :, 2] = False  # row 2 of batch 0 may attend to nothing
    out, _ = blk(x, None, mask=mask, is_causal=True)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    for p in blk.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    # a fully masked row's attention reads out nothing
    a = blk.attn.attend(*(torch.randn(B, H, N, D // H) for _ in range(3)), mask=mask)
    assert torch.equal(a[0, :, 2], torch.zeros_like(a[0, :, 2]))


def test_rho_and_gamma_are_learnable_and_positive():
    x, m = x_and_state(torch.float32)
    for cls, name in ((MomenMHA, "rho"), (NagMHA, "rho"), (MHA2nd1st, "gamma"),
                      (LightMHA2nd1st, "gamma")):
        blk = cls(D, H)
        out, state = blk(x, m)
        (out.square().sum() + state.square().sum()).backward()
        mod = blk.rho if name == "rho" else blk.attn.gamma
        assert mod.raw.grad is not None and mod.raw.grad.abs().sum() > 0, cls.__name__
    assert MHA2nd1st(D, H).attn.gamma().shape == (H,)
    assert 0 < MomenMHA(D, H, rho=0.9).rho().item() < 1


@pytest.mark.parametrize("gamma", [1e-30, 0.5, 50.0, 800.0])
def test_learnable_gamma_starts_at_its_initial_value(gamma):
    # softplus⁻¹ was log(expm1(γ)): an OverflowError for γ above ~710
    got = MHA2nd1st(D, H, gamma=gamma).attn.gamma()
    torch.testing.assert_close(got, torch.full((H,), gamma), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(variant="adam"), ValueError, "variant"),
        (dict(variant="momen", rho=1.0), ValueError, "rho"),
        (dict(variant="momen", rho=-0.1, learn_rho=False), ValueError, "rho"),
        (dict(variant="nag", rho=0.0), ValueError, "rho"),  # learnable ρ needs (0, 1)
        (dict(variant="2nd1st", gamma=-0.5), ValueError, "gamma"),
        (dict(variant="light2nd1st", gamma=-0.5, learn_gamma=False), ValueError, "gamma"),
        (dict(attention="energy", num_steps=2.5), TypeError, "num_steps"),
        (dict(attention="energy", num_steps=0), ValueError, "num_steps"),
        (dict(attention="energy", optimizer="adam"), ValueError, "optimizer"),
        (dict(attention="energy", optimizer="momentum", momentum=1.5), ValueError, "momentum"),
        (dict(attention="linear"), ValueError, "attention"),
        (dict(dropout=1.0), ValueError, "dropout"),
        (dict(mlp_ratio=0), ValueError, "mlp_ratio"),  # was a silent zero-width FFN
        (dict(mlp_ratio=1.5), TypeError, "mlp_ratio"),
    ],
)
def test_bad_construction(kw, exc, match):
    variant = kw.pop("variant", "mha")
    with pytest.raises(exc, match=match):
        OptimizerBlock(D, H, variant, **kw)


@pytest.mark.parametrize("d_model, exc", [(-4, ValueError), (16.0, TypeError),
                                          (True, TypeError), ("16", TypeError)])
def test_bad_d_model_is_named(d_model, exc):
    # was a RuntimeError or TypeError from inside nn.LayerNorm
    with pytest.raises(exc, match="d_model"):
        OptimizerBlock(d_model, 2)


def test_bad_forward_inputs():
    blk = MomenMHA(D, H)
    x = torch.randn(B, N, D)
    with pytest.raises(ValueError, match="d_model"):
        blk(torch.randn(B, N, D + 1))
    with pytest.raises(ValueError, match="state"):
        blk(x, torch.randn(B, N + 1, D))
    with pytest.raises(TypeError, match="state"):
        blk(x, [1.0])
    with pytest.raises(ValueError, match="state"):
        blk(x, torch.randn(N, D))
    with pytest.raises(TypeError, match="state"):
        MHA(D, H)(x, torch.ones(B, N, D, dtype=torch.long))
    with pytest.raises(TypeError, match="mask"):
        blk(x, mask=torch.ones(B, 1, N, N))
    with pytest.raises(ValueError, match="mask"):
        blk(x, mask=torch.ones(B, 1, N, N + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="is_causal"):
        blk(x, is_causal=1)
    with pytest.raises(ValueError, match="n_head"):
        MHA(10, 4)
