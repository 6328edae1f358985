"""One check for a ``--device`` / ``device=`` string given by a user (commands and configs)."""

from __future__ import annotations

import torch


def check_device(device, *, name: str = "device", available: bool = True) -> torch.device:
    """``device`` as a ``torch.device``; ValueError naming ``name`` if it is not one.

    Args:
        device: a device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) or
            ``torch.device``.
        name: the argument's name for the error message (e.g. ``"--device"``).
        available: also require the device to exist on this machine (CUDA/MPS present, the
            CUDA index in range).

    Raises:
        ValueError: not a device string (e.g. ``"gpu"``), the ``meta`` device (no values to
            compute with), or not available here.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name} {device!r} is not a torch device; use cpu, cuda, cuda:N or "
                         "mps") from err
    if dev.type == "meta":
        raise ValueError(f"{name} {device!r} holds shapes, not values: nothing can run on it; "
                         "use cpu, cuda, cuda:N or mps")
    if available:
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"{name} {device!r} requested but CUDA is not available")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ValueError(f"{name} {device!r}: this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s)")
        elif dev.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"{name} {device!r} requested but MPS is not available")
    return dev
