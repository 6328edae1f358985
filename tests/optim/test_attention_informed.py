import copy
import io
import math
import os
import pickle

import pytest
import torch
import torch.multiprocessing as mp
from _aiadam_tiny import TinyModel, batch

from energy_attn.optim import AttentionInformedAdam, attention_energy_stats, energy_modules


def brute_stats(q, k, scale, causal=False, key_mask=None):
    """Mean energy and free energy from the explicit [B, H, N, M] scores (float64)."""
    q, k = q.double(), k.double()
    s = scale * q @ k.transpose(-1, -2)
    n, m = s.shape[-2:]
    allowed = torch.ones(n, m, dtype=torch.bool)
    if causal:  # top-left aligned, like SDPA's is_causal
        allowed = allowed.tril()
    allowed = allowed.expand(q.shape[0], q.shape[1], n, m).clone()
    if key_mask is not None:
        allowed &= key_mask[:, None, None, :]
    mean = s[allowed].mean() if allowed.any() else torch.zeros((), dtype=s.dtype)
    lse = torch.logsumexp(s.masked_fill(~allowed, float("-inf")), -1)
    lse = torch.where(allowed.any(-1), lse, torch.zeros_like(lse))
    return mean, -lse.mean() / scale


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,m", [(5, 5), (3, 7), (7, 3)])
@pytest.mark.parametrize("padded", [False, True])
def test_energy_stats_match_explicit_scores(causal, n, m, padded):
    b, h, d = 2, 3, 4
    q, k = torch.randn(b, h, n, d), torch.randn(b, h, m, d)
    key_mask = None
    if padded:
        key_mask = torch.ones(b, m, dtype=torch.bool)
        key_mask[0, :2] = False          # with causal and n < m, some rows see nothing
        key_mask[1, -1] = False
    mean, free, probs = attention_energy_stats(q, k, 0.5, causal=causal, key_mask=key_mask,
                                               free_energy=True, probs=True)
    ref_mean, ref_free = brute_stats(q, k, 0.5, causal, key_mask)
    atol = 16 * torch.finfo(torch.float32).eps * d * max(n, m)
    assert mean.dtype == torch.float32 and not mean.requires_grad
    torch.testing.assert_close(mean.double(), ref_mean, atol=atol, rtol=0)
    torch.testing.assert_close(free.double(), ref_free, atol=atol, rtol=0)
    assert torch.isfinite(probs).all()
    rows = probs.sum(-1)
    assert torch.all((rows - 1).abs() < 1e-5) or padded  # fully masked rows sum to 0


def test_free_energy_is_differentiable_and_only_when_asked():
    q = torch.randn(1, 2, 4, 3, requires_grad=True)
    k = torch.randn(1, 2, 4, 3, requires_grad=True)
    _mean, free, probs = attention_energy_stats(q, k, 1.0, causal=True)
    assert free is None and probs is None
    _, free, _ = attention_energy_stats(q, k, 1.0, causal=True, free_energy=True)
    free.backward()
    assert q.grad is not None and k.grad.abs().sum() > 0


def _run(model, opt, steps, seed=0, scaler=None):
    losses = []
    for t in range(steps):
        x, y = batch(seed + t)
        _, loss = model(x, y)
        opt.zero_grad()
        if isinstance(opt, AttentionInformedAdam):
            opt.backward(loss, scaler=scaler)
        else:
            loss.backward()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("tie,gamma", [("neg", -math.inf), ("pos", math.inf)])
def test_alpha_one_equals_adamw_step_for_step(tie, gamma):
    # α = sigmoid(γ·Ē) = 1 needs γ·Ē = +inf: γ = −inf with Ē < 0 (keys −q), γ = +inf with Ē > 0.
    torch.manual_seed(0)
    model = TinyModel(causal=False, tie=tie)
    ref = copy.deepcopy(model)
    opt = AttentionInformedAdam(model.parameters(), lr=1e-2, weight_decay=0.1, gamma=gamma,
                                energy_source=model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    for t in range(5):
        x, y = batch(t)
        _, loss = model(x, y)
        opt.zero_grad()
        opt.backward(loss)
        assert opt._att_grads, "the attention term must be live for this test to mean anything"
        energy = opt._energy_sum.item()
        assert (energy < 0) if tie == "neg" else (energy > 0)
        opt.step()
        assert opt.last_alpha[0].item() == 1.0
        _, ref_loss = ref(x, y)
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        assert loss.item() == ref_loss.item()
        for p, r in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, r, atol=0, rtol=0)


