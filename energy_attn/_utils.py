"""A tiny helper vocabulary and the input checks every public entry point shares.

Public functions validate at the boundary and raise ``ValueError``/``TypeError`` naming the
argument; internals trust their callers.
"""

from __future__ import annotations

import math
import numbers

import torch

from ._moments import autocast_on

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def exists(x) -> bool:
    return x is not None


def default(x, d):
    return x if x is not None else d


def check_float_tensor(name: str, t, ndim: int | None = None) -> None:
    """``t`` is a floating-point tensor (optionally of ``ndim`` dimensions)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), "
            f"got dtype {t.dtype}"
        )
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def check_same_device(**tensors) -> None:
    """All given (non-None) tensors live on one device."""
    items = [(n, t) for n, t in tensors.items() if isinstance(t, torch.Tensor)]
    if not items:
        return
    n0, t0 = items[0]
    for n, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(
                f"{n} is on {t.device} but {n0} is on {t0.device}; all inputs must share a device"
            )


def check_num_steps(num_steps, name: str = "num_steps") -> int:
    """A non-negative Python integer (bools rejected)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative int, got {num_steps!r}")
    if num_steps < 0:
        raise ValueError(f"{name} must be >= 0, got {num_steps}")
    return int(num_steps)


def check_finite_number(name: str, x, *, positive: bool = False, allow_tensor: bool = False):
    """A finite real number (a Python number, or a 0-d/broadcastable tensor if allowed)."""
    if isinstance(x, torch.Tensor):
        if not allow_tensor:
            raise TypeError(f"{name} must be a Python number, got a tensor")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        # A data-dependent check on a tensor would sync with the host; tensors are trusted.
        return x
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    if positive and x <= 0:
        raise ValueError(f"{name} must be > 0, got {x}")
    return x


def check_positive_int(name: str, value) -> int:
    """A Python integer ``>= 1`` (bools rejected): head counts, widths."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_seed(name: str, seed) -> int:
    """A random seed ``torch.manual_seed`` takes: an int in ``[-2**63, 2**64)``.

    Raises:
        TypeError: not an int. ValueError: outside that range.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"{name} must lie in [-2**63, 2**64), got {seed}")
    return int(seed)


def check_module_input(module: torch.nn.Module, **tensors) -> None:
    """Each given tensor lives on the device of ``module``'s parameters and has their dtype (the
    layer computes with them), or, under ``torch.autocast``, is a 16-bit input to a float32
    module: otherwise a clear error naming the argument instead of one from deep inside
    ``F.linear``/``layer_norm`` (autocast casts neither float64 inputs nor a 16-bit module's
    float32 input)."""
    ref = next((t for t in module.parameters() if t.is_floating_point()), None)
    if ref is None:
        return
    half = (torch.float16, torch.bfloat16)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.device != ref.device:
            raise ValueError(
                f"{name} is on {t.device} but the module's parameters are on {ref.device}; "
                f"move one to the other (e.g. module.to({str(t.device)!r}))"
            )
        autocast_ok = autocast_on(t.device.type) and ref.dtype == torch.float32 and t.dtype in half
        if t.is_floating_point() and t.dtype != ref.dtype and not autocast_ok:
            fix = f"cast one to the other (e.g. module.to({t.dtype})) or run under torch.autocast"
            if ref.dtype in half and autocast_on(t.device.type):
                fix = ("under torch.autocast keep the module in float32 (module.float()): "
                       "autocast runs its products in 16 bits")
            raise TypeError(
                f"{name} has dtype {t.dtype} but the module's parameters are {ref.dtype}; {fix}"
            )


def check_step_size(step_size, name: str = "step_size") -> float:
    """The descent step size ``η``: a finite number ``>= 0`` (every optimizer minimises)."""
    step_size = check_finite_number(name, step_size)
    if step_size < 0:
        raise ValueError(
            f"{name} must be >= 0, got {step_size}: the descent minimises the energy and a "
            "negative step would ascend it (to ascend, negate the energy instead)"
        )
    return step_size


def broadcasts_to(shape, target_shape) -> bool:
    """Whether ``shape`` broadcasts to ``target_shape`` itself (``broadcast_shapes`` also
    accepts shapes that would grow the target)."""
    try:
        return torch.broadcast_shapes(tuple(shape), tuple(target_shape)) == tuple(target_shape)
    except RuntimeError:
        return False


def check_bool_mask(name: str, mask, target_shape: tuple[int, ...]) -> None:
    """``mask`` is a boolean tensor broadcastable to ``target_shape`` (True = may attend)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a boolean torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = may attend), got {mask.dtype}")
    if not broadcasts_to(mask.shape, target_shape):
        raise ValueError(
            f"{name} of shape {tuple(mask.shape)} is not broadcastable to {tuple(target_shape)}"
        )


def expand_heads(t, heads: int):
    """Grouped heads: ``[B, Hk, ...] -> [B, H, ...]``, head h reads group ``h // (H // Hk)``."""
    g = heads // t.shape[1]
    return t if g == 1 else t.repeat_interleave(g, dim=1)
