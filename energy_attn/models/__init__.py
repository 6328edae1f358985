"""Small GPT-style stacks of the optimizer-inspired blocks."""

from .gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
