"""Fused Triton kernels for T steps of Hopfield / elastic energy descent (docs/math.md §1, §4, §7).

One step, for a query row ``ξ`` against fixed keys ``K`` (values = keys), with ``c = ρ`` for
Nesterov and ``c = 0`` otherwise (GD is the ``ρ = 0`` case of momentum):

    y_t = ξ_t + c v_t,   μ_t = softmax(β round(y_t) Kᵀ + b) K,   g_t = y_t − μ_t
    v_{t+1} = ρ v_t − η g_t,   ξ_{t+1} = ξ_t + v_{t+1}        (GD: ξ_{t+1} = ξ_t − η g_t)

``round`` is the cast to the input dtype: ``ξ`` and ``v`` stay in float32 registers across all
T steps (the master copy), each read-out runs on the rounded iterate, like the reference.

Kernels (see ``docs/kernels.md`` for the design):

* ``_fwd_kernel``: one program per (query tile, batch·head); T steps on chip, key tiles streamed
  flash-attention style with an exp2 online softmax (β·log₂e folded into the logits; only the
  edge tiles masked), or loaded once before the step loop when few keys fit (``SHORT``, the
  short-memory path). Saves per
  step only the read-out ``μ_t`` (float32) and the row log-sum-exp: O(T·N·(D+1)). Energies
  ``½‖ξ_t‖² − lse_t/β`` come from the same log-sum-exp (one lse-only pass for ``ξ_T``, and for
  every ``ξ_t`` under Nesterov, whose read-out point is ``y_t ≠ ξ_t``).
* ``_bwd_dq_kernel``: the reverse chain through the optimizer, one program per query tile;
  the iterates are replayed from ``q`` and the saved read-outs (O(T²) element-wise work, no
  N×M work), attention is recomputed from the saved log-sum-exp. Writes ``dμ_t``, the
  read-out points ``ŷ_t`` and ``Δ_t = rowsum(dμ_t ⊙ μ_t)`` per step for
* ``_bwd_dk_kernel``: one program per (key tile, batch·key head, query part), looping over the
  query heads of its group, its query tiles and the steps: ``dK`` (score and value paths) and
  ``d key_bias`` accumulate in float32 registers, no atomics; with several query parts (few
  key tiles) their partial sums are added on the host in a fixed order.
* Experimental, off by default and never timed (``FUSED_BACKWARD``): the whole backward in the
  query kernel (``FUSED``), each key tile's ``dK`` / ``d key_bias`` terms formed from the same
  ``P`` and ``dS`` and added across query tiles with relaxed float32 reductions or a TMA bulk
  reduce-add: 10·N·M·D FLOPs per step instead of 14, key gradients not bitwise repeatable.

All run on CPU tensors under ``TRITON_INTERPRET=1`` (bf16 dot operands upcast to float32
there, through the ``UPCAST`` constexpr).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["COMPILE_OPTIONS", "DK_PARTS", "DQ_SHORT_MIN_HEAD_DIM", "FORCE_TILES",
           "FUSED_BACKWARD", "SHORT_MAX_KEYS", "SHORT_MEMORY_BYTES", "TILE_KEYS", "Launch",
           "candidates", "dk_parts", "fused_backward_mode", "hopfield_descent_triton",
           "plan_backward", "plan_forward", "short_path_keys", "takes_short_path",
           "unsupported_reason"]

OPTIMIZERS = ("gd", "momentum", "nesterov")
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256

#: The forward takes the short-memory path when one (batch, head) has at most
#: ``SHORT_MAX_KEYS`` keys, padded to a power of two, and they take at most
#: ``SHORT_MEMORY_BYTES`` in the input dtype; the query kernel of the backward takes it too from
#: head dim ``DQ_SHORT_MIN_HEAD_DIM`` (padded) on; the key kernel never does. Measured on the
#: H200 (benchmarks/results/h200-ff95511/, T=8, N=8192, bf16; short vs streaming ms): forward
#: M=64 0.54 vs 0.70 (D=64), 0.95 vs 1.17 (D=128), but M=128 1.13 vs 0.81 and M=256 2.04 vs
#: 1.09 (D=64); query kernel M=64 3.12 vs 4.74 (D=128), but 1.97 vs 1.74 (D=64). Tests move
#: these to run either path at small sizes.
SHORT_MAX_KEYS = 64
SHORT_MEMORY_BYTES = 16 * 1024
DQ_SHORT_MIN_HEAD_DIM = 128

LOG2E_F = 1.4426950408889634
LOG2E: tl.constexpr = tl.constexpr(LOG2E_F)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_keys(K, k_off, offs_m, offs_d, M, D, UPCAST: tl.constexpr):
    """A key tile ``[BLOCK_M, BLOCK_D]`` (zero outside ``M × D``), upcast when interpreting bf16."""
    k = tl.load(K + k_off + offs_m[:, None] * D + offs_d[None, :],
                mask=(offs_m[:, None] < M) & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    return k


@triton.jit
def _logits(xh, k, BIAS, b_off, PAD, p_off, offs_n, offs_m, M, scale2,
            HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr,
            PREC: tl.constexpr, MASK: tl.constexpr = True):
    """``(β x̂·k_j + b_j)·log₂e`` for a query tile against a key tile; −inf where masked.

    ``MASK=False`` (a tile every row of which sees every key: inside ``M``, no padding, below
    the causal diagonal) skips the masking.
    """
    s = tl.dot(xh, tl.trans(k), input_precision=PREC) * scale2
    in_range = offs_m < M
    if HAS_BIAS:
        b = tl.load(BIAS + b_off + offs_m, mask=in_range, other=0.0)
        s += b[None, :] * LOG2E
    if MASK:
        keep = in_range[None, :]
        if HAS_PAD:
            pad = tl.load(PAD + p_off + offs_m, mask=in_range, other=0)
            keep = keep & (pad != 0)[None, :]
        if CAUSAL:
            keep = keep & (offs_m[None, :] <= offs_n[:, None])
        s = tl.where(keep, s, float("-inf"))
    return s


@triton.jit
def _online_update(s, k, m_i, l_i, acc, WITH_MU: tl.constexpr, PREC: tl.constexpr):
    """One online-softmax update with a tile of base-2 logits ``s``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: stay finite
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if WITH_MU:
        acc = acc * alpha[:, None] + tl.dot(p.to(k.dtype), k, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _online_update_full(xh, k, m_i, l_i, acc, scale2, WITH_MU: tl.constexpr,
                        PREC: tl.constexpr):
    """:func:`_online_update` for an unmasked tile without key bias, from the raw scores
    ``x̂·k_j``: ``scale2 > 0`` commutes with the row max, so each logit costs one fused
    multiply-add (``qk·scale2 − m``) instead of a product and a difference. Every logit is
    finite, so the running max is too."""
    qk = tl.dot(xh, tl.trans(k), input_precision=PREC)
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale2)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk * scale2 - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if WITH_MU:
        acc = acc * alpha[:, None] + tl.dot(p.to(k.dtype), k, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _attend_masked(xh, K, k_off, BIAS, b_off, PAD, p_off, offs_n, offs_d, start_m, M, D, scale2,
                   m_i, l_i, acc, WITH_MU: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_M: tl.constexpr):
    """The online-softmax update with the masked key tile at ``start_m``."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    k = _load_keys(K, k_off, offs_m, offs_d, M, D, UPCAST)
    s = _logits(xh, k, BIAS, b_off, PAD, p_off, offs_n, offs_m, M, scale2,
                HAS_BIAS, HAS_PAD, CAUSAL, PREC)
    return _online_update(s, k, m_i, l_i, acc, WITH_MU, PREC)


@triton.jit
def _attend(xh, k_all, K, k_off, BIAS, b_off, PAD, p_off, offs_n, offs_d, M, D, full, hi,
            scale2, WITH_MU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
            CAUSAL: tl.constexpr, SHORT: tl.constexpr, UPCAST: tl.constexpr,
            PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_D: tl.constexpr):
    """Read-out ``μ`` (if ``WITH_MU``) and base-2 log-sum-exp of a query tile over all keys.

    Streaming: key tiles ``[0, full)`` run unmasked, ``[full, hi)`` (the edge: one or two tiles)
    masked and not software-pipelined (see :func:`_query_tile`); with key padding every tile is
    masked, in one pipelined loop. Fully masked rows: ``μ = 0`` and ``lse = 0`` (their potential
    is 0; in backward every logit of the row is −inf, so ``p = 0`` whatever the stored lse).
    """
    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if SHORT:
        offs_m = tl.arange(0, BLOCK_M)
        s = _logits(xh, k_all, BIAS, b_off, PAD, p_off, offs_n, offs_m, M, scale2,
                    HAS_BIAS, HAS_PAD, CAUSAL, PREC)
        m_i, l_i, acc = _online_update(s, k_all, m_i, l_i, acc, WITH_MU, PREC)
    elif HAS_PAD:
        for start_m in range(0, hi, BLOCK_M):
            m_i, l_i, acc = _attend_masked(xh, K, k_off, BIAS, b_off, PAD, p_off, offs_n,
                                           offs_d, start_m, M, D, scale2, m_i, l_i, acc,
                                           WITH_MU, HAS_BIAS, HAS_PAD, CAUSAL, UPCAST, PREC,
                                           BLOCK_M)
    else:
        for start_m in range(0, full, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            k = _load_keys(K, k_off, offs_m, offs_d, M, D, UPCAST)
            if HAS_BIAS:
                s = _logits(xh, k, BIAS, b_off, PAD, p_off, offs_n, offs_m, M, scale2,
                            HAS_BIAS, HAS_PAD, CAUSAL, PREC, False)
                m_i, l_i, acc = _online_update(s, k, m_i, l_i, acc, WITH_MU, PREC)
            else:
                m_i, l_i, acc = _online_update_full(xh, k, m_i, l_i, acc, scale2, WITH_MU,
                                                    PREC)
        for start_m in tl.range(full, hi, BLOCK_M, num_stages=1):
            m_i, l_i, acc = _attend_masked(xh, K, k_off, BIAS, b_off, PAD, p_off, offs_n,
                                           offs_d, start_m, M, D, scale2, m_i, l_i, acc,
                                           WITH_MU, HAS_BIAS, HAS_PAD, CAUSAL, UPCAST, PREC,
                                           BLOCK_M)
    valid = l_i > 0.0
    l_safe = tl.where(valid, l_i, 1.0)
    mu = acc / l_safe[:, None]
    lse2 = tl.where(valid, m_i + tl.log2(l_safe), 0.0)
    return mu, lse2


@triton.jit
def _round(y, DT: tl.constexpr, UPCAST: tl.constexpr):
    """The float32 iterate rounded to the input dtype (the read-out's operand)."""
    yh = y.to(DT)
    if UPCAST:
        yh = yh.to(tl.float32)
    return yh


@triton.jit
def _query_tile(K, N, M, D, H, HK, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                SHORT: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The query tile of this program (grid ``(⌈N / BLOCK_N⌉, B·H)``) and its key head.

    Returns ``(bh, offs_n, offs_d, row_ok, tile_ok, q_off, k_off, b_off, p_off, full, hi,
    k_all)``: the flat batch·head, row and column offsets with their masks, the offsets of the
    tile in ``[B·H, N, D]`` and of its keys, key bias and padding row; the key bounds: keys
    ``[0, full)`` come in whole tiles that every row of the tile sees (no padding; causal:
    before the tile's first row), keys ``[full, hi)`` need masking (causal: ``hi`` stops at
    the tile's diagonal); on the short-memory path, every key of the head (loaded once).
    """
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)  # b * H + h
    b = bh // H
    hk = (bh % H) // (H // HK)  # grouped heads: query head h reads key head h // G
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_n < N
    tile_ok = row_ok[:, None] & (offs_d[None, :] < D)
    q_off = bh * N * D + offs_n[:, None] * D + offs_d[None, :]
    k_off = (b * HK + hk) * M * D
    b_off = (b * HK + hk) * M
    p_off = b * M
    hi = M
    full = M // BLOCK_M * BLOCK_M
    if CAUSAL:
        hi = tl.minimum(M, (pid_n + 1) * BLOCK_N)  # query i sees keys j <= i
        full = tl.minimum(full, pid_n * BLOCK_N // BLOCK_M * BLOCK_M)
    if HAS_PAD:
        full = 0
    if SHORT:
        k_all = _load_keys(K, k_off, tl.arange(0, BLOCK_M), offs_d, M, D, UPCAST)
    else:
        k_all = tl.zeros([1, 1], tl.float32)  # unused
    return bh, offs_n, offs_d, row_ok, tile_ok, q_off, k_off, b_off, p_off, full, hi, k_all


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(Q, K, BIAS, PAD, OUT, MU, LSE, ENERGY, ELSE,
                N, M, D, H, HK, mu_step, lse_step, scale2, inv_scale, eta, rho, nest, NB, MB,
                T: tl.constexpr, VELOCITY: tl.constexpr, NESTEROV: tl.constexpr,
                SAVE: tl.constexpr, ENERGIES: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, SHORT: tl.constexpr,
                UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    DT: tl.constexpr = Q.dtype.element_ty
    bh, offs_n, offs_d, row_ok, tile_ok, q_off, k_off, b_off, p_off, full, hi, k_all = (
        _query_tile(K, N, M, D, H, HK, HAS_PAD, CAUSAL, SHORT, UPCAST, BLOCK_N, BLOCK_M,
                    BLOCK_D))
    xi = tl.load(Q + q_off, mask=tile_ok, other=0.0).to(tl.float32)  # float32 master copy
    v = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for t in range(T):
        if NESTEROV:
            y = xi + nest * v
        else:
            y = xi
        mu, lse2 = _attend(_round(y, DT, UPCAST), k_all, K, k_off, BIAS, b_off, PAD, p_off,
                           offs_n, offs_d, M, D, full, hi, scale2, True, HAS_BIAS, HAS_PAD,
                           CAUSAL, SHORT, UPCAST, PREC, BLOCK_N, BLOCK_M, BLOCK_D)
        if SAVE:
            tl.store(MU + t * mu_step + q_off, mu, mask=tile_ok)
            tl.store(LSE + t * lse_step + bh * N + offs_n, lse2, mask=row_ok)
        if ENERGIES:
            if NESTEROV:  # the read-out point y_t is not ξ_t: one lse-only pass at ξ_t
                _, lse2 = _attend(_round(xi, DT, UPCAST), k_all, K, k_off, BIAS, b_off, PAD,
                                  p_off, offs_n, offs_d, M, D, full, hi, scale2, False,
                                  HAS_BIAS, HAS_PAD, CAUSAL, SHORT, UPCAST, PREC, BLOCK_N,
                                  BLOCK_M, BLOCK_D)
            energy = 0.5 * tl.sum(xi * xi, 1) - lse2 * (LN2 * inv_scale)
            tl.store(ENERGY + (bh * N + offs_n) * (T + 1) + t, energy, mask=row_ok)
            if SAVE:
                tl.store(ELSE + t * lse_step + bh * N + offs_n, lse2, mask=row_ok)
        g = y - mu
        if VELOCITY:
            v = rho * v - eta * g
            xi = xi + v
        else:
            xi = xi - eta * g
    if ENERGIES:  # energy of the final iterate
        _, lse2 = _attend(_round(xi, DT, UPCAST), k_all, K, k_off, BIAS, b_off, PAD, p_off,
                          offs_n, offs_d, M, D, full, hi, scale2, False, HAS_BIAS, HAS_PAD,
                          CAUSAL, SHORT, UPCAST, PREC, BLOCK_N, BLOCK_M, BLOCK_D)
        energy = 0.5 * tl.sum(xi * xi, 1) - lse2 * (LN2 * inv_scale)
        tl.store(ENERGY + (bh * N + offs_n) * (T + 1) + T, energy, mask=row_ok)
        if SAVE:
            tl.store(ELSE + T * lse_step + bh * N + offs_n, lse2, mask=row_ok)
    tl.store(OUT + q_off, xi.to(DT), mask=tile_ok)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _replay(xi, v, MU, mu_step, q_off, tile_ok, t, eta, rho, nest,
            VELOCITY: tl.constexpr, NESTEROV: tl.constexpr):
    """Step ``(ξ_t, v_t) -> (ξ_{t+1}, v_{t+1})`` from the saved read-out ``μ_t`` (the same float32
    operations as the forward, so the replayed iterates are the forward's)."""
    if NESTEROV:
        y = xi + nest * v
    else:
        y = xi
    g = y - tl.load(MU + t * mu_step + q_off, mask=tile_ok, other=0.0)
    if VELOCITY:
        v = rho * v - eta * g
        xi = xi + v
    else:
        xi = xi - eta * g
    return xi, v


@triton.jit
def _add_key_grads(sink, DBIAS, dk, db, bhk, start_m, offs_d, M, D, HAS_BIAS: tl.constexpr,
                   FUSED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Add one query tile's terms ``dk [BLOCK_M, BLOCK_D]`` and ``db [BLOCK_M]`` of the key tile
    at ``start_m`` into the float32 ``dK`` and ``d key_bias`` of key head ``bhk`` (other query
    tiles, steps and grouped heads add into the same keys). ``FUSED == 1``: relaxed reductions
    (``red.relaxed``: no ordering, no returned value); ``FUSED == 2``: ``dK`` through one TMA
    bulk reduce-add (``sink`` is its tensor descriptor, keys past ``M`` dropped by the copy)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    key_ok = offs_m < M
    if FUSED == 2:
        sink.atomic_add([bhk, start_m, 0], tl.reshape(dk, [1, BLOCK_M, BLOCK_D]))
    else:
        tl.atomic_add(sink + (bhk * M + offs_m)[:, None] * D + offs_d[None, :], dk,
                      mask=key_ok[:, None] & (offs_d[None, :] < D), sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(DBIAS + bhk * M + offs_m, db, mask=key_ok, sem="relaxed")


@triton.jit
def _readout_tile(xh, k, offs_m, lse2, BIAS, b_off, PAD, p_off, offs_n, M, scale2,
                  HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                  PREC: tl.constexpr):
    """One key tile's part of ``Σ_j p_ij k_j``, ``p`` recomputed from the saved lse; and ``p``."""
    s2 = _logits(xh, k, BIAS, b_off, PAD, p_off, offs_n, offs_m, M, scale2,
                 HAS_BIAS, HAS_PAD, CAUSAL, PREC)
    p = tl.exp2(s2 - lse2[:, None])
    return tl.dot(p.to(k.dtype), k, input_precision=PREC), p


@triton.jit
def _dq_tile(yh, dmu, delta, k, offs_m, lse2, BIAS, b_off, PAD, p_off, offs_n, M, scale2,
             HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr,
             PREC: tl.constexpr, MASK: tl.constexpr = True):
    """One key tile's part of ``Σ_j dS_ij k_j``, ``dS = P ⊙ (dμ Kᵀ − Δ)``, ``P`` recomputed
    (``MASK=False``: a tile every row sees whole, see :func:`_logits`); and ``P``, ``dS``."""
    s2 = _logits(yh, k, BIAS, b_off, PAD, p_off, offs_n, offs_m, M, scale2,
                 HAS_BIAS, HAS_PAD, CAUSAL, PREC, MASK)
    p = tl.exp2(s2 - lse2[:, None])
    dp = tl.dot(dmu, tl.trans(k), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, input_precision=PREC), p, ds


@triton.jit
def _dq_part(yh, dmu, delta, k, start_m, lse2, BIAS, b_off, PAD, p_off, offs_n, offs_d, M, D,
             scale2, scale, sink, DBIAS, bhk, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
             CAUSAL: tl.constexpr, PREC: tl.constexpr, FUSED: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr = True):
    """:func:`_dq_tile` of the key tile ``k`` at ``start_m``; with ``FUSED`` also its ``dK``
    terms (score path ``β dSᵀŷ``, value path ``Pᵀdμ``) and ``d key_bias`` (``Σ_i dS``), added
    by :func:`_add_key_grads` from the same ``P`` and ``dS``."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    part, p, ds = _dq_tile(yh, dmu, delta, k, offs_m, lse2, BIAS, b_off, PAD, p_off, offs_n, M,
                           scale2, HAS_BIAS, HAS_PAD, CAUSAL, PREC, MASK)
    if FUSED:
        dk = scale * tl.dot(tl.trans(ds.to(k.dtype)), yh, input_precision=PREC)
        dk += tl.dot(tl.trans(p.to(k.dtype)), dmu, input_precision=PREC)
        _add_key_grads(sink, DBIAS, dk, tl.sum(ds, 0), bhk, start_m, offs_d, M, D, HAS_BIAS,
                       FUSED, BLOCK_M, BLOCK_D)
    return part


@triton.jit
def _dq_streamed(yh, dmu, delta, K, k_off, start_m, lse2, BIAS, b_off, PAD, p_off, offs_n, offs_d,
                 M, D, scale2, scale, sink, DBIAS, bhk, HAS_BIAS: tl.constexpr,
                 HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                 PREC: tl.constexpr, FUSED: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_D: tl.constexpr, MASK: tl.constexpr = True):
    """:func:`_dq_part` of the streamed key tile at ``start_m`` (loaded here)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    k = _load_keys(K, k_off, offs_m, offs_d, M, D, UPCAST)
    return _dq_part(yh, dmu, delta, k, start_m, lse2, BIAS, b_off, PAD, p_off, offs_n, offs_d,
                    M, D, scale2, scale, sink, DBIAS, bhk, HAS_BIAS, HAS_PAD, CAUSAL, PREC,
                    FUSED, BLOCK_M, BLOCK_D, MASK)


@triton.jit
def _energy_part(xh, k, start_m, lse2, e, BIAS, b_off, PAD, p_off, offs_n, offs_d, M, D, scale2,
                 scale, sink, DBIAS, bhk, HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr,
                 CAUSAL: tl.constexpr, PREC: tl.constexpr, FUSED: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """One key tile's part of ``μ̃``; with ``FUSED`` also the energy point's key terms
    ``(−Σ_i e_i p̃_ij x̂_i, −Σ_i e_i p̃_ij / β)`` (``e = ∂L/∂E``), added."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    part, p = _readout_tile(xh, k, offs_m, lse2, BIAS, b_off, PAD, p_off, offs_n, M, scale2,
                            HAS_BIAS, HAS_PAD, CAUSAL, PREC)
    if FUSED:
        w = -p * e[:, None]
        dk = tl.dot(tl.trans(w.to(k.dtype)), xh, input_precision=PREC)
        _add_key_grads(sink, DBIAS, dk, tl.sum(w, 0) / scale, bhk, start_m, offs_d, M, D,
                       HAS_BIAS, FUSED, BLOCK_M, BLOCK_D)
    return part


@triton.jit
def _energy_readout(xh, lse2, e, k_all, K, k_off, BIAS, b_off, PAD, p_off, offs_n, offs_d, M,
                    D, hi, scale2, scale, sink, DBIAS, bhk, HAS_BIAS: tl.constexpr,
                    HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, SHORT: tl.constexpr,
                    UPCAST: tl.constexpr, PREC: tl.constexpr, FUSED: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``μ̃ = Σ_j p̃_ij k_j`` at an energy point, ``p̃`` recomputed from its saved lse (and, with
    ``FUSED``, the point's key terms, see :func:`_energy_part`)."""
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if SHORT:
        acc += _energy_part(xh, k_all, 0, lse2, e, BIAS, b_off, PAD, p_off, offs_n, offs_d, M,
                            D, scale2, scale, sink, DBIAS, bhk, HAS_BIAS, HAS_PAD, CAUSAL, PREC,
                            FUSED, BLOCK_M, BLOCK_D)
    else:
        for start_m in range(0, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            k = _load_keys(K, k_off, offs_m, offs_d, M, D, UPCAST)
            acc += _energy_part(xh, k, start_m, lse2, e, BIAS, b_off, PAD, p_off, offs_n,
                                offs_d, M, D, scale2, scale, sink, DBIAS, bhk, HAS_BIAS,
                                HAS_PAD, CAUSAL, PREC, FUSED, BLOCK_M, BLOCK_D)
    return acc


@triton.jit
def _energy_dk(k, xh, lse2, e, bias2, mask_t, scale2, PREC: tl.constexpr):
    """Energy-point terms of one key tile: ``(−Σ_i e_i p̃_ij x̂_i, −Σ_i e_i p̃_ij)``."""
    s2 = tl.dot(k, tl.trans(xh), input_precision=PREC) * scale2 + bias2[:, None]
    s2 = tl.where(mask_t, s2, float("-inf"))
    w = -tl.exp2(s2 - lse2[None, :]) * e[None, :]
    return tl.dot(w.to(k.dtype), xh, input_precision=PREC), tl.sum(w, 1)


@triton.jit
def _bwd_dq_kernel(Q, K, BIAS, PAD, MU, LSE, ELSE, DENERGY, DOUT, DQ, DMU, DELTA, Y, DK, DBIAS,
                   N, M, D, H, HK, mu_step, lse_step, scale2, scale, eta, rho, nest, NB, MB,
                   T: tl.constexpr, VELOCITY: tl.constexpr, NESTEROV: tl.constexpr,
                   EGRAD: tl.constexpr, KEEP_Y: tl.constexpr, FUSED: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                   SHORT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Reverse chain of one query tile: adjoints ``a = ∂L/∂ξ_{t+1}``, ``w`` (of ``v_{t+1}``).

    ``FUSED == 0``: writes ``dμ_t``, ``Δ_t`` and (``KEEP_Y``) the rounded read-out points
    ``ŷ_t`` (and, with energies, ``round(ξ_T)`` as entry ``T``) for the key kernel.
    ``FUSED`` (experimental, see ``FUSED_BACKWARD``): the whole backward in this kernel, each
    key tile's ``dK`` / ``d key_bias`` terms formed from the same ``P``, ``dS`` and added into
    the zeroed float32 ``DK [B·HK, M, D]`` / ``DBIAS [B·HK, M]`` (1: relaxed reductions,
    2: TMA bulk reduce-add), 10·N·M·D FLOPs per step; nothing else written.
    """
    DT: tl.constexpr = Q.dtype.element_ty
    bh, offs_n, offs_d, row_ok, tile_ok, q_off, k_off, b_off, p_off, full, hi, k_all = (
        _query_tile(K, N, M, D, H, HK, HAS_PAD, CAUSAL, SHORT, UPCAST, BLOCK_N, BLOCK_M,
                    BLOCK_D))
    bhk = b_off // M  # the key head: b·HK + h // G
    sink = DK
    if FUSED == 2:
        sink = tl.make_tensor_descriptor(DK, shape=[tl.num_programs(1) // H * HK, M, D],
                                         strides=[M * D, D, 1],
                                         block_shape=[1, BLOCK_M, BLOCK_D])
    a = tl.load(DOUT + q_off, mask=tile_ok, other=0.0).to(tl.float32)
    w = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    de_off = (bh * N + offs_n) * (T + 1)
    if EGRAD:  # energy of ξ_T: ∂E/∂ξ = ξ − μ̃ (the kinetic and the potential term)
        xi = tl.load(Q + q_off, mask=tile_ok, other=0.0).to(tl.float32)
        v = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for s in range(T):
            xi, v = _replay(xi, v, MU, mu_step, q_off, tile_ok, s, eta, rho, nest, VELOCITY,
                            NESTEROV)
        e = tl.load(DENERGY + de_off + T, mask=row_ok, other=0.0)
        lse_e = tl.load(ELSE + T * lse_step + bh * N + offs_n, mask=row_ok, other=float("inf"))
        mu_e = _energy_readout(_round(xi, DT, UPCAST), lse_e, e, k_all, K, k_off, BIAS, b_off,
                               PAD, p_off, offs_n, offs_d, M, D, hi, scale2, scale, sink, DBIAS,
                               bhk, HAS_BIAS, HAS_PAD, CAUSAL, SHORT, UPCAST, PREC, FUSED,
                               BLOCK_N, BLOCK_M, BLOCK_D)
        a += e[:, None] * (xi - mu_e)
        if KEEP_Y:
            tl.store(Y + T * mu_step + q_off, _round(xi, DT, UPCAST).to(DT), mask=tile_ok)
    for i in range(T):
        t = T - 1 - i
        # Replay ξ_t, v_t from q (O(T²) element-wise work, no N×M work; q is re-read rather
        # than held in registers across the key loop).
        xi = tl.load(Q + q_off, mask=tile_ok, other=0.0).to(tl.float32)
        v = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for s in range(t):
            xi, v = _replay(xi, v, MU, mu_step, q_off, tile_ok, s, eta, rho, nest, VELOCITY,
                            NESTEROV)
        if NESTEROV:
            y = xi + nest * v
        else:
            y = xi
        yh = _round(y, DT, UPCAST)
        if KEEP_Y:
            tl.store(Y + t * mu_step + q_off, yh.to(DT), mask=tile_ok)
        mu = tl.load(MU + t * mu_step + q_off, mask=tile_ok, other=0.0)
        # rows past N: lse = +inf, so p = 0 (their dK terms vanish)
        lse2 = tl.load(LSE + t * lse_step + bh * N + offs_n, mask=row_ok, other=float("inf"))
        dv = w + a  # ∂L/∂v_{t+1}: ξ_{t+1} = ξ_t + v_{t+1}
        dmu = eta * dv  # v_{t+1} = ρ v_t − η (y_t − μ_t)
        # dμ enters the dots in the input dtype, and Δ = dμ·μ takes the same rounded dμ: then
        # dS ∝ dμ·k_j − Δ = dμ·(k_j − μ) is shift-invariant, and keys with a large common
        # offset c do not turn dμ's rounding error into a spurious dμ-error·c in every dS.
        dmu_c = dmu.to(DT)
        if UPCAST:
            dmu_c = dmu_c.to(tl.float32)
        delta = tl.sum(dmu_c.to(tl.float32) * mu, 1)
        if EGRAD:
            e = tl.load(DENERGY + de_off + t, mask=row_ok, other=0.0)
            if not NESTEROV:  # E(ξ_t) shares the read-out's logits: −lse/β adds e/β to Δ
                delta += e / scale
        if not FUSED:
            tl.store(DMU + t * mu_step + q_off, dmu_c, mask=tile_ok)
            tl.store(DELTA + t * lse_step + bh * N + offs_n, delta, mask=row_ok)
        # ∂L/∂ŷ = β Σ_j dS_ij k_j with dS = P ⊙ (dμ Kᵀ − Δ): flash-style, recomputing P.
        acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        if SHORT:
            acc += _dq_part(yh, dmu_c, delta, k_all, 0, lse2, BIAS, b_off, PAD, p_off, offs_n,
                            offs_d, M, D, scale2, scale, sink, DBIAS, bhk, HAS_BIAS, HAS_PAD,
                            CAUSAL, PREC, FUSED, BLOCK_M, BLOCK_D)
        elif HAS_PAD:  # every tile masked, one pipelined loop
            for start_m in range(0, hi, BLOCK_M):
                acc += _dq_streamed(yh, dmu_c, delta, K, k_off, start_m, lse2, BIAS, b_off, PAD,
                                    p_off, offs_n, offs_d, M, D, scale2, scale, sink, DBIAS, bhk,
                                    HAS_BIAS, HAS_PAD, CAUSAL, UPCAST, PREC, FUSED, BLOCK_M,
                                    BLOCK_D)
        else:  # unmasked tiles, then the edge (one or two tiles) masked, not pipelined
            for start_m in range(0, full, BLOCK_M):
                acc += _dq_streamed(yh, dmu_c, delta, K, k_off, start_m, lse2, BIAS, b_off, PAD,
                                    p_off, offs_n, offs_d, M, D, scale2, scale, sink, DBIAS, bhk,
                                    HAS_BIAS, HAS_PAD, CAUSAL, UPCAST, PREC, FUSED, BLOCK_M,
                                    BLOCK_D, False)
            for start_m in tl.range(full, hi, BLOCK_M, num_stages=1):
                acc += _dq_streamed(yh, dmu_c, delta, K, k_off, start_m, lse2, BIAS, b_off, PAD,
                                    p_off, offs_n, offs_d, M, D, scale2, scale, sink, DBIAS, bhk,
                                    HAS_BIAS, HAS_PAD, CAUSAL, UPCAST, PREC, FUSED, BLOCK_M,
                                    BLOCK_D)
        # dμ and ∂L/∂v_{t+1} are recomputed from (w, a) rather than held across the key loop
        # (register pressure); g_t = y_t − μ_t, v_{t+1} = ρ v_t − η g_t.
        dy = scale * acc - (eta * w + eta * a)
        if VELOCITY:
            w_next = rho * w + rho * a
            if NESTEROV:
                w_next += nest * dy
        a = a + dy  # y_t = ξ_t + c v_t
        if EGRAD:
            if NESTEROV:  # E(ξ_t) at its own point
                lse_e = tl.load(ELSE + t * lse_step + bh * N + offs_n, mask=row_ok,
                                other=float("inf"))
                mu_e = _energy_readout(_round(xi, DT, UPCAST), lse_e, e, k_all, K, k_off, BIAS,
                                       b_off, PAD, p_off, offs_n, offs_d, M, D, hi, scale2,
                                       scale, sink, DBIAS, bhk, HAS_BIAS, HAS_PAD, CAUSAL,
                                       SHORT, UPCAST, PREC, FUSED, BLOCK_N, BLOCK_M, BLOCK_D)
                a += e[:, None] * (xi - mu_e)
            else:
                a += e[:, None] * xi  # the kinetic term (the potential went through Δ)
        if VELOCITY:
            w = w_next
    tl.store(DQ + q_off, a, mask=tile_ok)


@triton.jit
def _dk_query_tile(dk, db, k, keep, bias2, offs_m, start_n, bh, Q, MU, LSE, ELSE, DENERGY, DMU,
                   DELTA, Y, N, D, mu_step, lse_step, scale2, scale, eta, rho, nest,
                   T: tl.constexpr, VELOCITY: tl.constexpr, NESTEROV: tl.constexpr,
                   EGRAD: tl.constexpr, KEEP_Y: tl.constexpr, CAUSAL: tl.constexpr,
                   UPCAST: tl.constexpr, PREC: tl.constexpr, MASK: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One query tile's part, over every step, of the key tile's ``dK`` and ``d key_bias``.

    ``MASK=False``: every query of the tile sees every key of the key tile (no padding, past
    the causal diagonal). Keys past ``M`` need no mask here: their rows are never stored;
    queries past ``N`` load ``lse = +inf``, hence ``p = 0``. ``KEEP_Y``: the read-out points
    come from the query kernel's ``Y``, else the iterates are replayed from ``q`` and ``μ_t``.
    """
    DT: tl.constexpr = Q.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    tile_ok = row_ok[:, None] & (offs_d[None, :] < D)
    q_off = bh * N * D + offs_n[:, None] * D + offs_d[None, :]
    mask_t = keep[:, None]
    if CAUSAL:
        mask_t = mask_t & (offs_m[:, None] <= offs_n[None, :])
    if not KEEP_Y:
        xi = tl.load(Q + q_off, mask=tile_ok, other=0.0).to(tl.float32)
        v = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    de_off = (bh * N + offs_n) * (T + 1)
    for t in range(T):
        if KEEP_Y:
            yh = tl.load(Y + t * mu_step + q_off, mask=tile_ok, other=0.0)
            if UPCAST:
                yh = yh.to(tl.float32)
        elif NESTEROV:
            y = xi + nest * v
            if EGRAD:  # E(ξ_t) at its own point (else it is folded into Δ)
                e = tl.load(DENERGY + de_off + t, mask=row_ok, other=0.0)
                lse_e = tl.load(ELSE + t * lse_step + bh * N + offs_n, mask=row_ok,
                                other=float("inf"))
                dk_e, db_e = _energy_dk(k, _round(xi, DT, UPCAST), lse_e, e, bias2,
                                        mask_t, scale2, PREC)
                dk += dk_e
                db += db_e / scale
            yh = _round(y, DT, UPCAST)
        else:
            yh = _round(xi, DT, UPCAST)
        lse2 = tl.load(LSE + t * lse_step + bh * N + offs_n, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + t * lse_step + bh * N + offs_n, mask=row_ok, other=0.0)
        dmu = tl.load(DMU + t * mu_step + q_off, mask=tile_ok, other=0.0)
        if UPCAST:
            dmu = dmu.to(tl.float32)
        # Transposed tiles [BLOCK_M, BLOCK_N]: keys are rows here.
        s2 = tl.dot(k, tl.trans(yh), input_precision=PREC) * scale2 + bias2[:, None]
        if MASK:
            s2 = tl.where(mask_t, s2, float("-inf"))
        p = tl.exp2(s2 - lse2[None, :])
        dp = tl.dot(k, tl.trans(dmu), input_precision=PREC)
        ds = p * (dp - delta[None, :])
        dk += scale * tl.dot(ds.to(k.dtype), yh, input_precision=PREC)
        dk += tl.dot(p.to(k.dtype), dmu, input_precision=PREC)
        db += tl.sum(ds, 1)
        if not KEEP_Y:
            xi, v = _replay(xi, v, MU, mu_step, q_off, tile_ok, t, eta, rho, nest, VELOCITY,
                            NESTEROV)
    if EGRAD:  # E(ξ_T)
        e = tl.load(DENERGY + de_off + T, mask=row_ok, other=0.0)
        lse_e = tl.load(ELSE + T * lse_step + bh * N + offs_n, mask=row_ok, other=float("inf"))
        if KEEP_Y:
            xh = tl.load(Y + T * mu_step + q_off, mask=tile_ok, other=0.0)
            if UPCAST:
                xh = xh.to(tl.float32)
        else:
            xh = _round(xi, DT, UPCAST)
        dk_e, db_e = _energy_dk(k, xh, lse_e, e, bias2, mask_t, scale2, PREC)
        dk += dk_e
        db += db_e / scale
    return dk, db


@triton.jit
def _first_tile(start, part, parts):
    """The first query-tile index ``>= start`` that belongs to split part ``part``."""
    return start + (part + parts - start % parts) % parts


@triton.jit
def _bwd_dk_kernel(Q, K, BIAS, PAD, MU, LSE, ELSE, DENERGY, DMU, DELTA, Y, DK, DBIAS,
                   N, M, D, H, HK, mu_step, lse_step, part_step, scale2, scale, eta, rho, nest,
                   NB, MB, T: tl.constexpr, VELOCITY: tl.constexpr, NESTEROV: tl.constexpr,
                   EGRAD: tl.constexpr, KEEP_Y: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                   UPCAST: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``dK`` (score path β dSᵀŷ + value path Pᵀdμ) and ``d key_bias`` (Σ_i dS) of one key tile,
    summed over the query heads of its group, every step and the query tiles of its part.

    Grid ``(⌈M / BLOCK_M⌉, B·HK, parts)``: with ``parts > 1`` the query tiles are dealt out
    round-robin and part ``z`` writes its partial sums at ``DK + z·part_step`` (summed on the
    host, in a fixed order), so that few key tiles still fill the GPU. ``SPLIT``: whether
    ``parts > 1`` (without, the query loop has a constant stride, as the compiler prefers).
    """
    pid_m = tl.program_id(0)
    bhk = tl.program_id(1)  # b * HK + hk
    part = 0
    parts = 1
    if SPLIT:
        part = tl.program_id(2)
        parts = tl.num_programs(2)
    b = bhk // HK
    hk = bhk % HK
    G = H // HK
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_m < M
    k = _load_keys(K, bhk * M * D, offs_m, offs_d, M, D, UPCAST)
    keep = key_ok
    if HAS_PAD:
        keep = keep & (tl.load(PAD + b * M + offs_m, mask=key_ok, other=0) != 0)
    bias2 = tl.zeros([BLOCK_M], tl.float32)
    if HAS_BIAS:
        bias2 = tl.load(BIAS + bhk * M + offs_m, mask=key_ok, other=0.0) * LOG2E
    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    db = tl.zeros([BLOCK_M], tl.float32)
    # Query tiles [first, mid) need the mask, [mid, n_tiles) do not.
    n_tiles = tl.cdiv(N, BLOCK_N)
    first = 0
    mid = 0
    if CAUSAL:  # earlier queries cannot see these keys; later tiles see all of them
        first = pid_m * BLOCK_M // BLOCK_N
        mid = tl.minimum(n_tiles, tl.cdiv((pid_m + 1) * BLOCK_M - 1, BLOCK_N))
    if HAS_PAD:
        mid = n_tiles
    for g in range(G):
        bh = b * H + hk * G + g
        for i in range(_first_tile(first, part, parts), mid, parts):
            dk, db = _dk_query_tile(dk, db, k, keep, bias2, offs_m, i * BLOCK_N, bh, Q, MU, LSE,
                                    ELSE, DENERGY, DMU, DELTA, Y, N, D, mu_step, lse_step,
                                    scale2, scale, eta, rho, nest, T, VELOCITY, NESTEROV,
                                    EGRAD, KEEP_Y, CAUSAL, UPCAST, PREC, True, BLOCK_N,
                                    BLOCK_D)
        if not HAS_PAD:
            for i in range(_first_tile(mid, part, parts), n_tiles, parts):
                dk, db = _dk_query_tile(dk, db, k, keep, bias2, offs_m, i * BLOCK_N, bh, Q,
                                        MU, LSE, ELSE, DENERGY, DMU, DELTA, Y, N, D, mu_step,
                                        lse_step, scale2, scale, eta, rho, nest, T, VELOCITY,
                                        NESTEROV, EGRAD, KEEP_Y, CAUSAL, UPCAST, PREC, False,
                                        BLOCK_N, BLOCK_D)
    dk_off = part * part_step + bhk * M * D  # [parts, B·HK, M, D]
    tl.store(DK + dk_off + offs_m[:, None] * D + offs_d[None, :], dk,
             mask=key_ok[:, None] & (offs_d[None, :] < D))
    if HAS_BIAS:  # [parts, B·HK, M]
        tl.store(DBIAS + dk_off // D + offs_m, db, mask=key_ok)


# --------------------------------------------------------------------------------------------
# Launchers: each kernel call is first planned as data (a ``Launch``), then run. The same plans,
# built from meta tensors, are what ``energy_attn.kernels.compile_check`` compiles for a GPU
# architecture without one.
# --------------------------------------------------------------------------------------------


#: Compiler options of every launch (and of ``compile_check``). FP fusion (``a*b + c`` as one
#: FMA) is on: every kernel was timed with it, and the forward's unmasked logits are written
#: for it. Triton 3.9 warns that its default turns it off in 3.10; pinning it here keeps the
#: kernels that were measured.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


class Launch(NamedTuple):
    """One kernel call: ``kernel[grid](**args, **meta, **COMPILE_OPTIONS)``, or autotuned over
    ``candidates``.

    ``meta`` holds the constexprs and the default tile configuration (``TILE_KEYS``: the first
    candidate, the measured winner where one exists); ``grid(meta)`` is the launch grid for a
    tile configuration. On a GPU with more than one candidate the call goes through the
    kernel's ``triton.autotune`` wrapper, which picks among ``candidates`` once per key and
    caches the choice; under the interpreter, for ``compile_check`` and with ``FORCE_TILES`` the
    default runs as is.
    """

    kernel: Any  # a @triton.jit function
    grid: Callable[[dict], tuple[int, int, int]]
    args: dict  # run-time arguments by name: tensors, ints, floats
    meta: dict  # constexprs, BLOCK_N, BLOCK_M, num_warps, num_stages
    candidates: tuple  # ((BLOCK_N, BLOCK_M, num_warps, num_stages), ...)

    def __call__(self) -> None:
        """Run it on the tensors' device (:func:`_on_device`), with the scratch allocator the
        fused TMA backward's descriptors need (:func:`_tma_scratch`)."""
        tma = self.meta.get("FUSED") == 2
        with _on_device(self.args["Q"]), _tma_scratch() if tma else contextlib.nullcontext():
            self._run()

    def _run(self) -> None:
        tuner = _TUNERS.get(self.kernel)
        if tuner is None or not _on_gpu(self.args) or len(self.candidates) < 2:
            self.kernel[self.grid(self.meta)](**self.args, **self.meta, **COMPILE_OPTIONS)
            return
        fixed = {k: v for k, v in self.meta.items() if k not in TILE_KEYS}
        tuner[self.grid](**self.args, **fixed, **COMPILE_OPTIONS)  # also what it benchmarks


def _on_gpu(args: dict) -> bool:
    """Whether a launch with these arguments runs compiled on a GPU (not the interpreter)."""
    return not _interpreting() and any(
        isinstance(a, torch.Tensor) and a.is_cuda for a in args.values())


TILE_KEYS = ("BLOCK_N", "BLOCK_M", "num_warps", "num_stages")

#: Tests and the ``--tiles`` benchmark set this to ``{kernel: (BLOCK_N, BLOCK_M, num_warps,
#: num_stages)}`` to run one configuration (no autotuning) for the kernels it names.
FORCE_TILES: dict | None = None

#: Tests and benchmarks set this to force the number of query parts of the dK kernel.
DK_PARTS: int | None = None

#: Experimental, never timed: the backward as one kernel at 10·N·M·D FLOPs per step (the query
#: kernel also forms each key tile's dK and d key_bias terms from the same P and dS, and adds
#: them across query tiles in float32), instead of the default two kernels at 14·N·M·D.
#: ``None``: the two kernels (deterministic). ``"red"``: relaxed float32 reductions (the
#: one-kernel backward measured at commit f7d6df6 used Triton's default ``acq_rel`` atomics, a
#: returning ``atom.acq_rel`` per element). ``"tma"``: one TMA bulk reduce-add per key tile
#: (sm_90+ and D % 4 == 0, else ``"red"``; ``"red"`` under the interpreter, which lacks it).
#: Key gradients then differ in the last bits from run to run, so under
#: ``torch.use_deterministic_algorithms(True)`` the two kernels run whatever this says.
#: Benchmarks set this to time it.
FUSED_BACKWARD: str | None = None

#: The dK kernel splits its queries into parts until about this many programs per SM run.
#: Measured on the H200 (benchmarks/results/h200-ff95511/, D=64, N=8192, T=8, dK ms by
#: parts): M=64: 1 part 2.65, 8 0.77, 33 0.78, 64 0.82; M=256: 1 2.66, 8 1.50, 17 1.57, 32
#: 1.55, 64 1.62; with 2048 key tiles (M=2048, 8192) 1 or 2 parts are within 2%.
DK_PROGRAMS_PER_SM = 8


#: The autotuning space: ``(BLOCK_N, BLOCK_M, num_warps, num_stages)`` candidates by (kernel,
#: input itemsize, heavy, padded head dim), **the first one the default** (used without
#: autotuning: interpreter, ``compile_check``). "heavy" = a velocity (momentum, Nesterov) or
#: energies. Candidates of 16-bit inputs at D = 64, 128 are the winners and runners-up measured
#: on an NVIDIA H200 (benchmarks/results/gpu-H200-2026-11-29.md, milliseconds in comments,
#: D=128, N=M=8192, T=4; re-swept at commit c0f48b6, benchmarks/results/h200-c0f48b6/: every
#: default still won, within noise); rows marked "compile-time" were never timed on a GPU and
#: keep the tile picked from register counts at commit 7b1daef. In the dK kernel BLOCK_N is the
#: streamed query tile and BLOCK_M its own key tile, as in the file.
_SPACE = {
    # forward, GD: 8.9, 9.1, 9.6, 10.0 ms; D=64: 5.8 ms (winner), 6.6 (shipped 7b1daef)
    ("fwd", 2, False, 128): ((128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 2)),
    ("fwd", 2, False, 64): ((128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)),
    # forward, Nesterov: 9.3, 9.6, 11.3 ms; D=64 heavy not measured: the light D=64 space
    ("fwd", 2, True, 128): ((64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3)),
    ("fwd", 2, True, 64): ((128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)),
    # dq kernel (fwd+bwd ms with the other kernels shipped): 108.0, 110.2, 111.1; D=64 winner
    ("dq", 2, False, 128): ((64, 64, 4, 2), (128, 32, 8, 3), (128, 64, 8, 2)),
    ("dq", 2, True, 128): ((64, 64, 4, 2), (128, 32, 8, 3)),
    ("dq", 2, False, 64): ((64, 128, 4, 2), (64, 64, 4, 2)),
    ("dq", 2, True, 64): ((64, 128, 4, 2), (64, 64, 4, 2)),
    # dK kernel: 108.3, 113.6 (heavy: the order reversed); D=64 winner
    ("dk", 2, False, 128): ((64, 128, 8, 2), (32, 128, 8, 3)),
    ("dk", 2, True, 128): ((32, 128, 8, 3), (64, 128, 8, 2)),
    ("dk", 2, False, 64): ((32, 128, 4, 2), (64, 128, 8, 2)),
    ("dk", 2, True, 64): ((32, 128, 4, 2), (64, 128, 8, 2)),
    # the one-kernel backward (FUSED_BACKWARD), never timed with reductions: the best tiles
    # swept with acq_rel atomics at f7d6df6 (D=128: 90.0 ms fwd+bwd; D=64: 38.2 ms) lead,
    # then the two-kernel query kernel's, then the one tile of a few tried that compiles for
    # sm_90 without spills (GD, no masks; the others spill 100-2160 bytes): for autotuning to
    # weigh, not a default
    ("dqk", 2, False, 128): ((128, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 8, 2)),
    ("dqk", 2, True, 128): ((128, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 8, 2)),
    ("dqk", 2, False, 64): ((128, 128, 8, 2), (64, 128, 4, 2), (128, 64, 4, 2), (128, 32, 8, 2)),
    ("dqk", 2, True, 64): ((128, 128, 8, 2), (64, 128, 4, 2), (128, 64, 4, 2), (128, 32, 8, 2)),
    # compile-time (never timed): D <= 32 and D = 256 in 16 bits, every float32 class
    ("fwd", 2, False, 32): ((128, 64, 8, 3),), ("fwd", 2, True, 32): ((128, 64, 8, 3),),
    ("dq", 2, False, 32): ((128, 64, 8, 3),), ("dq", 2, True, 32): ((128, 64, 8, 3),),
    ("dk", 2, False, 32): ((64, 64, 8, 3),), ("dk", 2, True, 32): ((64, 64, 8, 3),),
    ("fwd", 2, False, 256): ((32, 32, 8, 2),), ("fwd", 2, True, 256): ((32, 32, 8, 2),),
    ("dq", 2, False, 256): ((32, 32, 8, 2),), ("dq", 2, True, 256): ((32, 32, 8, 2),),
    ("dk", 2, False, 256): ((32, 32, 8, 2),), ("dk", 2, True, 256): ((32, 32, 8, 2),),
    ("fwd", 4, True, 32): ((64, 32, 8, 2),), ("fwd", 4, True, 64): ((64, 32, 8, 2),),
    ("fwd", 4, True, 128): ((32, 64, 8, 2),), ("fwd", 4, True, 256): ((32, 32, 8, 2),),
    ("dq", 4, True, 32): ((32, 64, 8, 2),), ("dq", 4, True, 64): ((32, 64, 8, 2),),
    ("dq", 4, True, 128): ((16, 32, 4, 2),), ("dq", 4, True, 256): ((16, 32, 4, 2),),
    ("dk", 4, True, 32): ((32, 32, 8, 2),), ("dk", 4, True, 64): ((32, 32, 8, 2),),
    ("dk", 4, True, 128): ((32, 32, 8, 2),), ("dk", 4, True, 256): ((16, 32, 4, 2),),
}

#: Short-memory path: streaming tiles whose short-path form was the one measured (the tiles
#: shipped at 7b1daef; D=64, N=8192, M=64 and 256, T=8: 17x and 2.4x the reference forward).
#: They lead that path's candidates, so its default is what was measured.
_SHORT_MEASURED = {("fwd", 2, False, 64): (128, 64, 8, 3), ("dq", 2, False, 64): (128, 32, 8, 3)}


def _space_key(kernel: str, itemsize: int, heavy: bool, block_d: int):
    """The ``_SPACE`` row of a call (float32 has one tier; head dims below 32 share 32's)."""
    return kernel, itemsize, heavy or itemsize == 4, max(block_d, 32)


def candidates(kernel: str, itemsize: int, heavy: bool, block_d: int, short: bool = False,
               block_m_all: int = 0) -> tuple:
    """The tile configurations autotuning picks from for one kernel and call class.

    ``kernel``: ``"fwd" | "dq" | "dk" | "dqk"`` (the one-kernel backward). On the short-memory
    path (``short``) ``BLOCK_M`` is
    ``block_m_all`` (every key, padded) and the query tile shrinks so that the logits tile
    ``BLOCK_N × BLOCK_M`` is no larger than the streaming candidate's.
    """
    if FORCE_TILES is not None and kernel in FORCE_TILES:
        space = (tuple(FORCE_TILES[kernel]),)
    else:
        key = _space_key(kernel, itemsize, heavy, block_d)
        if key not in _SPACE and kernel == "dqk":  # untimed classes: the query kernel's
            key = _space_key("dq", itemsize, heavy, block_d)
        space = _SPACE[key]
        if short and key in _SHORT_MEASURED:
            space = (_SHORT_MEASURED[key], *space)
    if not short:
        return space
    out = []
    for bn, bm, warps, stages in space:
        if FORCE_TILES is None or kernel not in FORCE_TILES:
            bn = max(16, min(bn, bn * bm // block_m_all))
        cfg = (bn, block_m_all, warps, stages)
        if cfg not in out:
            out.append(cfg)
    return tuple(out)


def _padded(n: int) -> int:
    """``n`` padded to a power of two, at least 16 (a tile dimension; plain Python: this runs
    on every call, and ``triton.next_power_of_2`` costs microseconds on the host)."""
    return max(16, 1 << (n - 1).bit_length())


def takes_short_path(M: int, D: int, dtype: torch.dtype, kernel: str = "fwd") -> bool:
    """Whether ``kernel`` (``"fwd" | "dq" | "dk" | "dqk"``) of a call with ``M`` keys of head
    dim ``D`` in ``dtype`` runs the short-memory path: every key of one (batch, head), padded to
    powers of two, is at most ``SHORT_MAX_KEYS`` keys and ``SHORT_MEMORY_BYTES`` bytes; the query
    kernel (and the one-kernel backward) also needs ``D >= DQ_SHORT_MIN_HEAD_DIM`` (padded); the
    key kernel always streams."""
    block_d, block_m_all = _padded(D), _padded(M)
    fits = (block_m_all <= SHORT_MAX_KEYS
            and block_m_all * block_d * dtype.itemsize <= SHORT_MEMORY_BYTES)
    return fits and (kernel == "fwd"
                     or kernel in ("dq", "dqk") and block_d >= DQ_SHORT_MIN_HEAD_DIM)


def short_path_keys(D: int, dtype: torch.dtype) -> int:
    """The most keys the short-memory path takes at head dim ``D`` in ``dtype`` (0: none)."""
    block_d = _padded(D)
    most = min(SHORT_MAX_KEYS, SHORT_MEMORY_BYTES // (block_d * dtype.itemsize))
    return 1 << (most.bit_length() - 1) if most >= 16 else 0


def _bucket(n: int) -> int:
    """Length bucket of the autotuning key: one tuning per 4x range of N (or M)."""
    b = 256
    while b < n and b < 65536:
        b *= 4
    return b


def _config(kernel: str, N: int, M: int, D: int, dtype: torch.dtype, heavy: bool) -> dict:
    """Default tiles of ``kernel`` (first candidate), its candidates, and the autotuning key
    arguments (``SHORT`` for the query kernels; ``NB``/``MB`` length buckets)."""
    block_d, block_m_all = _padded(D), _padded(M)
    short = takes_short_path(M, D, dtype, kernel)
    space = candidates(kernel, dtype.itemsize, heavy, block_d, short, block_m_all)
    cfg = dict(zip(TILE_KEYS, space[0]), BLOCK_D=block_d)
    if kernel != "dk":
        cfg["SHORT"] = short
    keys = {"NB": _bucket(N), "MB": block_m_all if short else _bucket(M)}
    return cfg, space, keys


def _shared_memory_limit(device) -> int:
    """Bytes of shared memory one program may use on ``device`` (opt-in maximum)."""
    props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
    return props["max_shared_mem"]


def _prune(kernel: str):
    """``early_config_prune`` of ``kernel``'s autotuner: this call's candidates (see
    :func:`candidates`) minus those whose compiled program needs more shared memory than the
    device has, dropped before anything is benchmarked (compiling is cached, so the benchmark
    reuses these binaries)."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        q = args["Q"]
        heavy = bool(args["VELOCITY"] or args.get("ENERGIES") or args.get("EGRAD"))
        name = "dqk" if args.get("FUSED") else kernel
        space = candidates(name, q.dtype.itemsize, heavy, args["BLOCK_D"],
                           args.get("SHORT", False), args["MB"])
        limit = _shared_memory_limit(q.device)
        kept = []
        jit = _KERNELS[kernel]
        for bn, bm, warps, stages in space:
            cfg = triton.Config({"BLOCK_N": bn, "BLOCK_M": bm}, num_warps=warps,
                                num_stages=stages)
            try:
                compiled = jit.warmup(grid=(1,), **{**args, **COMPILE_OPTIONS},
                                      **cfg.all_kwargs())
            except Exception:  # noqa: BLE001 - a config the compiler rejects is not a candidate
                continue
            if compiled.metadata.shared <= limit:
                kept.append(cfg)
        return kept or [triton.Config(dict(zip(("BLOCK_N", "BLOCK_M"), space[0][:2])),
                                      num_warps=space[0][2], num_stages=space[0][3])]

    return prune


def _quick_bench(fn, quantiles):
    """Bounded autotuning cost: a short warm-up and ~25 ms of repetitions per candidate."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def _autotuner(kernel: str, reset_to_zero=None):
    """``triton.autotune`` over ``kernel``'s space, keyed on head dim, dtype (the tensors'
    dtypes are always part of Triton's key), tier, key path and length buckets."""
    jit = _KERNELS[kernel]
    names = (kernel, "dqk") if kernel == "dq" else (kernel,)  # "dqk": the fused form of dq
    space = sorted({c for k, v in _SPACE.items() if k[0] in names for c in v})
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_M": bm}, num_warps=w, num_stages=s)
               for bn, bm, w, s in space]
    key = [name for name in ("BLOCK_D", "SHORT", "VELOCITY", "NESTEROV", "ENERGIES", "EGRAD",
                             "CAUSAL", "KEEP_Y", "FUSED", "SPLIT", "NB", "MB")
           if name in jit.arg_names]
    return triton.autotune(configs=configs, key=key, prune_configs_by={
        "early_config_prune": _prune(kernel)}, reset_to_zero=reset_to_zero,
        do_bench=_quick_bench, cache_results=True)(jit)


_KERNELS = {"fwd": _fwd_kernel, "dq": _bwd_dq_kernel, "dk": _bwd_dk_kernel}
# The fused query kernel adds into DK / DBIAS (empty unless FUSED): zeroed before each timing.
_TUNERS = {_fwd_kernel: _autotuner("fwd"),
           _bwd_dq_kernel: _autotuner("dq", reset_to_zero=["DK", "DBIAS"]),
           _bwd_dk_kernel: _autotuner("dk")}


def _common(q, k, key_bias, pad, step_size, momentum, num_steps, is_causal, optimizer,
            energies, kernels):
    """Inputs made contiguous, the run-time arguments and flags the kernels share, and the tile
    configurations of ``kernels`` (``"fwd" | "dq" | "dk" | "dqk"``, see :func:`candidates`)."""
    B, H, N, D = q.shape
    Hk, M = k.shape[1], k.shape[2]
    # The interpreter runs CPU tensors; meta tensors are being planned for a GPU.
    interpret = _interpreting() and q.device.type == "cpu"
    flags = dict(
        T=num_steps, VELOCITY=optimizer != "gd", NESTEROV=optimizer == "nesterov",
        HAS_BIAS=key_bias is not None, HAS_PAD=pad is not None, CAUSAL=is_causal,
        # the interpreter mishandles bf16 dots: run them in float32
        UPCAST=interpret and q.dtype == torch.bfloat16,
        # float32 inputs get true float32 dots (not TF32), like the reference; 16-bit operands
        # (and the interpreter's upcast bf16) keep the default.
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )
    rho = momentum if optimizer != "gd" else 0.0
    nest = momentum if optimizer == "nesterov" else 0.0
    args = dict(
        Q=q.contiguous(), K=k.contiguous(),
        BIAS=key_bias.float().contiguous() if key_bias is not None else q,  # unread if absent
        PAD=pad.to(torch.uint8) if pad is not None else q,
        N=N, M=M, D=D, H=H, HK=Hk, mu_step=B * H * N * D, lse_step=B * H * N,
        eta=float(step_size), rho=float(rho), nest=float(nest),
    )
    heavy = optimizer != "gd" or energies
    configs = {kern: _config(kern, N, M, D, q.dtype, heavy) for kern in kernels}
    return args, flags, configs


def dk_parts(bhk: int, M: int, N: int, device: torch.device) -> int:
    """Into how many parts the dK kernel splits each key tile's queries.

    One program per (key tile, batch·key head) leaves most of the GPU idle when there are few
    keys (M <= 256 is one or two key tiles per head) and each program
    walks all N queries through T steps alone. Parts run in parallel and write partial sums,
    added on the host in a fixed order (bitwise repeatable). The count aims at
    ``DK_PROGRAMS_PER_SM`` programs per SM, assuming the space's largest key tile (128), and
    keeps at least 128 queries per part. Off CUDA: 1, unless ``DK_PARTS`` forces it.
    """
    if DK_PARTS is not None:
        return max(1, min(DK_PARTS, triton.cdiv(N, 16)))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    key_programs = bhk * triton.cdiv(M, 128)
    return max(1, min(triton.cdiv(N, 128), triton.cdiv(DK_PROGRAMS_PER_SM * sms, key_programs)))


def _launch(kernel, rows: int, bh: int, args: dict, flags: dict, config, parts: int = 1
            ) -> Launch:
    """A launch over ``(⌈rows / tile⌉, bh, parts)`` programs; the tile is BLOCK_N for the query
    kernels and BLOCK_M for the key kernel (whose queries are split into ``parts``)."""
    cfg, space, keys = config
    tile = "BLOCK_M" if kernel is _bwd_dk_kernel else "BLOCK_N"
    args = {name: value for name, value in {**args, **keys}.items() if name in kernel.arg_names}

    def grid(meta):
        return triton.cdiv(rows, meta[tile]), bh, parts

    return Launch(kernel, grid, args, dict(flags, **cfg), space)


def plan_forward(q, k, key_bias, pad, scale, step_size, momentum, num_steps, is_causal,
                 optimizer, return_energies, save):
    """The forward launch and its outputs ``(ξ_T, energies, μ_t, lse_t, energy lse_t)``."""
    B, H, N, D = q.shape
    T = num_steps
    args, flags, configs = _common(q, k, key_bias, pad, step_size, momentum, num_steps,
                                   is_causal, optimizer, return_energies, ("fwd",))
    f32 = {"device": q.device, "dtype": torch.float32}
    out = torch.empty(B, H, N, D, device=q.device, dtype=q.dtype)
    mu = torch.empty(T if save else 0, B * H, N, D, **f32)
    lse = torch.empty(T if save else 0, B * H, N, **f32)
    energy = torch.empty(B * H if return_energies else 0, N, T + 1, **f32)
    energy_lse = torch.empty(T + 1 if save and return_energies else 0, B * H, N, **f32)
    launch = _launch(
        _fwd_kernel, N, B * H,
        dict(args, OUT=out, MU=mu, LSE=lse, ENERGY=energy, ELSE=energy_lse,
             scale2=scale * LOG2E_F, inv_scale=1.0 / scale),
        dict(flags, SAVE=save, ENERGIES=return_energies), configs["fwd"])
    return launch, (out, energy.view(-1, H, N, T + 1), mu, lse, energy_lse)


def fused_backward_mode(q: torch.Tensor) -> int:
    """The ``FUSED`` constexpr of a backward for ``q`` under ``FUSED_BACKWARD``: 0 (two kernels),
    1 (one kernel, relaxed reductions) or 2 (one kernel, TMA reduce-add: CUDA sm_90+ or a meta
    tensor planned for it, and rows of 16-byte multiples, D % 4 == 0). Under
    ``torch.use_deterministic_algorithms(True)`` always 0: the two kernels compute the same
    gradients in a fixed order, so the user's request for repeatable runs costs speed only."""
    mode = FUSED_BACKWARD
    if mode is not None and mode not in ("red", "tma"):
        raise ValueError(f"FUSED_BACKWARD must be None, 'red' or 'tma', got {mode!r}")
    if mode is None or torch.are_deterministic_algorithms_enabled():
        return 0
    D = q.shape[-1]
    tma = mode == "tma" and D % 4 == 0 and (
        q.device.type == "meta"
        or q.is_cuda and not _interpreting() and torch.cuda.get_device_capability(q.device)[0] >= 9)
    return 2 if tma else 1


def _scratch(size: int, alignment: int, stream):
    """Global scratch for device-side tensor descriptors (the TMA reduce-add's), on the current
    device (the launches run under :func:`_on_device`)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


@contextlib.contextmanager
def _tma_scratch():
    """Device-side TMA descriptors need a Triton allocator for their scratch: lend one for the
    launches inside, unless the caller has set their own; Triton's setting is restored after
    (a context variable: nothing global is left behind)."""
    from triton.runtime import _allocation

    if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        yield
        return
    token = _allocation._allocator.set(_scratch)
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


def plan_backward(dout, denergy, q, k, key_bias, pad, mu, lse, energy_lse, scale, step_size,
                  momentum, num_steps, is_causal, optimizer):
    """The backward launches (query kernel, then key kernel; or the one fused query kernel, see
    ``FUSED_BACKWARD``) and ``(dq, dk, d key_bias)`` in float32: ``dk`` and ``d key_bias`` with a
    leading dimension of the key kernel's query parts (:func:`dk_parts`; 1 when fused), to be
    summed; ``d key_bias`` empty without a bias."""
    B, H, N, D = q.shape
    Hk, M = k.shape[1], k.shape[2]
    T = num_steps
    egrad = denergy is not None
    fused = fused_backward_mode(q)
    args, flags, configs = _common(q, k, key_bias, pad, step_size, momentum, num_steps,
                                   is_causal, optimizer, egrad, ("dqk",) if fused else ("dq", "dk"))
    f32 = {"device": q.device, "dtype": torch.float32}
    none = torch.empty(0, **f32)
    dq = torch.empty(B, H, N, D, **f32)
    if fused:  # the query kernel adds every key tile's terms into these
        dmu = delta = y = none
        parts = 1
        dk = torch.zeros(1, B, Hk, M, D, **f32)
        dbias = torch.zeros(1, B, Hk, M, **f32) if key_bias is not None else none
        keep_y = False
    else:
        # dμ_t only feeds the key kernel's dots, which take it in the input dtype: store it so.
        dmu = torch.empty(T, B * H, N, D, device=q.device, dtype=q.dtype)
        delta = torch.empty(T, B * H, N, **f32)
        # The read-out points ŷ_t for the key kernel, written by the query kernel (a transient
        # T·N·D buffer in the input dtype); Nesterov with energies needs ξ_t as well: it
        # replays the iterates from q and μ_t instead.
        keep_y = not (optimizer == "nesterov" and egrad)
        y = torch.empty(T + egrad if keep_y else 0, B * H, N, D, device=q.device,
                        dtype=q.dtype)
        parts = dk_parts(B * Hk, M, N, q.device)
        dk = torch.empty(parts, B, Hk, M, D, **f32)
        dbias = torch.empty(parts, B, Hk, M, **f32) if key_bias is not None else none
    args.update(MU=mu, LSE=lse, ELSE=energy_lse,
                DENERGY=denergy.float().contiguous() if egrad else args["Q"],
                DMU=dmu, DELTA=delta, Y=y, scale2=scale * LOG2E_F, scale=scale,
                part_step=B * Hk * M * D)
    flags.update(EGRAD=egrad, KEEP_Y=keep_y)
    query = _launch(_bwd_dq_kernel, N, B * H,
                    dict(args, DOUT=dout.contiguous(), DQ=dq,
                         DK=dk if fused else none, DBIAS=dbias if fused else none),
                    dict(flags, FUSED=fused), configs["dqk" if fused else "dq"])
    if fused:
        return (query,), (dq, dk, dbias)
    key = _launch(_bwd_dk_kernel, M, B * Hk, dict(args, DK=dk, DBIAS=dbias),
                  dict(flags, SPLIT=parts > 1), configs["dk"], parts)
    return (query, key), (dq, dk, dbias)


def _on_device(t: torch.Tensor):
    """Triton launches (and autotunes, and allocates its scratch) on the *current* CUDA device:
    make that ``t``'s for the launches (a layer on ``cuda:1`` while ``cuda:0`` is current)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _forward(*inputs):
    launch, outputs = plan_forward(*inputs)
    launch()
    return outputs


def _backward(dout, denergy, q, k, key_bias, *rest):
    launches, (dq, dk, dbias) = plan_backward(dout, denergy, q, k, key_bias, *rest)
    for launch in launches:
        launch()
    dk = dk[0] if dk.shape[0] == 1 else dk.sum(0)  # the key kernel's query parts
    if key_bias is not None:
        dbias = (dbias[0] if dbias.shape[0] == 1 else dbias.sum(0)).to(key_bias.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dbias


# --------------------------------------------------------------------------------------------
# torch.library ops (so torch.compile traces through them) and autograd
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("energy_attn::hopfield_descent_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, key_bias: torch.Tensor | None,
            pad: torch.Tensor | None, scale: float, step_size: float, momentum: float,
            num_steps: int, is_causal: bool, optimizer: str, return_energies: bool,
            save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                 torch.Tensor]:
    """``(ξ_T, energies, μ_t, lse_t, energy lse_t)``; empty tensors for what is not needed
    (``save=False``: nothing for backward; the energy lse only with ``return_energies``)."""
    return _forward(q, k, key_bias, pad, scale, step_size, momentum, num_steps, is_causal,
                    optimizer, return_energies, save)


@_fwd_op.register_fake
def _(q, k, key_bias, pad, scale, step_size, momentum, num_steps, is_causal, optimizer,
      return_energies, save):
    B, H, N, D = q.shape
    T = num_steps
    f32 = {"dtype": torch.float32}
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(B if return_energies else 0, H, N, T + 1, **f32),
            q.new_empty(T if save else 0, B * H, N, D, **f32),
            q.new_empty(T if save else 0, B * H, N, **f32),
            q.new_empty(T + 1 if save and return_energies else 0, B * H, N, **f32))


@torch.library.custom_op("energy_attn::hopfield_descent_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, denergy: torch.Tensor | None, q: torch.Tensor,
            k: torch.Tensor, key_bias: torch.Tensor | None, pad: torch.Tensor | None,
            mu: torch.Tensor, lse: torch.Tensor, energy_lse: torch.Tensor, scale: float,
            step_size: float, momentum: float, num_steps: int, is_causal: bool,
            optimizer: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, d key_bias)``; ``d key_bias`` is empty when there is no bias."""
    return _backward(dout, denergy, q, k, key_bias, pad, mu, lse, energy_lse, scale, step_size,
                     momentum, num_steps, is_causal, optimizer)


@_bwd_op.register_fake
def _(dout, denergy, q, k, key_bias, pad, mu, lse, energy_lse, scale, step_size, momentum,
      num_steps, is_causal, optimizer):
    dbias = (torch.empty_like(key_bias, memory_format=torch.contiguous_format)
             if key_bias is not None else q.new_empty(0, dtype=torch.float32))
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format), dbias)


def _setup_context(ctx, inputs, output):
    q, k, key_bias, pad, scale, step_size, momentum, num_steps, is_causal, optimizer, *_ = inputs
    _, energy, mu, lse, energy_lse = output
    ctx.save_for_backward(q, k, key_bias, pad, mu, lse, energy_lse)
    ctx.hyper = (scale, step_size, momentum, num_steps, is_causal, optimizer)
    ctx.with_energies = energy.numel() > 0
    ctx.mark_non_differentiable(mu, lse, energy_lse)
    ctx.set_materialize_grads(False)


def _backward_rule(ctx, dout, denergy, *_):
    q, k, key_bias, pad, mu, lse, energy_lse = ctx.saved_tensors
    if mu.shape[0] != ctx.hyper[3]:
        raise RuntimeError("hopfield_descent_fwd ran with save=False; it cannot backward")
    if dout is None:
        dout = torch.zeros_like(q)
    if not ctx.with_energies:
        denergy = None
    dq, dk, dbias = _bwd_op(dout, denergy, q, k, key_bias, pad, mu, lse, energy_lse,
                            *ctx.hyper)
    return dq, dk, (dbias if key_bias is not None else None), None, *([None] * 8)


_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public entry points (called by energy_attn.ops.hopfield)
# --------------------------------------------------------------------------------------------


def _key_padding(mask, B: int, M: int):
    """A mask broadcastable as ``[B, 1, 1, M]`` -> a contiguous ``[B, M]`` bool tensor."""
    from energy_attn.masks import key_padding  # noqa: PLC0415  (the one owner of masks)

    return key_padding(mask, B, M)


def unsupported_reason(q, k, *, mask=None, is_causal=False, key_bias=None, optimizer="gd",
                       num_steps=1):
    """Why the kernel cannot run this (validated) call, or ``None`` when it can.

    Args mirror :func:`energy_attn.hopfield_descent` (``q [B,H,N,D]``, ``k [B,Hk,M,D]``, ...).
    """
    if optimizer not in OPTIMIZERS:
        return f"optimizer={optimizer!r} (the kernel runs {', '.join(OPTIMIZERS)})"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (the kernel takes float32, float16 and bfloat16)"
    D = q.shape[-1]
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        return f"head dim D={D} (the kernel takes {MIN_HEAD_DIM} <= D <= {MAX_HEAD_DIM})"
    if q.shape[2] == 0 or k.shape[2] == 0 or q.shape[0] == 0:
        return "empty inputs"
    from energy_attn.masks import is_key_padding  # noqa: PLC0415  (the one owner of masks)

    if not is_key_padding(mask):
        return (f"a mask of shape {tuple(mask.shape)} (the kernel takes key-padding masks "
                "broadcastable as [B, 1, 1, M]; combine with is_causal for causal)")
    if not q.is_cuda and not _interpreting():
        return (f"tensors on {q.device} (the kernel needs CUDA tensors, or TRITON_INTERPRET=1 "
                "for the interpreter)")
    return None


def hopfield_descent_triton(q, k, scale, step_size, num_steps, mask, is_causal, key_bias,
                            optimizer, momentum, return_energies):
    """The fused kernel behind ``hopfield_descent(..., backend="triton")``.

    Same semantics as the reference backend (inputs already validated, ``scale`` resolved):
    returns ``ξ_T`` ``[B, H, N, D]`` in ``q.dtype``, or ``(ξ_T, energies [B, H, N, T+1]
    float32)``. Differentiable w.r.t. ``q``, ``k`` and ``key_bias`` (float32 inside the kernel,
    its gradient in its own dtype), through ``ξ_T`` and through the energies.
    """
    B, _, _, _ = q.shape
    M = k.shape[2]
    pad = _key_padding(mask, B, M)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, key_bias))
    out, energy, *_ = _fwd_op(q, k, key_bias, pad, float(scale), float(step_size),
                              float(momentum), int(num_steps), bool(is_causal), optimizer,
                              bool(return_energies), save)
    return (out, energy) if return_energies else out