@pytest.mark.parametrize("attention_norm", ["loss", "own"])
def test_single_step_by_hand(attention_norm):
    torch.manual_seed(1)
    model = TinyModel().double()
    lr, (b1, b2), eps, wd, gamma = 0.1, (0.8, 0.9), 1e-8, 0.05, 0.7
    x, y = batch(3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    # By hand: loss gradient, free-energy gradient and Ē from explicit scores.
    attn = model.attn
    emb = model.emb(x)

    def split(t):
        return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

    q, k = split(attn.to_q(emb)), split(attn.to_k(emb))
    mean_e, free = brute_stats(q, k, q.shape[-1] ** -0.5, causal=True)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    g_att = torch.autograd.grad(free, params, allow_unused=True)
    _, loss = model(x, y)
    g = torch.autograd.grad(loss, params)
    alpha = 1 / (1 + math.exp(-gamma * mean_e.item()))
    expected = {}
    for name, p, gl, ga in zip(names, params, g, g_att):
        m_hat = (1 - b1) * gl / (1 - b1)
        v_hat = (1 - b2) * gl**2 / (1 - b2)
        denom = v_hat.sqrt() + eps
        if ga is None:
            update = m_hat / denom
        else:  # "own": g_att over its own bias-corrected RMS, which is |g_att| after one step
            att_denom = denom if attention_norm == "loss" else ga.abs() + eps
            update = alpha * m_hat / denom + (1 - alpha) * ga / att_denom
        expected[name] = before[name] - lr * (update + wd * before[name])

    opt = AttentionInformedAdam(model.parameters(), lr=lr, betas=(b1, b2), eps=eps,
                                weight_decay=wd, gamma=gamma, attention_norm=attention_norm,
                                energy_source=model)
    _, loss = model(x, y)
    opt.zero_grad()
    opt.backward(loss)
    opt.step()
    assert 0 < opt.last_alpha[0].item() < 1
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], atol=1e-12, rtol=1e-10)
    # q/k projections got the attention term; these are the only ones F reaches.
    assert set(opt.last_alpha) == {0}


def test_parameters_without_attention_gradient_take_the_adamw_step():
    torch.manual_seed(2)
    model = TinyModel()
    ref = copy.deepcopy(model)
    frozen_extra = torch.nn.Parameter(torch.ones(3))  # no loss gradient at all
    opt = AttentionInformedAdam([*model.parameters(), frozen_extra], lr=1e-2, gamma=3.0,
                                energy_source=model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    x, y = batch(0)
    _, loss = model(x, y)
    opt.zero_grad()
    opt.backward(loss)
    reached = set(opt._att_grads)
    opt.step()
    _, ref_loss = ref(x, y)
    ref_opt.zero_grad()
    ref_loss.backward()
    ref_opt.step()
    touched = {id(p) for p in reached}
    assert {id(model.attn.to_q.weight), id(model.attn.to_k.weight)} <= touched
    assert id(model.head.weight) not in touched and id(model.attn.to_v.weight) not in touched
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        if id(p) in touched:
            assert not torch.equal(p, r), name
        else:
            torch.testing.assert_close(p, r, atol=0, rtol=0, msg=name)
    assert torch.equal(frozen_extra, torch.ones(3))


def test_state_dict_round_trip():
    torch.manual_seed(3)
    model = TinyModel()
    opt = AttentionInformedAdam(model.parameters(), lr=1e-2, energy_source=model)
    _run(model, opt, 3)
    clone = copy.deepcopy(model)
    clone_opt = AttentionInformedAdam(clone.parameters(), lr=5.0, energy_source=clone)
    buf = io.BytesIO()  # through bytes, as a checkpoint does (and so no tensor is shared)
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    clone_opt.load_state_dict(torch.load(buf, weights_only=True))
    assert clone_opt.param_groups[0]["lr"] == 1e-2
    assert _run(model, opt, 3, seed=10) == _run(clone, clone_opt, 3, seed=10)
    for p, r in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(p, r, atol=0, rtol=0)


def test_bf16_state_dict_round_trip_keeps_counting_attention_steps():
    # load_state_dict casts every state tensor but "step" to the parameter's dtype; a bf16
    # attention step counter stopped at 256 (256 + 1 == 256 in bf16).
    torch.manual_seed(3)
    model = TinyModel().to(torch.bfloat16)
    opt = AttentionInformedAdam(model.parameters(), lr=1e-2, energy_source=model)
    _run(model, opt, 1)
    for state in opt.state.values():
        if "att_step" in state:
            state["att_step"] = state["att_step"] * 0 + 256
    clone = copy.deepcopy(model)
    clone_opt = AttentionInformedAdam(clone.parameters(), lr=1e-2, energy_source=clone)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    clone_opt.load_state_dict(torch.load(buf, weights_only=True))
    _run(model, opt, 3, seed=10)
    _run(clone, clone_opt, 3, seed=10)
    counts = [s["att_step"] for s in clone_opt.state.values() if "att_step" in s]
    assert counts and all(c == 259 for c in counts)
    for p, r in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(p, r, atol=0, rtol=0)


def test_backward_when_the_free_energy_reaches_no_trainable_parameter():
    # Only the head trains: F does not require grad, and backward used to raise.
    torch.manual_seed(6)
    model = TinyModel()
    ref = copy.deepcopy(model)
    for m in (model, ref):
        for name, p in m.named_parameters():
            p.requires_grad_(name.startswith("head"))
    opt = AttentionInformedAdam(model.head.parameters(), lr=1e-2, energy_source=model)
    ref_opt = torch.optim.AdamW(ref.head.parameters(), lr=1e-2, foreach=False)
    _run(model, opt, 2)
    _run(ref, ref_opt, 2)
    assert opt.last_alpha == {}
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, atol=0, rtol=0)


