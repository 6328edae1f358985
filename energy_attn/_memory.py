"""Bytes autograd saves for backward: the memory measure every benchmark and memory test uses.

Counted with ``torch.autograd.graph.saved_tensors_hooks`` while a function runs, so the number
is deterministic (unlike RSS) and the same on every device. Two conventions, both needed:
``per_storage=False`` adds ``numel × element_size`` of every saved tensor (a tensor saved twice
counts twice: what a layer asks autograd to keep); ``per_storage=True`` counts each underlying
storage once, whole (what actually stays allocated when views or the same tensor are saved
several times).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def saved_bytes(fn: Callable[[], Any], *, per_storage: bool = False) -> tuple[Any, int]:
    """Run ``fn()`` and return ``(its result, bytes saved for backward while it ran)``."""
    tensors = 0
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal tensors
        if per_storage:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        else:
            tensors += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, (sum(storages.values()) if per_storage else tensors)
