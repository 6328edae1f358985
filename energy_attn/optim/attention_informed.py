"""The attention-informed optimizer (docs/math.md §6; Aranda Barois, details are this project's).

Attention modules record two things during the ordinary forward pass (no extra forward):

* their mean pre-softmax energy ``Ē = mean_ij q_i·k_j · β`` over the pairs they may attend
  (detached; computed in O(N·D) without the N×M score matrix), and
* on request, their free energy ``F = mean_{b,h,i} −(1/β) lse_j(β q_i·k_j)``, a differentiable
  scalar.

:class:`AttentionInformedAdam` mixes the two into an Adam step::

    α      = sigmoid(γ · Ē)                        Ē = mean of the modules' mean energies
    g_att  = ∂(Σ_modules F)/∂θ                     one extra backward through the same graph
    û      = bias-corrected EMA (β2) of g_att²      g_att's own second moment, like Adam's v̂
    update = α · m̂/(√v̂ + ε) + (1 − α) · g_att/(√û + ε)
    θ      ← θ − lr · (update + wd · θ)

That is the default, ``attention_norm="own"``. The alternative ``attention_norm="loss"`` (the
seed's literal form) divides the attention term by the loss gradient's moment instead,
``(1 − α) · g_att/(√v̂ + ε)``, which is unbounded where the loss gradient is small (see
:class:`AttentionInformedAdam`). Parameters the free energy does not reach take the plain
AdamW step (α = 1).

The protocol is :class:`EnergyRecorder`: any ``nn.Module`` that mixes it in and calls
:meth:`EnergyRecorder.record_energy` with its per-head queries and keys takes part; the
optimizer finds such modules with ``energy_source.modules()``.

Normalisation (ours, docs/math.md §6.1; the seed writes ``Σ_i``): the free energy is averaged over
batch, heads and queries, like the loss, so the attention gradient's scale does not grow with
batch size or context length; otherwise ``g_att/√v̂`` would dwarf the Adam direction by a factor
of ``B·H·N``.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist
from torch import nn

from .. import masks
from .._moments import no_autocast
from .._utils import check_finite_number

__all__ = [
    "AttentionInformedAdam",
    "EnergyRecorder",
    "attention_energy_stats",
    "energy_modules",
]


def _acc(t):
    """``t`` in its accumulation dtype: float32, or float64 for float64 inputs."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def attention_energy_stats(q, k, scale, *, causal=False, key_mask=None, mask=None,
                           free_energy=False, probs=False):
    """Mean pre-softmax energy (and optionally free energy / attention maps) of one attention.

    Args:
        q: queries ``[B, H, N, D]``.
        k: keys ``[B, H, M, D]``.
        scale: the inverse temperature β (scores are ``β q·k``).
        causal: query ``i`` may attend keys ``j <= i`` (top-left aligned, the package's
            convention and ``F.scaled_dot_product_attention(is_causal=True)``'s, so the stats
            describe the attention that SDPA computes with the same flag).
        key_mask: optional boolean ``[B, M]``, True = may attend (key padding).
        mask: optional general boolean mask broadcastable to ``[B, H, N, M]`` (True = may
            attend), combined with the others; the mean energy then comes from the explicit
            scores (the mask is N×M already).
        free_energy: also return ``F = mean_{b,h,i} −(1/β) lse_j(β q_i·k_j)`` (differentiable;
            needs the ``[B, H, N, M]`` scores, so only computed when asked). A query with no
            key to attend has an empty memory and contributes 0 (docs/math.md §1.3).
        probs: also return the attention maps ``softmax(β q kᵀ)`` ``[B, H, N, M]`` (detached).

    Returns:
        ``(mean_energy, F or None, P or None)``; ``mean_energy`` is a detached 0-d tensor
        (float32; float64 for float64 inputs), ``mean_{valid (b,h,i,j)} β q_i·k_j`` (0 when
        nothing is valid).

    The mean energy costs O(B·H·(N+M)·D): ``Σ_{j valid} q_i·k_j = q_i·(Σ_{j valid} k_j)``, with
    a prefix sum over keys when causal.
    """
    mean_energy = None if mask is not None else _mean_energy(q, k, scale, causal, key_mask)
    if mask is None and not (free_energy or probs):
        return mean_energy, None, None

    n, m = q.shape[-2], k.shape[-2]
    with no_autocast(q):  # autocast would run the einsum in its own dtype, undoing _acc
        scores = scale * torch.einsum("bhid,bhjd->bhij", _acc(q), _acc(k))  # [B, H, N, M]
    allowed = (masks.causal(n, m, q.device) if causal
               else torch.ones(n, m, dtype=torch.bool, device=q.device))[None, None]  # [1,1,N,M]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]                   # [B, 1, N, M]
    if mask is not None:
        allowed = allowed & mask
        with torch.no_grad():
            full = allowed.expand_as(scores)
            count = full.sum()
            total = torch.where(full, scores.detach(), torch.zeros((), dtype=scores.dtype)).sum()
            mean_energy = torch.where(count > 0, total / count.clamp(min=1),
                                      torch.zeros((), dtype=scores.dtype, device=q.device))
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                # [B, H, N]
    any_key = allowed.any(-1).expand_as(lse)
    lse = torch.where(any_key, lse, torch.zeros_like(lse))               # empty memory: 0
    free = -(lse.mean() / scale) if free_energy else None
    attn = None
    if probs:
        with torch.no_grad():
            attn = torch.where(any_key[..., None], (scores - lse[..., None]).exp(),
                               torch.zeros_like(scores))
    return mean_energy, free, attn