@pytest.mark.parametrize("setting, error, named", [
    ({"attention_norm": "Own"}, ValueError, "attention_norm"),
    ({"betas": (2.0, 0.9)}, ValueError, "betas"),
    ({"betas": 0.9}, TypeError, "betas"),
    ({"betas": ("a", "b")}, TypeError, "betas"),
    ({"eps": -1.0}, ValueError, "eps"),
    ({"gamma": float("nan")}, ValueError, "gamma"),
    ({"gamma": "x"}, TypeError, "gamma"),
    ({"lr": -1.0}, ValueError, "lr"),
    ({"lr": torch.tensor(-1.0)}, ValueError, "lr"),
    ({"lr": torch.tensor([1e-3, 1e-3])}, ValueError, "lr"),
    ({"lr": torch.tensor(1)}, TypeError, "lr"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay"),
])
def test_each_parameter_group_is_checked_like_the_constructor(setting, error, named):
    lin = torch.nn.Linear(3, 1)
    with pytest.raises(error, match=named):
        AttentionInformedAdam(lin.parameters(), energy_source=lin, **setting)
    with pytest.raises(error, match=named):
        AttentionInformedAdam([{"params": lin.parameters(), **setting}], energy_source=lin)
    opt = AttentionInformedAdam([lin.weight], energy_source=lin)
    with pytest.raises(error, match=named):
        opt.add_param_group({"params": [lin.bias], **setting})
    assert len(opt.param_groups) == 1
    group = AttentionInformedAdam([{"params": [lin.weight], "betas": [0.5, 0.6], "gamma": 2}],
                                  energy_source=lin).param_groups[0]
    assert group["betas"] == (0.5, 0.6) and group["gamma"] == 2.0


def test_complex_parameters_are_refused():
    z = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    lin = torch.nn.Linear(3, 1)
    with pytest.raises(TypeError, match="params must be real"):
        AttentionInformedAdam([lin.weight, z], energy_source=lin)
    opt = AttentionInformedAdam(lin.parameters(), energy_source=lin)
    with pytest.raises(TypeError, match="params must be real"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1


def test_parameter_groups_use_their_own_gamma_and_lr():
    torch.manual_seed(4)
    model = TinyModel()
    opt = AttentionInformedAdam(
        [{"params": model.attn.parameters(), "gamma": 0.0},
         {"params": [*model.emb.parameters(), *model.head.parameters()], "lr": 0.0}],
        lr=1e-2, energy_source=model)
    before = [p.detach().clone() for p in model.head.parameters()]
    _run(model, opt, 2)
    assert opt.last_alpha[0].item() == 0.5          # γ = 0 ⇒ α = ½
    for p, b in zip(model.head.parameters(), before):  # lr = 0 (and wd·lr = 0)
        assert torch.equal(p, b)


def test_grad_scaler_gives_the_unscaled_steps():
    torch.manual_seed(5)
    model = TinyModel()
    ref = copy.deepcopy(model)
    opt = AttentionInformedAdam(model.parameters(), lr=1e-2, energy_source=model)
    ref_opt = AttentionInformedAdam(ref.parameters(), lr=1e-2, energy_source=ref)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    assert _run(model, opt, 3, scaler=scaler) == _run(ref, ref_opt, 3)
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r)


def test_no_recorders_is_adamw_and_bad_arguments():
    lin = torch.nn.Linear(3, 1)
    opt = AttentionInformedAdam(lin.parameters(), energy_source=lin)
    assert energy_modules(lin) == [] and opt.recorders == []
    lin(torch.ones(2, 3)).sum().backward()
    opt.attention_backward()
    opt.step()
    with pytest.raises(TypeError, match="energy_source"):
        AttentionInformedAdam(lin.parameters(), energy_source=None)
    with pytest.raises(ValueError, match="gamma"):  # ValueError: what the CLI reports
        AttentionInformedAdam(lin.parameters(), gamma=float("nan"), energy_source=lin)
    with pytest.raises(ValueError, match="betas"):
        AttentionInformedAdam(lin.parameters(), betas=(0.9, 1.0), energy_source=lin)
    with pytest.raises(ValueError, match="lr"):
        AttentionInformedAdam(lin.parameters(), lr=-1.0, energy_source=lin)



@pytest.mark.parametrize("lr_type", [float, torch.tensor])
def test_without_attention_term_equals_adamw_bit_for_bit_over_many_steps(lr_type):
    # float64 and β2 = 0.95: from step 709 on, math.sqrt(1 − β2ᵗ) and AdamW's (1 − β2ᵗ) ** 0.5
    # differ by an ulp, which float64 parameters show. Two groups, one added after
    # construction, a parameter that never gets a gradient, an LR scheduler, and learning
    # rates given as numbers or (as AdamW allows) tensors.
    torch.manual_seed(7)
    nets = [torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1),
                                torch.nn.Linear(2, 2)).double() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    makers = [lambda ps, **kw: AttentionInformedAdam(ps, energy_source=nets[0], **kw),
              lambda ps, **kw: torch.optim.AdamW(ps, foreach=False, **kw)]
    opts = []
    for net, make in zip(nets, makers):
        opt = make(net[0].parameters(), lr=lr_type(1e-2), betas=(0.9, 0.95), weight_decay=0.1)
        opt.add_param_group({"params": [*net[2].parameters(), *net[3].parameters()],
                             "lr": lr_type(3e-3), "weight_decay": 0.0})
        opts.append((opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=900)))
    x = torch.randn(16, 4, dtype=torch.float64)
    for t in range(720):
        for net, (opt, sched) in zip(nets, opts):
            opt.zero_grad()
            (net[:3](x * math.cos(t)) ** 2).mean().backward()  # net[3] never gets a gradient
            opt.step()
            sched.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)
    assert opts[0][0].state_dict()["state"].keys() == opts[1][0].state_dict()["state"].keys()


