"""A tiny stand-in model for the optimizer tests: one recording attention layer (tests only)."""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from energy_attn.optim import EnergyRecorder


class TinyAttention(EnergyRecorder, nn.Module):
    """Multi-head self-attention that records its energies.

    ``tie="neg"`` uses keys ``k = −q`` (so the non-causal mean energy is ``≤ 0``), ``"pos"``
    uses ``k = q`` (``≥ 0``), ``None`` has its own key projection.
    """

    def __init__(self, dim=8, heads=2, causal=True, tie=None):
        super().__init__()
        self.heads, self.causal, self.tie = heads, causal, tie
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = None if tie else nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x):
        def split(t):  # [b, n, (h d)] -> [b, h, n, d]
            return rearrange(t, "b n (h d) -> b h n d", h=self.heads)

        q = split(self.to_q(x))
        k = {"neg": -q, "pos": q}[self.tie] if self.tie else split(self.to_k(x))
        v = split(self.to_v(x))
        scale = q.shape[-1] ** -0.5
        self.record_energy(q, k, scale, causal=self.causal)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=scale)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class TinyModel(nn.Module):
    def __init__(self, vocab=16, dim=8, heads=2, causal=True, tie=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.attn = TinyAttention(dim, heads, causal, tie)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx, targets=None):
        x = self.emb(idx)
        x = x + self.attn(x)
        logits = self.head(x)
        loss = None if targets is None else F.cross_entropy(
            logits.flatten(0, 1), targets.flatten())
        return logits, loss


def batch(seed, b=4, n=6, vocab=16):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (b, n + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]