def _mean_energy(q, k, scale, causal, key_mask):
    """``mean_{valid (b,h,i,j)} β q_i·k_j`` in O(B·H·(N+M)·D) (see attention_energy_stats)."""
    with torch.no_grad():
        qf, kf = _acc(q.detach()), _acc(k.detach())
        n, m = qf.shape[-2], kf.shape[-2]
        if key_mask is not None:
            kf = kf * key_mask[:, None, :, None].to(kf.dtype)         # [B, H, M, D]
            valid_keys = key_mask.to(kf.dtype).sum(-1)                 # [B]
        if causal:
            # query i sees keys j <= min(i, m - 1) (masks.causal): prefix sums over keys
            last = torch.arange(n, device=qf.device).clamp(max=m - 1)  # [N]
            ksum = kf.cumsum(-2)[..., last, :]                          # [B, H, N, D]
            total = (qf * ksum).sum()
            if key_mask is not None:
                counts = key_mask.to(kf.dtype).cumsum(-1)[:, last]      # [B, N]
                count = counts.sum() * qf.shape[1]
            else:
                count = ((last + 1).sum() * qf.shape[0] * qf.shape[1]).to(kf.dtype)
        else:
            total = (qf.sum(-2) * kf.sum(-2)).sum()                    # Σ_i q_i · Σ_j k_j
            if key_mask is not None:
                count = valid_keys.sum() * qf.shape[1] * n
            else:
                count = torch.tensor(float(qf.shape[0] * qf.shape[1] * n * m), device=qf.device)
        return torch.where(count > 0, scale * total / count.clamp(min=1),
                           torch.zeros((), dtype=qf.dtype, device=qf.device))


class EnergyRecorder:
    """Mixin for attention modules that report their energies to the attention-informed optimizer.

    A module calls :meth:`record_energy` in its forward with its per-head queries and keys.
    Nothing is computed unless a consumer switched recording on (:class:`AttentionInformedAdam`
    does so for every recorder in its ``energy_source``):

    * ``record_mean_energy``: store ``mean_energy`` (detached 0-d float32 tensor) per forward.
    * ``record_free_energy``: also store ``free_energy`` (differentiable scalar) per forward,
      only while the module is in training mode and autograd is on.
    * ``record_attention_maps``: store ``attention_maps`` ``[B, H, N, M]`` (detached; for
      analysis such as attention-pattern stability).

    Each forward overwrites the previous record (one forward per optimizer step).
    """

    record_mean_energy: bool = False
    record_free_energy: bool = False
    record_attention_maps: bool = False
    mean_energy: torch.Tensor | None = None
    free_energy: torch.Tensor | None = None
    attention_maps: torch.Tensor | None = None

    def record_energy(self, q, k, scale, *, causal=False, key_mask=None, mask=None) -> None:
        """Record this forward's energies (see the class docstring); ``q``/``k`` ``[B,H,N|M,D]``."""
        if not (self.record_mean_energy or self.record_free_energy or self.record_attention_maps):
            return
        want_free = (self.record_free_energy and torch.is_grad_enabled()
                     and getattr(self, "training", True))
        mean, free, maps = attention_energy_stats(
            q, k, scale, causal=causal, key_mask=key_mask, mask=mask, free_energy=want_free,
            probs=self.record_attention_maps)
        self.mean_energy = mean
        self.free_energy = free
        self.attention_maps = maps

    def clear_energy(self) -> None:
        """Drop the stored records (and the graph a free energy holds on to)."""
        self.mean_energy = self.free_energy = self.attention_maps = None