def test_deepcopy_and_pickle_keep_the_energy_source():
    # A model and its optimizer copied together (a training state snapshot) keep training the
    # same way; the copies used to have no attention state at all and raise in step().
    torch.manual_seed(8)
    model = TinyModel()
    opt = AttentionInformedAdam(model.parameters(), lr=1e-2, energy_source=model)
    _run(model, opt, 2)
    twins = [copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))]
    losses = _run(model, opt, 3, seed=10)
    for twin, twin_opt in twins:
        assert len(twin_opt.recorders) == 1 and twin_opt.recorders[0] is twin.attn
        assert _run(twin, twin_opt, 3, seed=10) == losses
        assert set(twin_opt.last_alpha) == {0}  # the attention term took part
        for p, r in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, r)


@pytest.mark.parametrize("attention_norm", ["loss", "own"])
def test_an_overflowing_attention_gradient_gives_the_adamw_step(attention_norm):
    # The scaled free energy overflows while the (unscaled) loss gradient is finite: the step
    # is AdamW's, and the attention moment saw a zero gradient.
    torch.manual_seed(9)
    model = TinyModel()
    ref = copy.deepcopy(model)
    opt = AttentionInformedAdam(model.parameters(), lr=1e-2, attention_norm=attention_norm,
                                energy_source=model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    x, y = batch(0)
    _, loss = model(x, y)
    opt.attention_backward(torch.amp.GradScaler("cpu", init_scale=2.0**127))
    assert opt._att_grads and not opt._att_finite
    loss.backward()
    opt.step()
    _, ref_loss = ref(x, y)
    ref_loss.backward()
    ref_opt.step()
    assert opt.last_alpha[0].item() == 1.0
    for p, r in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, r)
    att_sq = [s["att_sq"] for s in opt.state.values() if "att_sq" in s]
    assert all(torch.equal(a, torch.zeros_like(a)) for a in att_sq)
    assert bool(att_sq) == (attention_norm == "own")


