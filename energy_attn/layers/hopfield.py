"""Hopfield layers with the semantics of hopfield-layers (Ramsauer et al., 2020) on the shared core.

Three modules, as in the original library:

* :class:`Hopfield`: the association ``softmax(β ξ Kᵀ) V`` between *state* patterns (the
  queries), *stored* patterns (the keys) and a *pattern projection* (the values), each
  optionally layer-normalised and linearly projected. ``update_steps_max = T > 0`` first
  iterates the state ``ξ ← softmax(β ξ Kᵀ) K`` (gradient descent with step 1 on the Hopfield
  energy, MATH.md §1) for T steps, then reads out the values with the final association.
* :class:`HopfieldPooling`: the state patterns are learned (``quantity`` of them): pooling over
  a set or sequence given as stored patterns.
* :class:`HopfieldLayer`: the stored patterns (and the projection) are learned (``quantity``
  lookup weights): a learned memory looked up by the input, given as state patterns.

What differs from the original (on purpose):

* The iteration runs through :func:`energy_attn.hopfield_descent` with a **fixed** step count
  ``T = update_steps_max``. ``update_steps_eps`` is a *masked* stop: a query whose next update
  would move it less than ``eps`` stays where it is (the original applies that last small update
  and then stops, per head; the difference is below ``eps``). No Python loop on tensor values,
  so ``torch.compile(fullgraph=True)`` works. ``update_steps_max=None`` (unbounded) is refused.
* ``solver="fixed_point"`` replaces the T unrolled steps by a fixed-point solve with implicit
  differentiation (memory independent of T; see :mod:`energy_attn.fixed_point`).
* :meth:`Hopfield.energy` returns the Hopfield energy of every final state pattern, and
  :meth:`Hopfield.get_association_matrix` keeps gradients.
* Masks follow hopfield-layers / ``nn.MultiheadAttention``: boolean, **True = blocked**. They
  are converted once, here, to this package's convention (True = may attend). Additive float
  masks are refused. Queries with every key blocked read out zeros (finite, never NaN).
* Not offered: ``normalize_hopfield_space``, ``pattern_projection_as_connected``,
  ``association_activation``, ``concat_bias_pattern``, ``add_zero_association`` and per-head
  tensor ``scaling``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .._utils import (
    check_finite_number,
    check_float_tensor,
    check_module_input,
    check_num_steps,
    default,
    exists,
)
from ..energies.hopfield import _logits, _readout, hopfield_energy
from ..fixed_point import check_solver
from ..ops.hopfield import BACKENDS, hopfield_descent


def _layer_norm(enabled: bool, affine: bool, size: int, name: str):
    if affine and not enabled:
        raise ValueError(
            f"normalize_{name}_affine=True needs normalize_{name}=True (affine normalisation "
            f"without normalisation has no effect); pass normalize_{name}_affine=False"
        )
    return nn.LayerNorm(size, elementwise_affine=affine) if enabled else None


class Hopfield(nn.Module):
    """Hopfield association of state, stored and projected patterns (hopfield-layers' ``Hopfield``).

    Args:
        input_size: size of the state patterns (and the default size of the other two inputs).
        hidden_size: size of the association space per head (default ``input_size //
            num_heads``).
        output_size: size of the output projection (default ``input_size``).
        pattern_size: size of each head's projected values (default ``hidden_size``, or
            ``pattern_projection_size // num_heads`` when the projection is static).
        num_heads: number of parallel associations.
        scaling: inverse temperature ``β`` (a float); default ``hidden_size ** -0.5``, or 1.0
            when all three patterns are static and the output projection is disabled (as the
            original).
        update_steps_max: ``T >= 0``. 0 is one association (plain attention); ``T`` first
            runs T descent steps of the state patterns. A Python int (fixed count).
        update_steps_eps: masked tolerance stop of those steps (``>= 0``; 0 disables it).
        normalize_stored_pattern, normalize_state_pattern, normalize_pattern_projection:
            LayerNorm on each raw input; ``*_affine``: with learnable affine parameters
            (needs the normalisation on).
        stored_pattern_as_static, state_pattern_as_static, pattern_projection_as_static:
            use the (normalised) raw pattern without a linear projection; its size must then be
            ``num_heads * hidden_size`` (``num_heads * pattern_size`` for the projection), split
            into the heads (the original expects ``hidden_size``: the same for one head).
        stored_pattern_size, pattern_projection_size: sizes of those inputs (default
            ``input_size``).
        batch_first: inputs and outputs are ``[batch, seq, feature]`` (else ``[seq, batch,
            feature]``).
        dropout: dropout probability on the association matrix of the final read-out.
        input_bias: bias in the input projections.
        disable_out_projection: return the concatenated heads ``[.., num_heads * pattern_size]``.
        solver: ``"unrolled"`` or ``"fixed_point"`` (``update_steps_max`` forward and adjoint
            iterations; the tolerance stop does not apply).
        anderson: Anderson history size for ``solver="fixed_point"``.
        backend: backend of :func:`energy_attn.hopfield_descent` for the iteration.

    The arguments up to ``update_steps_eps`` are positional in the original's order; the rest
    are keyword-only (the original interleaves ``*_eps`` arguments this module does not take).

    ``forward(input, stored_pattern_padding_mask=None, association_mask=None)``:
        ``input`` is one tensor ``[B, L, input_size]`` (used as stored, state and projection:
        self-association) or a tuple ``(stored [B, M, stored_size], state [B, N, input_size],
        pattern_projection [B, M, pattern_projection_size])``.
        ``stored_pattern_padding_mask``: ``[B, M]`` boolean, **True = padding (blocked)**.
        ``association_mask``: ``[N, M]`` or ``[B * num_heads, N, M]`` boolean, **True =
        blocked**. Returns ``[B, N, output_size]``.
    """

    def __init__(self, input_size, hidden_size=None, output_size=None, pattern_size=None,
                 num_heads=1, scaling=None, update_steps_max=0, update_steps_eps=1e-4, *,
                 normalize_stored_pattern=True, normalize_stored_pattern_affine=True,
                 normalize_state_pattern=True, normalize_state_pattern_affine=True,
                 normalize_pattern_projection=True, normalize_pattern_projection_affine=True,
                 stored_pattern_as_static=False, state_pattern_as_static=False,
                 pattern_projection_as_static=False, stored_pattern_size=None,
                 pattern_projection_size=None, batch_first=True, dropout=0.0, input_bias=True,
                 disable_out_projection=False, solver="unrolled", anderson=0, backend="auto"):
        super().__init__()
        input_size = check_num_steps(input_size, "input_size")
        num_heads = check_num_steps(num_heads, "num_heads")
        if input_size < 1 or num_heads < 1:
            raise ValueError(f"input_size and num_heads must be >= 1, got {input_size}, "
                             f"{num_heads}")
        if update_steps_max is None:
            raise ValueError("update_steps_max=None (unbounded) is not supported: give a fixed "
                             "int (steps are fixed counts; update_steps_eps stops early, masked)")
        self.update_steps_max = check_num_steps(update_steps_max, "update_steps_max")
        self.update_steps_eps = check_finite_number("update_steps_eps", update_steps_eps)
        if self.update_steps_eps < 0:
            raise ValueError(f"update_steps_eps must be >= 0, got {update_steps_eps}")
        self.anderson = check_solver(solver, anderson)
        self.solver = solver
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        if backend not in ("auto", "reference") and solver == "unrolled" and \
                self.update_steps_max > 0 and self.update_steps_eps > 0:
            raise ValueError(f"update_steps_eps > 0 (the masked stop) runs on backend='reference'; "
                             f"pass update_steps_eps=0 to use backend={backend!r}")
        dropout = check_finite_number("dropout", dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = dropout
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first must be a bool, got {type(batch_first).__name__}")
        self.batch_first = batch_first

        stored_size = default(stored_pattern_size, input_size)
        proj_size = default(pattern_projection_size, input_size)
        if hidden_size is None:
            if input_size % num_heads:
                raise ValueError(f"input_size ({input_size}) must be divisible by num_heads "
                                 f"({num_heads}), or give hidden_size")
            hidden_size = input_size // num_heads
        if pattern_size is None:
            pattern_size = proj_size // num_heads if pattern_projection_as_static else hidden_size
        self.input_size, self.hidden_size, self.pattern_size = input_size, hidden_size, pattern_size
        self.stored_pattern_size, self.pattern_projection_size = stored_size, proj_size
        self.num_heads = num_heads
        inner, inner_v = num_heads * hidden_size, num_heads * pattern_size

        for name, static, size, want in (
            ("stored_pattern", stored_pattern_as_static, stored_size, inner),
            ("state_pattern", state_pattern_as_static, input_size, inner),
            ("pattern_projection", pattern_projection_as_static, proj_size, inner_v),
        ):
            if static and size != want:
                raise ValueError(
                    f"{name}_as_static=True uses the raw pattern as the association input, so its "
                    f"size ({size}) must equal num_heads * "
                    f"{'pattern_size' if name == 'pattern_projection' else 'hidden_size'} ({want})"
                )
        self.state_pattern_as_static = state_pattern_as_static
        self.stored_pattern_as_static = stored_pattern_as_static
        self.pattern_projection_as_static = pattern_projection_as_static
        self.norm_stored_pattern = _layer_norm(
            normalize_stored_pattern, normalize_stored_pattern_affine, stored_size,
            "stored_pattern")
        self.norm_state_pattern = _layer_norm(
            normalize_state_pattern, normalize_state_pattern_affine, input_size, "state_pattern")
        self.norm_pattern_projection = _layer_norm(
            normalize_pattern_projection, normalize_pattern_projection_affine, proj_size,
            "pattern_projection")
        linear = lambda i, o, static: None if static else nn.Linear(i, o, bias=input_bias)  # noqa: E731
        self.q_proj = linear(input_size, inner, state_pattern_as_static)
        self.k_proj = linear(stored_size, inner, stored_pattern_as_static)
        self.v_proj = linear(proj_size, inner_v, pattern_projection_as_static)
        if disable_out_projection:
            if exists(output_size) and output_size != inner_v:
                raise ValueError(f"disable_out_projection=True outputs num_heads * pattern_size "
                                 f"= {inner_v} features; output_size={output_size} contradicts it")
            self.out_proj = None
            self.output_size = inner_v
        else:
            self.output_size = default(output_size, input_size)
            self.out_proj = nn.Linear(inner_v, self.output_size)

        static_only = stored_pattern_as_static and state_pattern_as_static and \
            pattern_projection_as_static and disable_out_projection
        if scaling is None:
            scaling = 1.0 if static_only else hidden_size**-0.5
        self.scaling = check_finite_number("scaling", scaling, positive=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original's initialisation: weights ``N(0, 0.02)``, biases 0, LayerNorms (1, 0)."""
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if exists(lin):
                nn.init.normal_(lin.weight, mean=0.0, std=0.02)
                if exists(lin.bias):
                    nn.init.zeros_(lin.bias)
        for norm in (self.norm_stored_pattern, self.norm_state_pattern,
                     self.norm_pattern_projection):
            if exists(norm):
                norm.reset_parameters()

    # -- input handling ------------------------------------------------------------------------

    def _split_input(self, input):
        """``input`` -> batch-first ``(stored, state, projection)``."""
        if isinstance(input, torch.Tensor):
            parts = (input, input, input)
        elif isinstance(input, (tuple, list)) and len(input) == 3:
            parts = tuple(input)
        else:
            raise TypeError("input must be a tensor or a tuple (stored_pattern, state_pattern, "
                            "pattern_projection)")
        names = ("stored_pattern", "state_pattern", "pattern_projection")
        if isinstance(input, torch.Tensor):
            check_module_input(self, input=input)
        sizes = (self.stored_pattern_size, self.input_size, self.pattern_projection_size)
        out = []
        for name, t, size in zip(names, parts, sizes):
            check_float_tensor(name, t, ndim=3)
            check_module_input(self, **{name: t})
            t = t if self.batch_first else t.transpose(0, 1)  # [L, B, F] -> [B, L, F]
            if t.shape[-1] != size:
                raise ValueError(f"{name} must have {size} features, got shape {tuple(t.shape)}")
            out.append(t)
        stored, state, proj = out
        if not (stored.shape[0] == state.shape[0] == proj.shape[0]):
            raise ValueError(f"stored_pattern, state_pattern and pattern_projection must share the "
                             f"batch size, got {[tuple(t.shape) for t in out]} (batch first)")
        if stored.shape[1] != proj.shape[1]:
            raise ValueError(f"stored_pattern and pattern_projection must hold the same number of "
                             f"patterns, got {stored.shape[1]} and {proj.shape[1]}")
        devices = {t.device for t in out}
        if len(devices) > 1:
            raise ValueError(f"all patterns must be on one device, got {sorted(map(str, devices))}")
        return stored, state, proj

    def _mask(self, stored_pattern_padding_mask, association_mask, B, N, M, device):
        """hopfield-layers' masks (True = blocked) -> ``[B, 1|H, 1|N, M]``, True = may attend."""
        allowed = None
        if exists(stored_pattern_padding_mask):
            pad = stored_pattern_padding_mask
            self._check_mask("stored_pattern_padding_mask", pad, device, [(B, M)])
            allowed = rearrange(~pad, "b m -> b 1 1 m")
        if exists(association_mask):
            am = association_mask
            self._check_mask("association_mask", am, device, [(N, M), (B * self.num_heads, N, M)])
            am = ~am if am.dim() == 2 else rearrange(~am, "(b h) n m -> b h n m", b=B)
            allowed = am if allowed is None else allowed & am
        return allowed

    @staticmethod
    def _check_mask(name, mask, device, shapes):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{name} must be a boolean tensor (True = blocked, as hopfield-layers "
                            f"and nn.MultiheadAttention), got {getattr(mask, 'dtype', type(mask))}")
        if tuple(mask.shape) not in shapes:
            raise ValueError(f"{name} must have shape {' or '.join(map(str, shapes))}, got "
                             f"{tuple(mask.shape)}")
        if mask.device != device:
            raise ValueError(f"{name} is on {mask.device} but the patterns are on {device}")

    def _project(self, input, stored_pattern_padding_mask=None, association_mask=None):
        """Normalise, project, split heads: ``q [B,H,N,d]``, ``k [B,H,M,d]``, ``v [B,H,M,dv]``."""
        stored, state, proj = self._split_input(input)
        B, N, M = state.shape[0], state.shape[1], stored.shape[1]
        mask = self._mask(stored_pattern_padding_mask, association_mask, B, N, M, state.device)

        def prepare(x, norm, lin):
            x = norm(x) if exists(norm) else x
            x = lin(x) if exists(lin) else x
            return rearrange(x, "b n (h d) -> b h n d", h=self.num_heads)

        q = prepare(state, self.norm_state_pattern, self.q_proj)
        k = prepare(stored, self.norm_stored_pattern, self.k_proj)
        v = prepare(proj, self.norm_pattern_projection, self.v_proj)
        return q, k, v, mask

    def _associate(self, q, k, mask, return_energies=False):
        """The state after ``update_steps_max`` steps (``q`` itself for 0 steps)."""
        if self.update_steps_max == 0 and not return_energies:
            return q
        tol = self.update_steps_eps if self.solver == "unrolled" else 0.0
        return hopfield_descent(
            q, k, scale=self.scaling, step_size=1.0, num_steps=self.update_steps_max, mask=mask,
            tol=tol, solver=self.solver, anderson=self.anderson, backend=self.backend,
            return_energies=return_energies,
        )

    # -- public API ----------------------------------------------------------------------------

    def forward(self, input, stored_pattern_padding_mask=None, association_mask=None):
        q, k, v, mask = self._project(input, stored_pattern_padding_mask, association_mask)
        xi = self._associate(q, k, mask)
        dropout_p = self.dropout if self.training else 0.0
        if exists(mask):
            valid = mask.any(dim=-1, keepdim=True)  # rows with every key blocked read nothing
            out = F.scaled_dot_product_attention(
                xi, k, v, attn_mask=mask | ~valid, dropout_p=dropout_p, scale=self.scaling)
            out = out * valid
        else:
            out = F.scaled_dot_product_attention(xi, k, v, dropout_p=dropout_p, scale=self.scaling)
        out = rearrange(out, "b h n d -> b n (h d)")
        if exists(self.out_proj):
            out = self.out_proj(out)
        return out if self.batch_first else out.transpose(0, 1)

    def get_association_matrix(self, input, stored_pattern_padding_mask=None,
                               association_mask=None):
        """The association matrix of the final read-out, ``[B, num_heads, N, M]``.

        ``softmax(β ξ_T Kᵀ)`` over unblocked keys (rows with every key blocked are zero); no
        dropout. Differentiable (the original wraps it in ``no_grad``).
        """
        q, k, _, mask = self._project(input, stored_pattern_padding_mask, association_mask)
        xi = self._associate(q, k, mask)
        logits, valid = _logits(xi, k, self.scaling, mask)
        p, _ = _readout(logits, valid, k)
        return p.to(q.dtype)

    def energy(self, input, stored_pattern_padding_mask=None, association_mask=None,
               return_trace=False):
        """Hopfield energy of every state pattern in the association space (MATH.md §1).

        ``E(ξ_i) = ½‖ξ_i‖² − (1/β) log Σ_j exp(β ξ_i·k_j)`` over unblocked keys, at the final
        state ``ξ_T``: ``[B, num_heads, N]`` (float32 accumulation). With ``return_trace=True``
        (unrolled solver): the energy of every iterate, ``[B, num_heads, N, T + 1]``.
        """
        q, k, _, mask = self._project(input, stored_pattern_padding_mask, association_mask)
        if return_trace:
            if self.solver != "unrolled":
                raise ValueError("return_trace=True needs solver='unrolled'")
            return self._associate(q, k, mask, return_energies=True)[1]
        xi = self._associate(q, k, mask)
        return hopfield_energy(xi, k, self.scaling, mask=mask)


class _LearnedPatterns(nn.Module):
    """Shared plumbing of the two wrappers: a :class:`Hopfield` and its learned patterns."""

    def _init_weights(self, *params):
        for p in params:
            nn.init.normal_(p, mean=0.0, std=0.02)

    def _expand(self, weights, batch):
        """``[quantity, F]`` -> ``[B, quantity, F]`` (or sequence-first)."""
        w = weights.unsqueeze(0).expand(batch, -1, -1)
        return w if self.hopfield.batch_first else w.transpose(0, 1)

    def _batch(self, t):
        return t.shape[0 if self.hopfield.batch_first else 1]

    def get_association_matrix(self, input, stored_pattern_padding_mask=None,
                               association_mask=None):
        """As :meth:`Hopfield.get_association_matrix`, on the wrapped patterns."""
        return self.hopfield.get_association_matrix(
            self._prepare_input(input), stored_pattern_padding_mask, association_mask)

    def energy(self, input, stored_pattern_padding_mask=None, association_mask=None,
               return_trace=False):
        """As :meth:`Hopfield.energy`, on the wrapped patterns."""
        return self.hopfield.energy(self._prepare_input(input), stored_pattern_padding_mask,
                                    association_mask, return_trace)


class HopfieldPooling(_LearnedPatterns):
    """Pooling with ``quantity`` learned state patterns (hopfield-layers' ``HopfieldPooling``).

    Args:
        input_size: size of the stored patterns and of the learned state patterns.
        quantity: number of learned state (query) patterns.
        trainable: whether they are learned.
        **kwargs: any :class:`Hopfield` argument (``num_heads``, ``update_steps_max``, ...).
            ``stored_pattern_size`` / ``pattern_projection_size`` default to ``input_size``.

    All arguments but ``input_size`` are keyword-only (the original's positional order puts
    ``hidden_size`` second).

    ``forward(input, stored_pattern_padding_mask=None, association_mask=None)``: ``input`` is
    ``[B, M, input_size]`` (stored patterns and projection) or a tuple ``(stored,
    pattern_projection)``; returns ``[B, quantity * output_size]`` (batch first whatever
    ``batch_first``). Masks as :class:`Hopfield` (True = blocked).
    """

    def __init__(self, input_size, *, quantity=1, trainable=True, **kwargs):
        super().__init__()
        self.hopfield = Hopfield(input_size, **kwargs)
        self.quantity = check_num_steps(quantity, "quantity")
        if self.quantity < 1:
            raise ValueError(f"quantity must be >= 1, got {quantity}")
        size = self.hopfield.input_size
        self.pooling_weights = nn.Parameter(torch.empty(self.quantity, size),
                                            requires_grad=trainable)
        self._init_weights(self.pooling_weights)

    def _prepare_input(self, input):
        if isinstance(input, torch.Tensor):
            check_module_input(self, input=input)
            stored, proj = input, input
        elif isinstance(input, (tuple, list)) and len(input) == 2:
            stored, proj = input
        else:
            raise TypeError("input must be a tensor or a tuple (stored_pattern, "
                            "pattern_projection)")
        check_float_tensor("stored_pattern", stored, ndim=3)
        state = self._expand(self.pooling_weights.to(stored.dtype), self._batch(stored))
        return stored, state, proj

    def forward(self, input, stored_pattern_padding_mask=None, association_mask=None):
        out = self.hopfield(self._prepare_input(input), stored_pattern_padding_mask,
                            association_mask)
        out = out if self.hopfield.batch_first else out.transpose(0, 1)
        return rearrange(out, "b q f -> b (q f)")


class HopfieldLayer(_LearnedPatterns):
    """A lookup into ``quantity`` learned stored patterns (hopfield-layers' ``HopfieldLayer``).

    Args:
        input_size: size of the input (state) patterns.
        quantity: number of learned stored patterns.
        trainable: whether the lookup weights (stored patterns) are learned.
        lookup_weights_as_separated: learn separate target weights for the pattern projection
            (else the projection reads the lookup weights themselves).
        lookup_targets_as_trainable: whether the separate target weights are learned.
        **kwargs: any :class:`Hopfield` argument. ``stored_pattern_size`` defaults to
            ``input_size``; ``pattern_projection_size`` to the lookup weights' size.

    All arguments but ``input_size`` are keyword-only.

    ``forward(input [B, N, input_size], stored_pattern_padding_mask=None [B, quantity],
    association_mask=None)`` returns ``[B, N, output_size]``. Masks as :class:`Hopfield`.
    """

    def __init__(self, input_size, *, quantity=1, trainable=True,
                 lookup_weights_as_separated=False, lookup_targets_as_trainable=True, **kwargs):
        quantity = check_num_steps(quantity, "quantity")
        if quantity < 1:
            raise ValueError(f"quantity must be >= 1, got {quantity}")
        super().__init__()
        lookup_size = default(kwargs.get("stored_pattern_size"), input_size)
        kwargs.setdefault("pattern_projection_size", lookup_size)
        self.hopfield = Hopfield(input_size, **kwargs)
        self.quantity = quantity
        self.lookup_weights = nn.Parameter(torch.empty(quantity, lookup_size),
                                           requires_grad=trainable)
        self.target_weights = None
        if lookup_weights_as_separated:
            self.target_weights = nn.Parameter(
                torch.empty(quantity, self.hopfield.pattern_projection_size),
                requires_grad=lookup_targets_as_trainable)
        elif self.hopfield.pattern_projection_size != lookup_size:
            raise ValueError(
                f"without lookup_weights_as_separated the projection reads the lookup weights, so "
                f"pattern_projection_size ({self.hopfield.pattern_projection_size}) must equal "
                f"stored_pattern_size ({lookup_size})")
        self._init_weights(*(p for p in (self.lookup_weights, self.target_weights) if exists(p)))

    def _prepare_input(self, input):
        check_float_tensor("input", input, ndim=3)
        check_module_input(self, input=input)
        batch = self._batch(input)
        stored = self._expand(self.lookup_weights.to(input.dtype), batch)
        targets = self.target_weights if exists(self.target_weights) else self.lookup_weights
        proj = self._expand(targets.to(input.dtype), batch)
        return stored, input, proj

    def forward(self, input, stored_pattern_padding_mask=None, association_mask=None):
        return self.hopfield(self._prepare_input(input), stored_pattern_padding_mask,
                             association_mask)