def energy_modules(model: nn.Module) -> list[EnergyRecorder]:
    """The :class:`EnergyRecorder` modules in ``model`` (in ``model.modules()`` order)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"energy_source must be an nn.Module, got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, EnergyRecorder)]


def _check_gamma(gamma):
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise TypeError(f"gamma must be a real number (±inf allowed), got {gamma!r}")
    if math.isnan(gamma):
        raise ValueError(f"gamma must be a number or ±inf, got {gamma!r}")
    return float(gamma)


def _check_betas(betas):
    if not isinstance(betas, (tuple, list)):
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    if len(betas) != 2:
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    betas = tuple(check_finite_number(f"betas[{i}]", b) for i, b in enumerate(betas))
    if not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    return betas


def _check_non_negative(name, value):
    value = check_finite_number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_lr(lr):
    """A number >= 0, or (as torch.optim.AdamW allows) a one-element floating tensor >= 0,
    kept as given so that a scheduler's in-place updates reach it."""
    if not isinstance(lr, torch.Tensor):
        return _check_non_negative("lr", lr)
    check_finite_number("lr", lr, allow_tensor=True)  # dtype
    if lr.numel() != 1:
        raise ValueError(f"lr must be a number or a one-element tensor, got shape "
                         f"{tuple(lr.shape)}")
    _check_non_negative("lr", float(lr))  # its value, read once at construction
    return lr


def _check_attention_norm(attention_norm):
    if attention_norm not in ("loss", "own"):
        raise ValueError(f"attention_norm must be 'loss' or 'own', got {attention_norm!r}")
    return attention_norm


_SETTING_CHECKS = {
    "lr": _check_lr,
    "betas": _check_betas,
    "eps": lambda v: check_finite_number("eps", v, positive=True),
    "weight_decay": lambda v: _check_non_negative("weight_decay", v),
    "gamma": _check_gamma,
    "attention_norm": _check_attention_norm,
}


def _check_settings(settings: dict) -> dict:
    """The optimizer settings in ``settings`` checked (ValueError/TypeError naming the one
    that is wrong) and normalised (floats, a tuple of betas)."""
    return {k: _SETTING_CHECKS[k](v) for k, v in settings.items() if k in _SETTING_CHECKS}