def test_training_steps_never_read_a_device_tensor_on_the_host():
    # Parameters on the meta device stand for CUDA ones: any .item()/bool() of a parameter-side
    # tensor raises there (the finiteness check used to sync once per parameter).
    model = TinyModel().to("meta")
    opt = AttentionInformedAdam(model.parameters(), lr=1e-2, energy_source=model)
    for t in range(2):
        x, y = batch(t)
        _, loss = model(x.to("meta"), y.to("meta"))
        opt.zero_grad()
        opt.backward(loss)
        assert opt._att_grads
        opt.step()
    state = opt.state[model.attn.to_q.weight]
    assert state["step"].device.type == "cpu"  # like AdamW's (not capturable) step counter
    assert state["exp_avg"].is_meta and state["att_sq"].is_meta and state["att_step"] == 2


@pytest.mark.parametrize("attention_norm", ["loss", "own"])
def test_gradient_accumulation_steps_like_the_whole_batch(attention_norm):
    # Two micro-batches (losses halved) step like their whole batch: g_att and Ē are the means
    # over the attention backwards since the last step (it used to keep only the last one's).
    # A backward whose step was skipped (as GradScaler does on an overflow) is forgotten by
    # zero_grad, like its loss gradient.
    torch.manual_seed(10)
    whole = TinyModel().double()  # float64: the loss-normed term amplifies rounding
    split = copy.deepcopy(whole)
    opts = [AttentionInformedAdam(m.parameters(), lr=1e-2, gamma=2.0,
                                  attention_norm=attention_norm, energy_source=m)
            for m in (whole, split)]
    _run(whole, opts[0], 3)
    for t in range(3):
        x, y = batch(t, b=4)
        _, loss = split(*batch(100 + t, b=4))
        opts[1].backward(loss)        # ... and no step
        opts[1].zero_grad()
        for half in (slice(0, 2), slice(2, 4)):
            _, loss = split(x[half], y[half])
            opts[1].backward(loss / 2)
        opts[1].step()
    assert opts[1].last_alpha[0].item() != 0.5  # γ·Ē ≠ 0: α depends on the energies
    for a, p in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(a, p, atol=1e-9, rtol=1e-9)


def test_a_tensor_learning_rate_trains_with_the_attention_term():
    torch.manual_seed(11)
    model = TinyModel()
    twin = copy.deepcopy(model)
    opt = AttentionInformedAdam(model.parameters(), lr=0.01, energy_source=model)
    lr = torch.tensor(0.01)
    twin_opt = AttentionInformedAdam(twin.parameters(), lr=lr, energy_source=twin)
    sched = torch.optim.lr_scheduler.StepLR(twin_opt, step_size=2, gamma=1.0)  # lr in place
    _run(model, opt, 3)
    for t in range(3):
        _run(twin, twin_opt, 1, seed=t)
        sched.step()
    assert twin_opt.param_groups[0]["lr"] is lr and set(twin_opt.last_alpha) == {0}
    for p, r in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, r)

