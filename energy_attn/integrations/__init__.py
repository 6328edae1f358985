"""Drop-in adapters: ``torch.nn.MultiheadAttention`` (here) and Hugging Face
(``energy_attn.integrations.huggingface``, imported on demand: it needs ``transformers``)."""

from .torch_mha import EnergyMultiheadAttention, swap_attention

__all__ = ["EnergyMultiheadAttention", "swap_attention"]
