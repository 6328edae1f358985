"""Hopfield layers with the interface and behaviour of hopfield-layers (Ramsauer et al., 2020).

Three modules, as in ml-jku's ``hflayers`` (same names, same constructor signatures in the same
positional order, same attributes, and they load its state dicts):

* :class:`Hopfield`: the association ``softmax(β ξ Kᵀ) V`` between *state* patterns (the
  queries), *stored* patterns (the keys) and a *pattern projection* (the values), each
  optionally layer-normalised and linearly projected. ``update_steps_max = T > 0`` first
  iterates the state ``ξ ← softmax(β ξ Kᵀ) K`` (gradient descent with step 1 on the Hopfield
  energy, docs/math.md §1.1, §10) for T steps, then reads out the values with the final
  association.
* :class:`HopfieldPooling`: the state patterns are learned (``quantity`` of them): pooling over
  a set or sequence given as stored patterns.
* :class:`HopfieldLayer`: the stored patterns (and the projection) are learned (``quantity``
  lookup weights): a learned memory looked up by the input, given as state patterns.

Migrating from hflayers is one import line; docs/zoo.md ("Migration") lists every remaining
difference. What is added here: queries with every key blocked read out zeros (finite; hflayers
gives NaN), :meth:`Hopfield.energy`, differentiable association matrices,
``solver="fixed_point"`` (implicit differentiation), fixed step counts that compile without graph
breaks, and :func:`hflayers_state_dict` to export a state dict that hflayers loads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .. import masks
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

__all__ = ["Hopfield", "HopfieldLayer", "HopfieldPooling", "hflayers_state_dict"]


def _layer_norm(enabled, affine, eps, size, name):
    if affine and not enabled:
        raise ValueError(
            f"normalize_{name}_affine=True needs normalize_{name}=True (affine normalisation "
            f"without normalisation has no effect); pass normalize_{name}_affine=False")
    if not enabled:
        return None
    eps = check_finite_number(f"normalize_{name}_eps", eps, positive=True)
    if size is None:
        raise ValueError(f"normalize_{name}=True needs the size of that input: give input_size "
                         f"(or the matching *_size argument)")
    return nn.LayerNorm(size, eps=eps, elementwise_affine=affine)


def _per_head(name, value, num_heads):
    """hflayers takes a number or a 1-D tensor with one entry per head: -> tuple of H numbers."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.shape[0] != num_heads:
            raise ValueError(f"{name} as a tensor needs one entry per head, shape ({num_heads},), "
                             f"got {tuple(value.shape)}")
        if value.is_meta:
            raise ValueError(f"{name} is a meta tensor, which holds no values: create it outside "
                             f"torch.device('meta') (or pass a number)")
        return tuple(value.tolist())  # once, at construction
    return (value,) * num_heads


def _is_elementwise(fn):
    """Whether ``fn(x)`` returns a tensor of ``x``'s shape and dtype (tried on the meta device:
    no values computed; ``torch.softmax`` (needs ``dim``) or ``torch.sum`` fail it)."""
    if not callable(fn):
        return False
    probe = torch.empty(2, 3, device="meta")
    try:
        out = fn(probe)
    except Exception:
        return False
    return isinstance(out, torch.Tensor) and out.shape == probe.shape and \
        out.dtype == probe.dtype


def _check_size(name, size):
    if size is not None:
        size = check_num_steps(size, name)
        if size < 1:
            raise ValueError(f"{name} must be >= 1, got {size}")
    return size