# ---------------------------------------------------------------- DDP (2 processes, gloo)
def _ddp_train(rank, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = TinyModel().double()  # float64: Adam's m/√v amplifies rounding of tiny gradients
    ddp = DDP(model)
    opt = AttentionInformedAdam(ddp.parameters(), lr=1e-2, gamma=2.0, energy_source=ddp)
    for t in range(3):
        x, y = batch(t, b=4)
        x, y = x[2 * rank:2 * rank + 2], y[2 * rank:2 * rank + 2]  # each rank: half the batch
        _, loss = ddp(x, y)
        opt.zero_grad()
        opt.backward(loss)
        opt.step()
    torch.save([p.detach() for p in model.parameters()], os.path.join(out_dir, f"{rank}.pt"))


def _ddp_worker(rank, world, init_file, out_dir):
    from energy_attn.training.loop import join_process_group, leave_process_group

    join_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    _ddp_train(rank, out_dir)  # DDP is gone when the group is left: no gloo thread outlives it
    leave_process_group()


@pytest.mark.slow
def test_ddp_averages_the_attention_gradient(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    p0 = torch.load(tmp_path / "0.pt", weights_only=True)
    p1 = torch.load(tmp_path / "1.pt", weights_only=True)
    for a, b in zip(p0, p1):
        assert torch.equal(a, b)  # ranks identical
    # ... and equal to one process on the whole batch: both gradients were averaged.
    torch.manual_seed(0)
    model = TinyModel().double()
    opt = AttentionInformedAdam(model.parameters(), lr=1e-2, gamma=2.0, energy_source=model)
    _run(model, opt, 3)
    for a, p in zip(p0, model.parameters()):
        torch.testing.assert_close(a, p.detach(), atol=1e-9, rtol=1e-9)



@pytest.mark.parametrize("general_mask", [False, True])
def test_energy_stats_under_autocast_stay_in_float32(general_mask):
    # Under autocast the einsum of the float32 scores ran in bf16/fp16 (errors ~1e-2 in F).
    torch.manual_seed(12)
    q, k = torch.randn(2, 2, 16, 32) * 3, torch.randn(2, 2, 16, 32) * 3
    mask = (torch.rand(2, 1, 16, 16) > 0.3) if general_mask else None
    args = dict(causal=True, mask=mask, free_energy=True, probs=True)
    plain = attention_energy_stats(q, k, 32**-0.5, **args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = attention_energy_stats(q, k, 32**-0.5, **args)
    for a, b in zip(under, plain):
        assert a.dtype == torch.float32 and torch.equal(a, b)

@pytest.mark.parametrize("causal", [False, True])
def test_energy_stats_with_a_general_mask(causal):
    b, h, n, d = 2, 2, 5, 4
    q, k = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    mask = torch.rand(b, 1, n, n) > 0.4
    mask[0, 0, 2] = False  # a fully masked row
    mean, free, _ = attention_energy_stats(q, k, 0.5, causal=causal, mask=mask, free_energy=True)
    s = 0.5 * q.double() @ k.double().transpose(-1, -2)
    allowed = mask.expand(b, h, n, n) & (torch.ones(n, n, dtype=torch.bool).tril() if causal
                                          else torch.ones(n, n, dtype=torch.bool))
    lse = torch.logsumexp(s.masked_fill(~allowed, float("-inf")), -1)
    lse = torch.where(allowed.any(-1), lse, torch.zeros_like(lse))
    atol = 16 * torch.finfo(torch.float32).eps * d * n
    torch.testing.assert_close(mean.double(), s[allowed].mean(), atol=atol, rtol=0)
    torch.testing.assert_close(free.double(), -lse.mean() / 0.5, atol=atol, rtol=0)


def test_gpt_attention_records_energy_only_for_the_optimizer():
    from energy_attn import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, n_layer=2, n_head=2, d_model=8, context=8))
    x, y = batch(0, n=8)
    model(x, y)
    recorders = energy_modules(model)
    assert len(recorders) == 2 and all(r.mean_energy is None for r in recorders)
    opt = AttentionInformedAdam(model.parameters(), lr=1e-2, energy_source=model)
    _, loss = model(x, y)
    assert all(r.free_energy is not None and r.free_energy.requires_grad for r in recorders)
    # the recorded mean energy is the causal mean of β q·k of each block's queries and keys
    ln_x = model.blocks[0].ln_attn(model.wte(x) + model.wpe(torch.arange(8)))
    q, k, _ = model.blocks[0].attn.to_qkv(ln_x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
    ref, _ = brute_stats(q, k, 4**-0.5, causal=True)
    torch.testing.assert_close(recorders[0].mean_energy.double(), ref, atol=1e-6, rtol=0)
    opt.zero_grad()
    opt.backward(loss)
    touched = set(opt._att_grads)
    assert {model.blocks[0].attn.to_qkv.weight, model.wte.weight} <= touched
    assert model.blocks[1].ffn[0].weight not in touched
    opt.step()
    with torch.no_grad():
        model(x, y)  # no graph: no free energy
    assert all(r.free_energy is None for r in recorders)
