"""A small causal GPT built from the optimizer-inspired blocks (for training comparisons).

Token + learned position embeddings → ``n_layer`` blocks of one variant (the momentum buffer
threads through them) → final LayerNorm → a language-model head tied to the token embedding.
Initialisation follows GPT-2: normal(0, 0.02) weights, zero biases, and the two residual output
projections of each block scaled by ``1/sqrt(2·n_layer)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._utils import (
    check_finite_number,
    check_module_input,
    check_num_steps,
    check_positive_int,
    check_step_size,
)
from ..descent import check_optimizer
from ..layers.blocks import VARIANTS, OptimizerBlock
from ..layers.self_attention import ATTENTIONS


@dataclass
class GPTConfig:
    """Configuration of :class:`GPT`.

    Attributes:
        vocab_size: number of tokens.
        n_layer, n_head, d_model: depth, heads, width (``d_model % n_head == 0``).
        context: maximum sequence length (position embeddings).
        dropout: dropout on embeddings, attention probabilities and residual branches.
        block: ``"mha" | "momen" | "nag" | "2nd1st" | "light2nd1st"``.
        attention: ``"softmax"`` or ``"energy"`` (each block's queries descend the Hopfield
            energy for ``num_steps − 1`` steps before the read-out of the values).
        num_steps, step_size, optimizer, momentum: energy-attention options (docs/math.md §4, §10).
        rho, learn_rho: momentum of momen/nag blocks (``sigmoid`` of a parameter if learned).
        gamma, learn_gamma: per-head Newton weight of 2nd1st/light2nd1st blocks.
        mlp_ratio: FFN width multiplier.
        bias: biases in linear maps and LayerNorms.
    """

    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    context: int = 256
    dropout: float = 0.0
    block: str = "mha"
    attention: str = "softmax"
    num_steps: int = 1
    step_size: float = 1.0
    optimizer: str = "gd"
    momentum: float = 0.0
    rho: float = 0.5
    learn_rho: bool = True
    gamma: float = 0.5
    learn_gamma: bool = True
    mlp_ratio: int = 4
    bias: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "context", "mlp_ratio",
                     "num_steps"):
            check_positive_int(name, getattr(self, name))
        if self.block not in VARIANTS:
            raise ValueError(f"block must be one of {VARIANTS}, got {self.block!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if not 0.0 <= check_finite_number("dropout", self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        check_step_size(self.step_size)
        check_optimizer(self.optimizer, self.momentum)


def _tie_after_load(model: GPT, incompatible_keys) -> None:
    """A load-state-dict post-hook (a module-level function: the model stays picklable)."""
    model._tie_weights()


class GPT(nn.Module):
    """Causal language model of :class:`GPTConfig`.

    ``forward(idx [B, N] long, targets [B, N] long | None) -> (logits [B, N, vocab], loss)``,
    ``loss`` the mean cross-entropy (targets ``-1`` ignored; a float32 scalar, float64 for a
    float64 model) or None. Token ids out of
    ``[0, vocab_size)`` raise ``ValueError`` for CPU tensors; on a GPU they are not checked (that
    would sync with the host at every call) and fail inside the embedding or the loss.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        c = self.config = config
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.wpe = nn.Embedding(c.context, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            OptimizerBlock(
                c.d_model, c.n_head, c.block, dropout=c.dropout, mlp_ratio=c.mlp_ratio,
                bias=c.bias, rho=c.rho, learn_rho=c.learn_rho, gamma=c.gamma,
                learn_gamma=c.learn_gamma, attention=c.attention, num_steps=c.num_steps,
                step_size=c.step_size, optimizer=c.optimizer, momentum=c.momentum,
            )
            for _ in range(c.n_layer)
        )
        self.ln_f = nn.LayerNorm(c.d_model, bias=c.bias)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.reset_parameters()
        # load_state_dict(assign=True) assigns wte and lm_head a Parameter each: tie them again
        self.register_load_state_dict_post_hook(_tie_after_load)

    def _tie_weights(self) -> None:
        """The language-model head shares the token embedding's matrix."""
        self.lm_head.weight = self.wte.weight

    def reset_parameters(self) -> None:
        """Initialise every parameter and buffer as the constructor does (GPT-2's scheme, module
        docstring; LayerNorms and the blocks' ρ/γ at their defaults) and tie ``lm_head`` to the
        token embedding again, which ``to_empty`` (after building on the meta device) unties."""
        self._tie_weights()
        for module in self.modules():  # the deterministic ones (no random draws)
            if module is not self and not isinstance(module, (nn.Linear, nn.Embedding)) and \
                    hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self.apply(self._init_weights)
        for block in self.blocks:  # residual output maps: GPT-2's 1/sqrt(2·n_layer)
            for w in (block.attn.to_out.weight, block.ffn[2].weight):
                nn.init.normal_(w, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); ``non_embedding`` drops both embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + self.wpe.weight.numel()
        return n

    def _check_tokens(self, name: str, t, lowest: int = 0) -> None:
        """``t`` is a ``[B, N]`` ``torch.long`` tensor on the model's device, with values in
        ``[lowest, vocab_size)``. The values are checked on CPU only and not while compiling:
        on a GPU the check would sync with the host at every call (there an index out of range
        fails inside the embedding or the loss instead)."""
        if not isinstance(t, torch.Tensor) or t.dtype != torch.long or t.dim() != 2:
            raise TypeError(f"{name} must be a [B, N] torch.long tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} "
                            f"{tuple(getattr(t, 'shape', ()))}")
        check_module_input(self, **{name: t})
        if t.device.type == "cpu" and t.numel() and not torch.compiler.is_compiling():
            lo, hi = (v.item() for v in torch.aminmax(t))
            if lo < lowest or hi >= self.config.vocab_size:
                raise ValueError(f"{name} must hold token ids in [{lowest}, vocab_size="
                                 f"{self.config.vocab_size}), got values in [{lo}, {hi}]")

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        self._check_tokens("idx", idx)
        N = idx.shape[1]
        if not 1 <= N <= self.config.context:
            raise ValueError(f"sequence length must be in [1, context={self.config.context}], "
                             f"got {N}")
        if targets is not None:
            if isinstance(targets, torch.Tensor) and targets.shape != idx.shape:
                raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got "
                                 f"{tuple(targets.shape)}")
            self._check_tokens("targets", targets, lowest=-1)  # -1: ignored
        pos = torch.arange(N, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # [B, N, d_model]
        state = None  # momentum buffer m_{l−1} (momen / nag)
        for block in self.blocks:
            x, state = block(x, state, is_causal=True)
        logits = self.lm_head(self.ln_f(x))  # [B, N, vocab]
        loss = None
        if targets is not None:
            # in float32 at least: 16-bit logits are upcast, float64 ones stay float64
            acc = torch.promote_types(logits.dtype, torch.float32)
            loss = F.cross_entropy(logits.flatten(0, 1).to(acc), targets.flatten(),
                                   ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx [B, N]``; returns ``[B, N + new]``.

        The context is cropped to the last ``config.context`` tokens. ``temperature > 0``;
        ``top_k`` keeps the k most likely tokens.
        """
        self._check_tokens("idx", idx)
        if idx.shape[1] < 1:
            raise ValueError(f"idx must hold at least one token to continue, got shape "
                             f"{tuple(idx.shape)}")
        max_new_tokens = check_num_steps(max_new_tokens, "max_new_tokens")
        temperature = check_finite_number("temperature", temperature, positive=True)
        if top_k is not None and check_num_steps(top_k, "top_k") < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.context:])
            logits = logits[:, -1].float() / temperature  # [B, vocab]
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(dim=-1), num_samples=1)
            idx = torch.cat([idx, nxt], dim=1)
        return idx

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())