class Hopfield(nn.Module):
    """Hopfield association of state, stored and projected patterns (hflayers' ``Hopfield``).

    Args (hflayers' signature and positional order; the last three are this package's, keyword
    only):
        input_size: size of the state patterns (may be None only when all three patterns are
            static and the output projection is disabled: "static-only" mode).
        hidden_size: size ``d`` of the association space per head (default ``input_size //
            num_heads``; None in static-only mode).
        output_size: size of the output projection (default ``input_size``). With
            ``disable_out_projection`` it is not used (as hflayers, the attribute still reports
            it); the output then has ``num_heads`` times the per-head value size.
        pattern_size: per-head size of the projected values (default ``hidden_size``).
        num_heads: ``H``, parallel associations.
        scaling: inverse temperature ``β`` (float; a 1-D tensor of ``H`` equal entries is
            accepted as that float). Default ``hidden_size ** -0.5``, 1.0 in static-only mode.
        update_steps_max: ``T``: 0 is one association (plain attention); ``T > 0`` first runs up
            to T descent steps of the state patterns; None runs until the ``update_steps_eps`` rule
            stops every head (one host sync per step, as hflayers). A 1-D tensor gives one entry per
            head (negative = unbounded).
        update_steps_eps: hflayers' stopping rule: a head stops once the Frobenius norm (over the
            N×M association matrix) of the change of its association matrix, maximised over the
            batch, is ``<= eps``; that last update is kept. Masked per head with a fixed step
            count, so no host sync when ``update_steps_max`` is finite. ``>= 0`` (0: all T steps,
            which also admits the fused ``backend``s); a 1-D tensor gives one entry per head.
        normalize_{stored_pattern,state_pattern,pattern_projection}[_affine, _eps]: LayerNorm on
            each raw input (``_affine``: learnable, needs the normalisation; ``_eps``: its eps).
        normalize_hopfield_space[_affine, _eps]: LayerNorm over the ``d`` features of every head
            of the projected state and stored patterns (after the projections, before the
            iteration), weights shared by the heads.
        stored_pattern_as_static, state_pattern_as_static, pattern_projection_as_static: use the
            (normalised) raw pattern without a projection. A static state or stored pattern has
            ``hidden_size`` features and is given to every head (static-only mode: any size, the
            same for both). A static pattern projection is given to every head, except when the
            stored pattern is static too or ``pattern_projection_as_connected`` and the weights
            are not hflayers' packed ``in_proj`` layout: then it is split into the heads (hflayers'
            rule, kept so outputs match).
        pattern_projection_as_connected: the pattern projection first goes through the stored
            pattern's projection (needs ``pattern_projection_size == stored_pattern_size``).
        stored_pattern_size, pattern_projection_size: sizes of those inputs (default
            ``input_size``).
        batch_first: inputs and outputs are ``[batch, seq, feature]`` (else ``[seq, batch,
            feature]``).
        association_activation: name of an elementwise ``torch`` function of one tensor (e.g.
            ``"tanh"``, ``"relu"``) applied to the output. Any other name raises ``ValueError``:
            one ``torch`` lacks (e.g. ``"gelu"``; hflayers ignores it silently) or one that needs
            more arguments or changes the shape (``"softmax"``, ``"sum"``; hflayers calls it).
        dropout: dropout probability on the association matrix of the final read-out.
        input_bias: bias in the input projections and the output projection.
        concat_bias_pattern: append a learned stored pattern ``bias_k`` and projection ``bias_v``
            (in the association space, never masked); needs the stored pattern and the projection
            not static. hflayers creates these parameters but never applies them.
        add_zero_association: append an all-zero stored pattern and projection (never masked,
            so no query sees nothing).
        disable_out_projection: return the concatenated heads.
        solver: ``"unrolled"`` or ``"fixed_point"`` (``T`` forward and adjoint iterations with
            implicit differentiation, memory independent of T; ``update_steps_eps`` does not
            apply; needs a finite T). The fixed point does not depend on where the iteration
            starts, so with ``"fixed_point"`` the state patterns get no gradient, nor do
            ``q_proj`` and ``norm_state_pattern`` (docs/math.md §9): HopfieldPooling's
            ``pooling_weights`` do not learn and HopfieldLayer passes no gradient to its input.
        anderson: Anderson history size for ``solver="fixed_point"``.
        backend: backend of :func:`energy_attn.hopfield_descent`, which runs the steps when
            ``solver="fixed_point"``, or when ``update_steps_eps == 0`` and every head has the
            same ``update_steps_max``; otherwise they run in PyTorch and a ``backend`` other
            than ``"auto"`` or ``"reference"`` raises ``ValueError``.

    Raises:
        ValueError / TypeError: for arguments out of range or of the wrong type, naming them.

    ``forward(input, stored_pattern_padding_mask=None, association_mask=None)``:
        ``input`` is one tensor ``[B, L, input_size]`` (used as stored, state and projection) or
        a tuple ``(stored [B, M, .], state [B, N, .], pattern_projection [B, M, .])`` (sequence
        first if not ``batch_first``), of the parameters' float dtype (another dtype raises
        ``TypeError``); under ``torch.autocast`` a float32 module also takes 16-bit input.
        ``stored_pattern_padding_mask``: ``[B, M]`` boolean, **True = padding (blocked)**.
        ``association_mask``: ``[N, M]`` or ``[B * num_heads, N, M]`` (row ``b * num_heads +
        h``) boolean, **True = blocked**. Returns ``[B, N, out]`` (``[N, B, out]`` if not
        ``batch_first``).
    """

    def __init__(self, input_size=None, hidden_size=None, output_size=None, pattern_size=None,
                 num_heads=1, scaling=None, update_steps_max=0, update_steps_eps=1e-4,
                 normalize_stored_pattern=True, normalize_stored_pattern_affine=True,
                 normalize_stored_pattern_eps=1e-5,
                 normalize_state_pattern=True, normalize_state_pattern_affine=True,
                 normalize_state_pattern_eps=1e-5,
                 normalize_pattern_projection=True, normalize_pattern_projection_affine=True,
                 normalize_pattern_projection_eps=1e-5,
                 normalize_hopfield_space=False, normalize_hopfield_space_affine=False,
                 normalize_hopfield_space_eps=1e-5,
                 stored_pattern_as_static=False, state_pattern_as_static=False,
                 pattern_projection_as_static=False, pattern_projection_as_connected=False,
                 stored_pattern_size=None, pattern_projection_size=None,
                 batch_first=True, association_activation=None, dropout=0.0, input_bias=True,
                 concat_bias_pattern=False, add_zero_association=False,
                 disable_out_projection=False, *, solver="unrolled", anderson=0, backend="auto"):
        super().__init__()
        flags = dict(stored_pattern_as_static=stored_pattern_as_static,
                     state_pattern_as_static=state_pattern_as_static,
                     pattern_projection_as_static=pattern_projection_as_static,
                     pattern_projection_as_connected=pattern_projection_as_connected,
                     batch_first=batch_first, input_bias=input_bias,
                     concat_bias_pattern=concat_bias_pattern,
                     add_zero_association=add_zero_association,
                     disable_out_projection=disable_out_projection,
                     normalize_hopfield_space=normalize_hopfield_space,
                     normalize_hopfield_space_affine=normalize_hopfield_space_affine)
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        num_heads = check_num_steps(num_heads, "num_heads")
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        input_size = _check_size("input_size", input_size)
        hidden_size = _check_size("hidden_size", hidden_size)
        output_size = _check_size("output_size", output_size)
        pattern_size = _check_size("pattern_size", pattern_size)
        stored_pattern_size = _check_size("stored_pattern_size", stored_pattern_size)
        pattern_projection_size = _check_size("pattern_projection_size", pattern_projection_size)
        self.num_heads, self.batch_first = num_heads, batch_first
        self.stored_pattern_as_static = stored_pattern_as_static
        self.state_pattern_as_static = state_pattern_as_static
        self.pattern_projection_as_static = pattern_projection_as_static
        self.pattern_projection_as_connected = pattern_projection_as_connected
        self.add_zero_association = add_zero_association

        # hflayers' "static execution": nothing projected; sizes come from the inputs.
        self.static_only = (stored_pattern_as_static and state_pattern_as_static
                            and pattern_projection_as_static and not pattern_projection_as_connected
                            and not normalize_hopfield_space and disable_out_projection)
        norm_sizes = (default(stored_pattern_size, input_size), input_size,
                      default(pattern_projection_size, input_size))
        if self.static_only:
            input_size = stored_pattern_size = pattern_projection_size = None
            hidden_size = None
        elif input_size is None:
            raise ValueError("input_size is required unless all three patterns are static and "
                             "disable_out_projection=True")
        elif hidden_size is None:
            if input_size % num_heads:
                raise ValueError(f"input_size ({input_size}) must be divisible by num_heads "
                                 f"({num_heads}), or give hidden_size")
            hidden_size = input_size // num_heads
        self.input_size = self.state_pattern_dim = input_size
        self.stored_pattern_size = self.stored_pattern_dim = default(stored_pattern_size,
                                                                     input_size)
        self.pattern_projection_size = self.pattern_projection_dim = default(
            pattern_projection_size, input_size)
        self.hidden_size = hidden_size
        self.pattern_size = default(pattern_size, hidden_size)
        self.output_size = default(output_size, input_size)
        if pattern_projection_as_connected:
            if self.stored_pattern_dim != self.pattern_projection_dim:
                raise ValueError(
                    f"pattern_projection_as_connected=True feeds the pattern projection through "
                    f"the stored pattern's projection, so pattern_projection_size "
                    f"({self.pattern_projection_dim}) must equal stored_pattern_size "
                    f"({self.stored_pattern_dim})")
            if self.pattern_size != hidden_size:
                raise ValueError(f"pattern_projection_as_connected=True needs pattern_size == "
                                 f"hidden_size, got {self.pattern_size} and {hidden_size}")
        # hflayers packs the projections into one `in_proj_weight` exactly in this case; a static
        # pattern projection is split into the heads (not repeated) outside it (see class doc).
        self._in_proj_layout = (self.stored_pattern_dim == input_size
                                and self.pattern_projection_dim == input_size
                                and pattern_size is None and not pattern_projection_as_connected)
        self._split_static_projection = not self._in_proj_layout and (
            pattern_projection_as_connected or stored_pattern_as_static)

        # -- iteration and solver --
        self.anderson = check_solver(solver, anderson)
        self.solver = solver
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self._update_steps_max, self._update_steps_eps = update_steps_max, update_steps_eps
        steps = []
        for t in _per_head("update_steps_max", update_steps_max, num_heads):
            if t is None or (isinstance(update_steps_max, torch.Tensor) and t < 0):
                steps.append(None)
            else:
                steps.append(check_num_steps(t, "update_steps_max"))
        self._steps = tuple(steps)
        eps = tuple(check_finite_number("update_steps_eps", float(e) if isinstance(
            update_steps_eps, torch.Tensor) else e) for e in _per_head(
            "update_steps_eps", update_steps_eps, num_heads))
        if any(e < 0 for e in eps):
            raise ValueError(f"update_steps_eps must be >= 0, got {update_steps_eps}")
        self._eps = eps
        if None in self._steps and min(eps) <= 0:
            raise ValueError("update_steps_max=None (until the eps rule stops) needs "
                             "update_steps_eps > 0, else it never stops")
        if solver == "fixed_point" and (None in self._steps or len(set(self._steps)) > 1):
            raise ValueError("solver='fixed_point' needs one finite update_steps_max")
        iterates = any(t is None or t > 0 for t in self._steps)
        if backend not in ("auto", "reference") and solver == "unrolled" and iterates and \
                (max(eps) > 0 or len(set(self._steps)) > 1):
            raise ValueError(f"update_steps_eps > 0 (hflayers' stopping rule) and per-head "
                             f"update_steps_max run in PyTorch; pass update_steps_eps=0 and one "
                             f"update_steps_max for every head to use backend={backend!r}")
        # per-head values, filled by reset_parameters (so a module built on the meta device
        # gets them back after to_empty). The tolerances are kept as the int64 bits of their
        # float64 values: `module.to(dtype)` casts floating buffers (1e-8 would become 0 in
        # float16), never integer ones; `_eps_per_head.view(torch.float64)` reads them.
        if len(set(self._steps)) > 1:
            self.register_buffer("_steps_per_head", torch.empty(num_heads, dtype=torch.long),
                                 persistent=False)
        if len(set(eps)) > 1:
            self.register_buffer("_eps_per_head", torch.empty(num_heads, dtype=torch.int64),
                                 persistent=False)

        dropout = check_finite_number("dropout", dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = dropout
        self.association_activation = None  # as hflayers: the torch function itself
        if association_activation is not None:
            fn = getattr(torch, association_activation, None) if isinstance(
                association_activation, str) else None
            if not _is_elementwise(fn):
                raise ValueError(f"association_activation must name an elementwise torch "
                                 f"function of one tensor (e.g. 'tanh', 'relu'), got "
                                 f"{association_activation!r}")
            self.association_activation = fn

        # -- parameters --
        self.norm_stored_pattern = _layer_norm(
            normalize_stored_pattern, normalize_stored_pattern_affine,
            normalize_stored_pattern_eps, norm_sizes[0], "stored_pattern")
        self.norm_state_pattern = _layer_norm(
            normalize_state_pattern, normalize_state_pattern_affine,
            normalize_state_pattern_eps, norm_sizes[1], "state_pattern")
        self.norm_pattern_projection = _layer_norm(
            normalize_pattern_projection, normalize_pattern_projection_affine,
            normalize_pattern_projection_eps, norm_sizes[2], "pattern_projection")
        self.norm_hopfield_space = _layer_norm(
            normalize_hopfield_space, normalize_hopfield_space_affine,
            normalize_hopfield_space_eps, hidden_size, "hopfield_space")
        inner = None if self.static_only else num_heads * hidden_size
        inner_v = None if self.static_only else num_heads * self.pattern_size
        v_in = inner if pattern_projection_as_connected and not stored_pattern_as_static else \
            self.pattern_projection_dim

        def linear(i, o, static):  # initialised by reset_parameters only (hflayers' RNG stream)
            # skip_init builds on the CPU unless told: name the device of a `torch.device` block
            return None if static else nn.utils.skip_init(nn.Linear, i, o, bias=input_bias,
                                                          device=torch.get_default_device())

        self.q_proj = linear(input_size, inner, state_pattern_as_static)
        self.k_proj = linear(self.stored_pattern_dim, inner, stored_pattern_as_static)
        self.v_proj = linear(v_in, inner_v, pattern_projection_as_static)
        self.out_proj = None if disable_out_projection else \
            nn.Linear(inner_v, self.output_size, bias=input_bias)
        self.bias_k = self.bias_v = None
        if concat_bias_pattern:
            if stored_pattern_as_static or pattern_projection_as_static:
                raise ValueError("concat_bias_pattern=True appends a learned projected stored "
                                 "pattern and projection; a static stored pattern or pattern "
                                 "projection has no projection to carry it (hflayers fails too)")
            self.bias_k = nn.Parameter(torch.empty(inner))
            self.bias_v = nn.Parameter(torch.empty(inner_v))

        if scaling is None:
            scaling = 1.0 if self.static_only else hidden_size**-0.5
        elif isinstance(scaling, torch.Tensor):
            per_head = set(_per_head("scaling", scaling, num_heads))
            if len(per_head) > 1:
                raise ValueError(
                    "scaling with different entries per head is not offered: hflayers multiplies "
                    "feature j of each head by entry j mod num_heads (not by its head's entry), "
                    "which is no inverse temperature; give one float")
            scaling = per_head.pop()
        self.scaling = check_finite_number("scaling", scaling, positive=True)
        self.reset_parameters()
        self.reset_parameters()  # hflayers draws twice (its core, then the module): same stream

    def reset_parameters(self) -> None:
        """hflayers' initialisation: weights ``N(0, 0.02)``, biases 0, LayerNorms (1, 0), bias
        patterns ``N(0, 0.02)``, drawn in hflayers' order (the q, k, v weights as one packed
        matrix where hflayers packs them, then ``out_proj``, ``bias_k``, ``bias_v``), so that
        the same seed gives hflayers' initial values. Also refills the per-head step counts
        and tolerances (non-persistent buffers) from the constructor's arguments."""
        with torch.no_grad():
            if exists(getattr(self, "_steps_per_head", None)):
                self._steps_per_head.copy_(torch.tensor([-1 if t is None else t
                                                         for t in self._steps]))
            if exists(getattr(self, "_eps_per_head", None)):
                self._eps_per_head.copy_(torch.tensor(self._eps, dtype=torch.float64)
                                         .view(torch.int64))
        projections = [lin for lin in (self.q_proj, self.k_proj, self.v_proj) if exists(lin)]
        if self._in_proj_layout and projections:
            w = projections[0].weight
            packed = torch.empty(sum(lin.weight.shape[0] for lin in projections), w.shape[1],
                                 dtype=w.dtype, device=w.device)
            nn.init.normal_(packed, mean=0.0, std=0.02)
            with torch.no_grad():
                for lin, rows in zip(projections, packed.split(
                        [lin.weight.shape[0] for lin in projections])):
                    lin.weight.copy_(rows)
        else:
            for lin in projections:
                nn.init.normal_(lin.weight, mean=0.0, std=0.02)
        for lin in (*projections, self.out_proj):
            if exists(lin) and exists(lin.bias):
                nn.init.zeros_(lin.bias)
        if exists(self.out_proj):
            nn.init.normal_(self.out_proj.weight, mean=0.0, std=0.02)
        for p in (self.bias_k, self.bias_v):
            if exists(p):
                nn.init.normal_(p, mean=0.0, std=0.02)
        for norm in (self.norm_stored_pattern, self.norm_state_pattern,
                     self.norm_pattern_projection, self.norm_hopfield_space):
            if exists(norm):
                norm.reset_parameters()

    def extra_repr(self) -> str:
        def per_head(values):  # one value, or one per head
            return values[0] if len(set(values)) == 1 else list(values)

        text = (f"num_heads={self.num_heads}, hidden_size={self.hidden_size}, "
                f"scaling={self.scaling:.4g}, update_steps_max={per_head(self._steps)}, "
                f"update_steps_eps={per_head(self._eps)}, solver={self.solver!r}")
        if self.solver == "fixed_point":
            text += f", anderson={self.anderson}"
        return text + (f", backend={self.backend!r}, dropout={self.dropout}, "
                       f"batch_first={self.batch_first}")

    # -- hflayers' attributes ------------------------------------------------------------------

    @property
    def update_steps_max(self):
        t = self._update_steps_max
        return t.clone() if isinstance(t, torch.Tensor) else t

    @property
    def update_steps_eps(self):
        e = self._update_steps_eps
        return e.clone() if isinstance(e, torch.Tensor) else e

    @property
    def normalize_stored_pattern(self) -> bool:
        return self.norm_stored_pattern is not None

    @property
    def normalize_stored_pattern_affine(self) -> bool:
        return self.normalize_stored_pattern and self.norm_stored_pattern.elementwise_affine

    @property
    def normalize_state_pattern(self) -> bool:
        return self.norm_state_pattern is not None

    @property
    def normalize_state_pattern_affine(self) -> bool:
        return self.normalize_state_pattern and self.norm_state_pattern.elementwise_affine

    @property
    def normalize_pattern_projection(self) -> bool:
        return self.norm_pattern_projection is not None

    @property
    def normalize_pattern_projection_affine(self) -> bool:
        return self.normalize_pattern_projection and \
            self.norm_pattern_projection.elementwise_affine

    @property
    def normalize_hopfield_space(self) -> bool:
        return self.norm_hopfield_space is not None

    @property
    def normalize_hopfield_space_affine(self) -> bool:
        return self.normalize_hopfield_space and self.norm_hopfield_space.elementwise_affine

    # -- input handling ------------------------------------------------------------------------

    def _split_input(self, input):
        """``input`` -> batch-first ``(stored, state, projection)``, sizes checked."""
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
        static = (self.stored_pattern_as_static, self.state_pattern_as_static,
                  self.pattern_projection_as_static)
        sizes = (self.stored_pattern_dim, self.input_size, self.pattern_projection_dim)
        norms = (self.norm_stored_pattern, self.norm_state_pattern, self.norm_pattern_projection)
        out = []
        for name, t, is_static, size, norm in zip(names, parts, static, sizes, norms):
            check_float_tensor(name, t, ndim=3)
            check_module_input(self, **{name: t})
            t = t if self.batch_first else t.transpose(0, 1)  # [L, B, F] -> [B, L, F]
            want = [norm.normalized_shape[0]] if exists(norm) else []
            if not is_static:
                want.append(size)
            elif name != "pattern_projection" and not self.static_only:
                want.append(self.hidden_size)
            for w in want:
                if t.shape[-1] != w:
                    raise ValueError(f"{name} must have {w} features, got shape "
                                     f"{tuple(t.shape)} (batch first)")
            out.append(t)
        stored, state, proj = out
        if self.static_only and stored.shape[-1] != state.shape[-1]:
            raise ValueError(f"static stored and state patterns must have the same size, got "
                             f"{stored.shape[-1]} and {state.shape[-1]}")
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
            allowed = rearrange(masks.from_blocked(pad).allowed, "b m -> b 1 1 m")
        if exists(association_mask):
            am = association_mask
            self._check_mask("association_mask", am, device, [(N, M), (B * self.num_heads, N, M)])
            am = masks.from_blocked(am).allowed
            am = am if am.dim() == 2 else rearrange(am, "(b h) n m -> b h n m", b=B)
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

    def _heads(self, x, repeat):
        """``[B, L, F]`` -> ``[B, H, L, d]``: the same pattern for every head, or split."""
        if repeat:
            return x.unsqueeze(1).expand(-1, self.num_heads, -1, -1)
        if x.shape[-1] % self.num_heads:
            raise ValueError(f"a pattern of {x.shape[-1]} features cannot be split into "
                             f"{self.num_heads} heads")
        return rearrange(x, "b n (h d) -> b h n d", h=self.num_heads)

    def _project(self, input, stored_pattern_padding_mask=None, association_mask=None):
        """Normalise, project, split heads: ``q [B,H,N,d]``, ``k [B,H,M',d]``, ``v [B,H,M',dv]``
        (``M'`` counts the bias and zero patterns) and the mask (True = may attend)."""
        stored, state, proj = self._split_input(input)
        B, N, M = state.shape[0], state.shape[1], stored.shape[1]
        mask = self._mask(stored_pattern_padding_mask, association_mask, B, N, M, state.device)

        def normed(x, norm):
            return norm(x) if exists(norm) else x

        stored = normed(stored, self.norm_stored_pattern)
        state = normed(state, self.norm_state_pattern)
        proj = normed(proj, self.norm_pattern_projection)
        q = self._heads(state, True) if self.state_pattern_as_static else \
            self._heads(self.q_proj(state), False)
        k = self._heads(stored, True) if self.stored_pattern_as_static else \
            self._heads(self.k_proj(stored), False)
        if self.pattern_projection_as_connected and exists(self.k_proj):
            proj = self.k_proj(proj)
        if exists(self.v_proj):
            v = self._heads(self.v_proj(proj), False)
        else:
            v = self._heads(proj, not self._split_static_projection)
        if exists(self.out_proj) and v.shape[1] * v.shape[-1] != self.out_proj.in_features:
            raise ValueError(f"the static pattern_projection gives {v.shape[1]} heads of "
                             f"{v.shape[-1]} features but the output projection reads "
                             f"{self.out_proj.in_features}")
        if exists(self.norm_hopfield_space):
            q, k = self.norm_hopfield_space(q), self.norm_hopfield_space(k)
        extra = []
        if exists(self.bias_k):
            extra.append((self.bias_k.view(1, self.num_heads, 1, -1),
                          self.bias_v.view(1, self.num_heads, 1, -1)))
        if self.add_zero_association:
            extra.append((k.new_zeros(1, 1, 1, 1), v.new_zeros(1, 1, 1, 1)))
        if extra:
            k = torch.cat([k, *(ek.to(k.dtype).expand(B, k.shape[1], 1, k.shape[-1])
                                for ek, _ in extra)], dim=2)
            v = torch.cat([v, *(ev.to(v.dtype).expand(B, v.shape[1], 1, v.shape[-1])
                                for _, ev in extra)], dim=2)
            if exists(mask):  # the appended patterns are never blocked
                mask = F.pad(mask, (0, len(extra)), value=True)
        return q, k, v, mask

    # -- the iteration -------------------------------------------------------------------------

    def _associate(self, q, k, mask, return_trace=False):
        """The state after the update steps (``q`` itself for 0 steps); with ``return_trace``
        also the energy of every iterate ``[B, H, N, T+1]``."""
        if not any(t is None or t > 0 for t in self._steps):
            return (q, hopfield_energy(q, k, self.scaling, mask=mask)[..., None]) \
                if return_trace else q
        uniform = len(set(self._steps)) == 1 and self._steps[0] is not None
        if uniform and (self.solver == "fixed_point" or max(self._eps) == 0):
            out = hopfield_descent(
                q, k, scale=self.scaling, step_size=1.0, num_steps=self._steps[0], mask=mask,
                solver=self.solver, anderson=self.anderson, backend=self.backend,
                return_energies=return_trace)
            return out
        return self._hflayers_steps(q, k, mask, return_trace)

    def _hflayers_steps(self, q, k, mask, return_trace):
        """hflayers' iteration and stopping rule, masked per head (docs/math.md §1.1: each step is
        ``ξ ← softmax(β ξ Kᵀ) K``, gradient descent with step 1 on the Hopfield energy).

        Head h takes step s (``ξ_s = P_{s-1} K``) while ``s <= T_h`` and every earlier change
        ``max_b ‖P_r − P_{r−1}‖_F`` (r = 1..s−1) exceeded ``eps_h``. With a finite T the loop
        runs T times without reading anything back to the host.
        """
        H, beta = self.num_heads, self.scaling
        per_head_steps = getattr(self, "_steps_per_head", None)
        eps = getattr(self, "_eps_per_head", None)
        eps = self._eps[0] if eps is None else eps.to(q.device).view(torch.float64)
        unbounded = None in self._steps
        limit = max(t for t in self._steps if t is not None) if not unbounded else None

        def within(s):  # heads whose step budget allows step s + 1: s < T_h
            if per_head_steps is None:
                return None
            t = per_head_steps.to(q.device)
            return (t < 0) | (s < t)

        logits, valid = _logits(q, k, beta, mask)
        p, mu = _readout(logits, valid, k)
        active = torch.ones(H, dtype=torch.bool, device=q.device)
        if exists(within(0)):
            active = active & within(0)
        xi, trace, s = q, [q], 0
        while True:
            s += 1
            if limit is not None and s > limit:
                break
            if unbounded and not bool(active.any()):  # the one host sync, only when unbounded
                break
            xi = torch.where(active.view(1, H, 1, 1), mu.to(xi.dtype), xi)
            if return_trace:
                trace.append(xi)
            if limit is not None and s == limit:
                break  # P_T is the read-out; no further step to decide on
            logits, valid = _logits(xi, k, beta, mask)
            p_new, mu = _readout(logits, valid, k)
            with torch.no_grad():
                change = (p_new - p).square().sum(dim=(-2, -1)).sqrt()  # [B, H]
                # max over the batch; an empty batch has nothing left to change
                change = change.amax(dim=0) if change.shape[0] else change.new_zeros(H)
                active = active & (change > eps)
                if exists(within(s)):
                    active = active & within(s)
            p = p_new
        if return_trace:
            energies = torch.stack([hopfield_energy(x, k, beta, mask=mask) for x in trace], -1)
            return xi, energies
        return xi

    # -- public API ----------------------------------------------------------------------------

    def forward(self, input, stored_pattern_padding_mask=None, association_mask=None):
        q, k, v, mask = self._project(input, stored_pattern_padding_mask, association_mask)
        xi = self._associate(q, k, mask)
        dropout_p = self.dropout if self.training else 0.0
        # rows with every key blocked read nothing (finite): see masks.readout_args
        attn_mask, valid, _ = masks.readout_args(masks.from_allowed(mask), xi.shape[-2],
                                                 k.shape[-2], xi.device)
        out = masks.sdpa(xi, k, v, attn_mask=attn_mask, valid=valid, dropout_p=dropout_p,
                         scale=self.scaling)
        out = rearrange(out, "b h n d -> b n (h d)")
        if exists(self.out_proj):
            out = self.out_proj(out)
        out = out if self.batch_first else out.transpose(0, 1)
        if exists(self.association_activation):
            out = self.association_activation(out)
        return out

    def get_association_matrix(self, input, stored_pattern_padding_mask=None,
                               association_mask=None):
        """The association matrix of the final read-out, ``[B, num_heads, N, M']``.

        ``softmax(β ξ_T Kᵀ)`` over unblocked keys (``M'`` counts the bias and zero patterns; rows
        with every key blocked are zero); no dropout. Differentiable (hflayers wraps it in
        ``no_grad``).
        """
        q, k, _, mask = self._project(input, stored_pattern_padding_mask, association_mask)
        xi = self._associate(q, k, mask)
        logits, valid = _logits(xi, k, self.scaling, mask)
        p, _ = _readout(logits, valid, k)
        return p.to(q.dtype)

    def get_projected_pattern_matrix(self, input, stored_pattern_padding_mask=None,
                                     association_mask=None):
        """The projected pattern projection (values) per head, ``[B, num_heads, M', dv]``."""
        return self._project(input, stored_pattern_padding_mask, association_mask)[2]

    def energy(self, input, stored_pattern_padding_mask=None, association_mask=None,
               return_trace=False):
        """Hopfield energy of every state pattern in the association space (docs/math.md §1.1).

        ``E(ξ_i) = ½‖ξ_i‖² − (1/β) log Σ_j exp(β ξ_i·k_j)`` over unblocked keys, at the final
        state ``ξ_T``: ``[B, num_heads, N]`` (float32 accumulation for 16-bit inputs). With
        ``return_trace=True`` (unrolled solver): the energy of every iterate, ``[B, num_heads, N,
        T + 1]`` (a stopped head repeats its last value).
        """
        q, k, _, mask = self._project(input, stored_pattern_padding_mask, association_mask)
        if return_trace:
            if self.solver != "unrolled":
                raise ValueError("return_trace=True needs solver='unrolled'")
            return self._associate(q, k, mask, return_trace=True)[1]
        xi = self._associate(q, k, mask)
        return hopfield_energy(xi, k, self.scaling, mask=mask)

    # -- hflayers state dicts ------------------------------------------------------------------

    def _hflayers_parts(self):
        """``(name, projection, hflayers' rows)`` of q, k, v in hflayers' packing order."""
        hd = None if self.static_only else self.num_heads * self.hidden_size
        hp = None if self.static_only else self.num_heads * self.pattern_size
        return (("q", self.q_proj, hd), ("k", self.k_proj, hd), ("v", self.v_proj, hp))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Also reads hflayers' names (``association_core.*``): see :func:`hflayers_state_dict`."""
        core = prefix + "association_core."
        if any(key.startswith(core) for key in state_dict):
            self._from_hflayers(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _from_hflayers(self, sd, prefix):
        core = prefix + "association_core."
        parts = self._hflayers_parts()
        w = sd.get(core + "in_proj_weight")
        rows = [(n, r) for n, lin, r in parts if exists(lin)]
        if w is not None and w.shape[0] == sum(r for _, r in rows):
            del sd[core + "in_proj_weight"]
            for (n, _), chunk in zip(rows, w.split([r for _, r in rows])):
                sd[f"{prefix}{n}_proj.weight"] = chunk
        b = sd.get(core + "in_proj_bias")
        # hflayers' bias: q and k rows where projected, the v rows always (unused if static)
        b_rows = [(n, lin, r) for n, lin, r in parts if exists(lin) or n == "v"]
        if b is not None and b.shape[0] == sum(r for *_, r in b_rows):
            del sd[core + "in_proj_bias"]
            for (n, lin, _), chunk in zip(b_rows, b.split([r for *_, r in b_rows])):
                if exists(lin):
                    sd[f"{prefix}{n}_proj.bias"] = chunk
        for n in "qkv":
            if core + f"{n}_proj_weight" in sd:
                sd[f"{prefix}{n}_proj.weight"] = sd.pop(core + f"{n}_proj_weight")
        for key in list(sd):
            if key.startswith(core + "out_proj."):
                sd[prefix + key[len(core):]] = sd.pop(key)
        for ours, theirs in (("weight", "p_norm_weight"), ("bias", "p_norm_bias")):
            if core + theirs in sd:
                sd[f"{prefix}norm_hopfield_space.{ours}"] = sd.pop(core + theirs)
        for n in ("bias_k", "bias_v"):
            if core + n in sd:
                t = sd.pop(core + n)
                # hflayers creates but never applies them: without them here nothing is lost
                if exists(getattr(self, n)):
                    sd[prefix + n] = t.reshape(-1)

    def _to_hflayers(self, sd, prefix):
        core = prefix + "association_core."
        parts = self._hflayers_parts()
        weights = [(n, sd.pop(f"{prefix}{n}_proj.weight")) for n, lin, _ in parts if exists(lin)]
        if self._in_proj_layout:
            if weights:
                sd[core + "in_proj_weight"] = torch.cat([w for _, w in weights])
        else:
            for n, w in weights:
                sd[f"{core}{n}_proj_weight"] = w
        if any(exists(lin) and exists(lin.bias) for _, lin, _ in parts):
            chunks = []
            for n, lin, r in parts:
                if exists(lin):
                    chunks.append(sd.pop(f"{prefix}{n}_proj.bias"))
                elif n == "v":  # hflayers keeps (and never uses) value rows for a static projection
                    chunks.append(chunks[0].new_zeros(r) if chunks else None)
            if weights:
                sd[core + "in_proj_bias"] = torch.cat([c for c in chunks if c is not None])
        for key in list(sd):
            if key.startswith(prefix + "out_proj."):
                sd[core + key[len(prefix):]] = sd.pop(key)
        for ours, theirs in (("weight", "p_norm_weight"), ("bias", "p_norm_bias")):
            if f"{prefix}norm_hopfield_space.{ours}" in sd:
                sd[core + theirs] = sd.pop(f"{prefix}norm_hopfield_space.{ours}")
        hd = None if self.static_only else self.num_heads * self.hidden_size
        for n in ("bias_k", "bias_v"):
            if prefix + n in sd:
                t = sd.pop(prefix + n)
                if t.numel() != hd:
                    raise ValueError(f"hflayers sizes {n} num_heads * hidden_size ({hd}); this "
                                     f"module's has {t.numel()} entries (pattern_size differs)")
                sd[core + n] = t.reshape(1, 1, -1)


def hflayers_state_dict(module: nn.Module) -> dict:
    """``module.state_dict()`` with every :class:`Hopfield` inside it under hflayers' names.

    hflayers (ml-jku/hopfield-layers) loads the result into the same model built with its
    classes (tested for its commit f56f929, every pattern/static combination). The renaming is
    this package's ``q_proj``/``k_proj``/``v_proj`` ``.weight`` →
    ``association_core.in_proj_weight`` (rows q, k, v of the projected patterns, when hflayers
    packs them: all input sizes equal, no ``pattern_size``, not connected) or
    ``association_core.{q,k,v}_proj_weight``; their biases → ``association_core.in_proj_bias``
    (zeros for the value rows of a static projection, which hflayers keeps unused);
    ``out_proj.*`` → ``association_core.out_proj.*``;
    ``norm_hopfield_space.*`` → ``association_core.p_norm_{weight,bias}``; ``bias_k``/``bias_v`` →
    ``association_core.bias_{k,v}`` ``[1, 1, H·d]``. ``norm_*`` and the wrappers' weights keep
    their names and layouts. Loading works the other way without any helper:
    ``load_state_dict`` of these modules recognises hflayers' names.
    """
    sd = module.state_dict()
    for name, sub in module.named_modules():
        if isinstance(sub, Hopfield):
            sub._to_hflayers(sd, f"{name}." if name else "")
    return sd


class _LearnedPatterns(nn.Module):
    """Shared plumbing of the two wrappers: a :class:`Hopfield` and its learned patterns.

    The learned weights have hflayers' layout ``[1, quantity, F]`` (``[quantity, 1, F]`` when not
    ``batch_first``), so their state dicts and in-place assignments carry over unchanged.
    """

    def _weights(self, quantity, size, trainable):
        """Uninitialised until :meth:`reset_parameters` (called last, in hflayers' order)."""
        shape = (1, quantity, size) if self.hopfield.batch_first else (quantity, 1, size)
        return nn.Parameter(torch.empty(shape), requires_grad=trainable)

    def _expand(self, weights, batch, dtype):
        q, f = self.quantity, weights.shape[2]
        shape = (batch, q, f) if self.hopfield.batch_first else (q, batch, f)
        return weights.to(dtype).expand(shape)

    def _batch(self, t):
        return t.shape[0 if self.hopfield.batch_first else 1]

    def reset_parameters(self) -> None:
        """Re-initialise the Hopfield module, then the learned weights (``N(0, 0.02)``), as
        hflayers (same seed, same values)."""
        self.hopfield.reset_parameters()
        for p in self._learned():
            nn.init.normal_(p, mean=0.0, std=0.02)

    def extra_repr(self) -> str:
        return f"quantity={self.quantity}"

    def get_association_matrix(self, input, stored_pattern_padding_mask=None,
                               association_mask=None):
        """As :meth:`Hopfield.get_association_matrix`, on the wrapped patterns."""
        return self.hopfield.get_association_matrix(
            self._prepare_input(input), stored_pattern_padding_mask, association_mask)

    def get_projected_pattern_matrix(self, input, stored_pattern_padding_mask=None,
                                     association_mask=None):
        """As :meth:`Hopfield.get_projected_pattern_matrix`, on the wrapped patterns."""
        return self.hopfield.get_projected_pattern_matrix(
            self._prepare_input(input), stored_pattern_padding_mask, association_mask)

    def energy(self, input, stored_pattern_padding_mask=None, association_mask=None,
               return_trace=False):
        """As :meth:`Hopfield.energy`, on the wrapped patterns."""
        return self.hopfield.energy(self._prepare_input(input), stored_pattern_padding_mask,
                                    association_mask, return_trace)


def _forward_to_hopfield(name):
    return property(lambda self: getattr(self.hopfield, name),
                    doc=f"The wrapped :class:`Hopfield`'s ``{name}``.")


for _name in ("batch_first", "scaling", "stored_pattern_dim", "state_pattern_dim",
              "pattern_projection_dim", "input_size", "hidden_size", "output_size", "pattern_size",
              "update_steps_max", "update_steps_eps", "stored_pattern_as_static",
              "state_pattern_as_static", "pattern_projection_as_static",
              "normalize_stored_pattern", "normalize_stored_pattern_affine",
              "normalize_state_pattern", "normalize_state_pattern_affine",
              "normalize_pattern_projection", "normalize_pattern_projection_affine",
              "normalize_hopfield_space", "normalize_hopfield_space_affine"):
    setattr(_LearnedPatterns, _name, _forward_to_hopfield(_name))


def _hopfield_kwargs(local):
    names = ("input_size", "hidden_size", "output_size", "pattern_size", "num_heads", "scaling",
             "update_steps_max", "update_steps_eps", "normalize_stored_pattern",
             "normalize_stored_pattern_affine", "normalize_state_pattern",
             "normalize_state_pattern_affine", "normalize_pattern_projection",
             "normalize_pattern_projection_affine", "normalize_hopfield_space",
             "normalize_hopfield_space_affine", "stored_pattern_as_static",
             "state_pattern_as_static", "pattern_projection_as_static",
             "pattern_projection_as_connected", "stored_pattern_size", "pattern_projection_size",
             "batch_first", "association_activation", "dropout", "input_bias",
             "concat_bias_pattern", "add_zero_association", "disable_out_projection", "solver",
             "anderson", "backend")
    return {n: local[n] for n in names}


class HopfieldPooling(_LearnedPatterns):
    """Pooling with ``quantity`` learned state patterns (hflayers' ``HopfieldPooling``).

    Args: hflayers' signature and positional order: every :class:`Hopfield` argument but the
    ``normalize_*_eps`` ones, then ``quantity`` (number of learned state patterns) and
    ``trainable`` (whether they are learned); keyword-only ``solver``, ``anderson``,
    ``backend`` as :class:`Hopfield`. The learned ``pooling_weights`` are ``[1, quantity, F]``
    (``[quantity, 1, F]`` when not ``batch_first``), ``F = input_size`` (``hidden_size`` for a
    static state pattern), initialised ``N(0, 0.02)``.

    ``forward(input, stored_pattern_padding_mask=None, association_mask=None)``: ``input`` is
    ``[B, M, F_in]`` (stored patterns and projection; sequence first if not ``batch_first``) or a
    tuple ``(stored, pattern_projection)``. Returns the Hopfield output with everything after
    its first dimension flattened, as hflayers: ``[B, quantity * out]`` when ``batch_first``,
    ``[quantity, B * out]`` when not. Masks as :class:`Hopfield` (True = blocked).
    """

    def __init__(self, input_size, hidden_size=None, output_size=None, pattern_size=None,
                 num_heads=1, scaling=None, update_steps_max=0, update_steps_eps=1e-4,
                 normalize_stored_pattern=True, normalize_stored_pattern_affine=True,
                 normalize_state_pattern=True, normalize_state_pattern_affine=True,
                 normalize_pattern_projection=True, normalize_pattern_projection_affine=True,
                 normalize_hopfield_space=False, normalize_hopfield_space_affine=False,
                 stored_pattern_as_static=False, state_pattern_as_static=False,
                 pattern_projection_as_static=False, pattern_projection_as_connected=False,
                 stored_pattern_size=None, pattern_projection_size=None, batch_first=True,
                 association_activation=None, dropout=0.0, input_bias=True,
                 concat_bias_pattern=False, add_zero_association=False,
                 disable_out_projection=False, quantity=1, trainable=True, *,
                 solver="unrolled", anderson=0, backend="auto"):
        super().__init__()
        self.hopfield = Hopfield(**_hopfield_kwargs(locals()))
        self.quantity = check_num_steps(quantity, "quantity")
        if self.quantity < 1:
            raise ValueError(f"quantity must be >= 1, got {quantity}")
        size = self.hopfield.hidden_size if state_pattern_as_static else self.hopfield.input_size
        self.pooling_weights = self._weights(self.quantity, size, trainable)
        self.reset_parameters()

    def _learned(self):
        return (self.pooling_weights,)

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
        state = self._expand(self.pooling_weights, self._batch(stored), stored.dtype)
        return stored, state, proj

    def forward(self, input, stored_pattern_padding_mask=None, association_mask=None):
        out = self.hopfield(self._prepare_input(input), stored_pattern_padding_mask,
                            association_mask)
        return out.flatten(start_dim=1)


class HopfieldLayer(_LearnedPatterns):
    """A lookup into ``quantity`` learned stored patterns (hflayers' ``HopfieldLayer``).

    Args: hflayers' signature and positional order: :class:`Hopfield`'s first eight arguments,
    ``lookup_weights_as_separated`` (learn separate ``target_weights`` for the pattern projection,
    else the projection reads the lookup weights), ``lookup_targets_as_trainable``, the other
    :class:`Hopfield` arguments but the ``normalize_*_eps`` ones, ``quantity`` (number of learned
    stored patterns) and ``trainable`` (whether the lookup weights are learned); keyword-only
    ``solver``, ``anderson``, ``backend``. ``lookup_weights`` are ``[1, quantity, F]``
    (``[quantity, 1, F]`` when not ``batch_first``), ``F = stored_pattern_size`` (default
    ``input_size``; ``hidden_size`` for a static stored pattern); ``target_weights`` likewise with
    ``F = pattern_projection_size`` (default the lookup size).

    ``forward(input [B, N, input_size], stored_pattern_padding_mask=None [B, quantity],
    association_mask=None)`` returns ``[B, N, out]`` (sequence first if not ``batch_first``).
    """

    def __init__(self, input_size, hidden_size=None, output_size=None, pattern_size=None,
                 num_heads=1, scaling=None, update_steps_max=0, update_steps_eps=1e-4,
                 lookup_weights_as_separated=False, lookup_targets_as_trainable=True,
                 normalize_stored_pattern=True, normalize_stored_pattern_affine=True,
                 normalize_state_pattern=True, normalize_state_pattern_affine=True,
                 normalize_pattern_projection=True, normalize_pattern_projection_affine=True,
                 normalize_hopfield_space=False, normalize_hopfield_space_affine=False,
                 stored_pattern_as_static=False, state_pattern_as_static=False,
                 pattern_projection_as_static=False, pattern_projection_as_connected=False,
                 stored_pattern_size=None, pattern_projection_size=None, batch_first=True,
                 association_activation=None, dropout=0.0, input_bias=True,
                 concat_bias_pattern=False, add_zero_association=False,
                 disable_out_projection=False, quantity=1, trainable=True, *,
                 solver="unrolled", anderson=0, backend="auto"):
        super().__init__()
        self.hopfield = Hopfield(**_hopfield_kwargs(locals()))
        self.quantity = check_num_steps(quantity, "quantity")
        if self.quantity < 1:
            raise ValueError(f"quantity must be >= 1, got {quantity}")
        size = self.hopfield.hidden_size if stored_pattern_as_static else \
            default(self.hopfield.stored_pattern_dim, input_size)
        self.lookup_weights = self._weights(self.quantity, size, trainable)
        self.target_weights = None
        if lookup_weights_as_separated:
            self.target_weights = self._weights(
                self.quantity, default(pattern_projection_size, size), lookup_targets_as_trainable)
        self.reset_parameters()

    def _learned(self):
        return tuple(p for p in (self.lookup_weights, self.target_weights) if exists(p))

    def _prepare_input(self, input):
        check_float_tensor("input", input, ndim=3)
        check_module_input(self, input=input)
        batch = self._batch(input)
        stored = self._expand(self.lookup_weights, batch, input.dtype)
        proj = stored if self.target_weights is None else \
            self._expand(self.target_weights, batch, input.dtype)
        return stored, input, proj

    def forward(self, input, stored_pattern_padding_mask=None, association_mask=None):
        return self.hopfield(self._prepare_input(input), stored_pattern_padding_mask,
                             association_mask)