class AttentionInformedAdam(torch.optim.Optimizer):
    """AdamW with an attention-energy term (docs/math.md §6).

    Args:
        params: parameters or parameter groups (each group may set its own ``lr``, ``betas``,
            ``eps``, ``weight_decay`` and ``gamma``).
        lr: learning rate: a number, or a one-element floating tensor (as in
            ``torch.optim.AdamW``; read on the host once per parameter and step, as there).
        betas: Adam's moment coefficients ``(β1, β2)``.
        eps: Adam's ε.
        weight_decay: decoupled weight decay (AdamW's).
        gamma: γ in ``α = sigmoid(γ·Ē)``; ±inf gives α ∈ {0, 1} by the sign of Ē
            (and α = ½ when Ē = 0).
        attention_norm: what divides the attention gradient: ``"own"`` (the default,
            docs/math.md §6: ``g_att/(√û+ε)`` with ``û`` the bias-corrected second moment of
            ``g_att`` itself, so both directions have unit scale) or ``"loss"`` (the seed's
            literal form, ``g_att/(√v̂+ε)`` with the loss gradient's ``v̂``; see the note below).
        energy_source: the ``nn.Module`` whose :class:`EnergyRecorder` submodules supply Ē and
            the free energy (usually the model; a DDP wrapper works too).

    Note on ``attention_norm="loss"``: where the loss gradient is small (query/key weights at
    initialisation, when attention is nearly uniform) ``g_att/(√v̂+ε)`` is unbounded, and since
    the free energy is unbounded below, the term can grow the energies without limit.
    ``"own"`` bounds the attention step like Adam bounds its own. Measured: on the README's
    example (2-layer GPT, ``d_model=64``, lr 3e-3, γ = 1, 20 steps) ``"loss"`` blows up on 6 of
    seeds 0–7 (5 of them by step 3); ``"own"`` trains on all 8 (docs/results.md §2).

    Use::

        logits, loss = model(x, y)          # recorders store Ē and F during this forward
        opt.zero_grad()
        opt.backward(loss)                  # g_att (one extra backward), then loss.backward()
        opt.step()

    :meth:`attention_backward` may be called by hand before ``loss.backward()`` instead (the
    free energy's graph is part of the loss's graph, so it must run first, or the loss backward
    must keep the graph). With AMP, pass the ``GradScaler`` to it: the free energy is scaled the
    same way and unscaled in float32; a non-finite attention gradient drops the attention term
    for that step (α = 1, the AdamW step; ``"own"``'s moment of ``g_att`` takes it as zeros).
    Neither call reads a device tensor on the host. Under ``torch.distributed`` the attention
    gradient and Ē are averaged over ranks (one all-reduce), as DDP averages the loss gradient.
    If ``step`` finds no attention gradient (no recorder, or ``attention_backward`` not called)
    it takes the AdamW step. With gradient accumulation, ``step`` uses the mean attention
    gradient and Ē of the backwards since the last ``step``/``zero_grad``.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 gamma=1.0, *, attention_norm="own", energy_source):
        defaults = _check_settings({"lr": lr, "betas": betas, "eps": eps,
                                    "weight_decay": weight_decay, "gamma": gamma,
                                    "attention_norm": attention_norm})
        self.recorders = energy_modules(energy_source)
        for rec in self.recorders:
            rec.record_mean_energy = True
            rec.record_free_energy = True
        super().__init__(params, defaults)
        self._reset_attention()
        self.last_alpha: dict[int, torch.Tensor] = {}

    def _reset_attention(self) -> None:
        """Forget the attention gradients and Ē gathered for the next :meth:`step`."""
        self._att_grads: dict[torch.Tensor, torch.Tensor] | None = None  # sums over backwards
        self._att_finite: torch.Tensor | None = None  # 0-d bool on the device: all finite
        self._energy_sum: torch.Tensor | None = None
        self._att_backwards = 0

    def __getstate__(self) -> dict:
        # torch.optim.Optimizer pickles (and deep-copies) only defaults, state and param_groups;
        # the recorders go along so that a copy keeps its energy source.
        return {**super().__getstate__(), "recorders": self.recorders}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("recorders", [])
        self._reset_attention()
        self.last_alpha = {}

    def add_param_group(self, param_group: dict) -> None:
        """``torch.optim.Optimizer.add_param_group``, with the group's own settings checked like
        the constructor's arguments, and complex parameters refused (the update is written for
        real ones)."""
        if isinstance(param_group, dict):
            param_group.update(_check_settings(param_group))
        super().add_param_group(param_group)
        if any(p.is_complex() for p in self.param_groups[-1]["params"]):
            self.param_groups.pop()
            raise TypeError("params must be real: AttentionInformedAdam does not support complex "
                            "parameters (view them as real ones with torch.view_as_real)")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``; also forgets the attention gradients gathered
        since the last :meth:`step` (like the loss gradients, e.g. after a step that a
        ``GradScaler`` skipped)."""
        super().zero_grad(set_to_none)
        self._reset_attention()

    # ------------------------------------------------------------------ attention gradient
    def attention_backward(self, scaler=None) -> None:
        """Compute ``g_att = ∂F/∂θ`` from the last forward's free energies (keeps the graph).

        Calls between two steps accumulate like ``.grad`` does (gradient accumulation):
        :meth:`step` uses the mean ``g_att`` and the mean Ē of the calls since the last
        :meth:`step` or :meth:`zero_grad`, so ``k`` micro-batches whose losses are divided by
        ``k`` step like their whole batch.

        Args:
            scaler: an optional ``torch.amp.GradScaler`` (AMP): F is scaled by its current
                scale before the backward and the gradient unscaled afterwards.

        Nothing here waits for the device (no host sync): whether ``g_att`` is finite is kept
        as a device flag that :meth:`step` applies.
        """
        frees = [r.free_energy for r in self.recorders if r.free_energy is not None]
        means = [r.mean_energy for r in self.recorders if r.mean_energy is not None]
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        for rec in self.recorders:
            rec.free_energy = None  # release the graph reference (``free`` holds it below)
        if not frees or not means:
            return
        free = torch.stack([_acc(f) for f in frees]).sum()
        if not free.requires_grad or not params:
            return  # nothing trainable reaches F: every parameter takes the AdamW step
        scale = None
        if scaler is not None and scaler.is_enabled():
            # the scale as a device tensor (GradScaler.get_scale() would sync with the host)
            scale = scaler.scale(torch.ones((), dtype=free.dtype, device=free.device))
        grads = torch.autograd.grad(free if scale is None else free * scale, params,
                                    retain_graph=True, allow_unused=True)
        mean_energy = torch.stack(means).mean()
        reached = [(p, _acc(g)) for p, g in zip(params, grads) if g is not None]
        if not reached:
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # One flat all-reduce: every rank sees the same Ē and the averaged g_att.
            flat = torch.cat([g.reshape(-1) for _, g in reached]
                             + [mean_energy.reshape(1)])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            mean_energy = flat[-1]
            out, offset = [], 0
            for p, g in reached:
                out.append((p, flat[offset:offset + g.numel()].view_as(g)))
                offset += g.numel()
            reached = out
        if scale is not None:
            reached = [(p, g / scale.to(g.device)) for p, g in reached]
        finite = torch.stack([torch.isfinite(g).all() for _, g in reached]).all()
        if self._att_grads is None:
            self._att_grads, self._att_finite, self._energy_sum = {}, finite, mean_energy
        else:
            self._att_finite = self._att_finite & finite
            self._energy_sum = self._energy_sum + mean_energy
        for p, g in reached:
            self._att_grads[p] = g if p not in self._att_grads else self._att_grads[p] + g
        self._att_backwards += 1

    def backward(self, loss, scaler=None) -> None:
        """``attention_backward(scaler)`` then the (scaled) loss backward."""
        self.attention_backward(scaler)
        (scaler.scale(loss) if scaler is not None else loss).backward()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        att = self._att_grads or {}
        finite, calls = self._att_finite, self._att_backwards
        mean_energy = self._energy_sum if calls <= 1 else self._energy_sum / calls
        for gi, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            alpha = None
            if att:
                z = group["gamma"] * mean_energy
                z = torch.where(mean_energy == 0, torch.zeros_like(z), z)
                # a non-finite g_att (an AMP overflow) drops the attention term: α = 1
                alpha = torch.where(finite, torch.sigmoid(z), torch.ones_like(z))
                self.last_alpha[gi] = alpha
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("AttentionInformedAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                step = state["step"].item()
                # The same arithmetic, in the same order, as torch.optim.AdamW (single tensor).
                p.mul_(1 - lr * wd)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad.conj(), value=1 - beta2)
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                step_size = lr / bias_correction1
                # ``** 0.5``, not math.sqrt: AdamW's rounding (they differ by an ulp at some steps)
                denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
                g_att = att.get(p)
                if g_att is None:
                    p.addcdiv_(exp_avg, denom, value=-step_size)
                else:
                    # dropped (non-finite) attention gradients count as zeros for this step
                    g_att = torch.where(finite, g_att if calls == 1 else g_att / calls, 0)
                    g_att = g_att.to(p.dtype)
                    if group["attention_norm"] == "own":
                        if "att_sq" not in state:
                            state["att_step"] = 0
                            state["att_sq"] = torch.zeros_like(p)
                        # a Python int: load_state_dict casts every state tensor but "step" to
                        # p's dtype, and a bf16 counter stops at 256. int() reads older
                        # checkpoints' tensor counters.
                        state["att_step"] = int(state["att_step"]) + 1
                        state["att_sq"].mul_(beta2).addcmul_(g_att, g_att, value=1 - beta2)
                        bc = 1 - beta2 ** state["att_step"]
                        att_denom = (state["att_sq"].sqrt() / bc**0.5).add_(eps)
                        p.addcdiv_(exp_avg * alpha, denom, value=-step_size)
                        p.addcdiv_(g_att * (1 - alpha), att_denom, value=-lr)
                        continue
                    # lr·(α·m̂ + (1−α)·g_att)/(√v̂+ε), written as AdamW's step_size·(…)/denom so
                    # that α = 1 reproduces AdamW bit for bit.
                    direction = exp_avg * alpha + g_att * ((1 - alpha) * bias_correction1)
                    p.addcdiv_(direction, denom, value=-step_size)
        self._reset_attention()
        return loss
