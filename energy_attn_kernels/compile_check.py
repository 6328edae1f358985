"""Compile the fused kernels for a GPU architecture without a GPU, and report their resources.

Triton compiles ahead of time for any target: the kernels go through Triton's GPU pipeline and
NVIDIA's ``ptxas`` (bundled with Triton) exactly as on a GPU, so this catches what the CPU
interpreter cannot (code the GPU compiler rejects, shared memory over the architecture's
limit) and reports what decides speed before anything runs: registers per thread, bytes
spilled to local memory, shared memory per program.

The launches compiled are the ones the dispatcher plans for real calls
(``plan_forward`` / ``plan_backward``, built from meta tensors), so the flags and argument
types are those a GPU would get; the tiles are each launch's default (the first autotuning
candidate: the measured winner where one exists), or with ``--space`` every candidate::

    python -m energy_attn.kernels.compile_check                   # sm_90, bf16, D = 64, 128
    python -m energy_attn.kernels.compile_check --arch 80 --dtype fp32 --head-dim 256
    python -m energy_attn.kernels.compile_check --space        # every autotuning candidate
    python -m energy_attn.kernels.compile_check --fused tma    # the one-kernel backward

It must run in a process without ``TRITON_INTERPRET=1`` (the interpreter replaces the compiled
kernels); :func:`main` refuses otherwise. Alignment is assumed as a GPU call would specialize
it: pointers 16-byte aligned, integer arguments divisible by 16 marked so.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import hopfield_descent as hd

__all__ = ["SHARED_MEMORY_LIMIT", "compile_launch", "markdown_table", "plans", "resource_report",
           "with_tiles"]

#: Shared memory one thread block may use (bytes, opt-in maximum) by compute capability.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                 torch.uint8: "u8"}


def _signature(launch: hd.Launch) -> tuple[dict, dict, dict]:
    """Triton's ``(signature, constexprs, attrs)`` for a planned launch."""
    fn = launch.kernel
    constexprs = {k: v for k, v in launch.meta.items() if k not in ("num_warps", "num_stages")}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = launch.args[name]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"argument {name}: cannot type {type(value).__name__}")
    return signature, constexprs, attrs


def compile_launch(launch: hd.Launch, arch: int = 90) -> dict[str, Any]:
    """Compile one planned launch for ``sm_<arch>``; its registers, spills and shared memory."""
    signature, constexprs, attrs = _signature(launch)
    source = ASTSource(launch.kernel, signature, constexprs, attrs)
    options = {"num_warps": launch.meta["num_warps"], "num_stages": launch.meta["num_stages"],
               **hd.COMPILE_OPTIONS}
    knobs = triton.knobs
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    # ptxas -v prints registers and spills; a cached kernel would print nothing
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                      options=options)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    if regs is None:
        raise RuntimeError(f"no ptxas report for {launch.kernel.__name__}:\n{text[-2000:]}")
    return {
        "kernel": launch.kernel.__name__,
        "arch": f"sm_{arch}",
        "registers": int(regs.group(1)),
        "spill_bytes": sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", text)),
        "shared_bytes": int(compiled.metadata.shared),
        "shared_limit": SHARED_MEMORY_LIMIT.get(arch),
        "num_warps": options["num_warps"],
        "num_stages": options["num_stages"],
        **{k: constexprs[k] for k in ("BLOCK_N", "BLOCK_M", "BLOCK_D")},
        "short": constexprs.get("SHORT"),
        "fused": constexprs.get("FUSED", 0),
    }


def plans(*, dtype=torch.bfloat16, head_dim=128, N=4096, M=4096, num_steps=4,
          optimizer="nesterov", key_bias=True, padding=True, is_causal=True, energies=True,
          short_keys=None, fused=None):
    """The launches (forward, dq, dk; or forward and the fused query kernel with ``fused``, a
    ``FUSED_BACKWARD`` mode) a differentiable call with these options plans.

    Defaults are the heaviest flag set (most live registers). ``short_keys`` overrides ``M``:
    ``True`` takes the most keys the short-memory path holds (its largest tile; none where it
    holds none), ``False`` a key count that streams.
    """
    if short_keys is not None:
        most = hd.short_path_keys(head_dim, dtype)
        M = most if short_keys else max(M, 2 * most)
    if is_causal:
        N = M
    meta = {"device": "meta"}
    B, H, Hk, D = 2, 4, 2, head_dim
    q = torch.empty(B, H, N, D, dtype=dtype, **meta)
    k = torch.empty(B, Hk, M, D, dtype=dtype, **meta)
    bias = torch.empty(B, Hk, M, dtype=dtype, **meta) if key_bias else None
    pad = torch.empty(B, M, dtype=torch.bool, **meta) if padding else None
    hyper = (0.125, 0.9, 0.5 if optimizer != "gd" else 0.0, num_steps, is_causal, optimizer)
    fwd, (_, _, mu, lse, energy_lse) = hd.plan_forward(q, k, bias, pad, *hyper, energies, True)
    denergy = torch.empty(B, H, N, num_steps + 1, **meta) if energies else None
    saved, hd.FUSED_BACKWARD = hd.FUSED_BACKWARD, fused
    try:
        bwd, _ = hd.plan_backward(torch.empty_like(q), denergy, q, k, bias, pad, mu, lse,
                                  energy_lse, *hyper)
    finally:
        hd.FUSED_BACKWARD = saved
    return [fwd, *bwd]


def with_tiles(launch: hd.Launch, tiles) -> hd.Launch:
    """``launch`` with another ``(BLOCK_N, BLOCK_M, num_warps, num_stages)``."""
    return launch._replace(meta={**launch.meta, **dict(zip(hd.TILE_KEYS, tiles))})


def resource_report(archs=(90,), dtypes=("bf16",), head_dims=(64, 128), light=False,
                    space=False, fused=None, masked=True):
    """Compile every kernel for each (arch, dtype, head dim, key path); one row each.

    ``space``: compile every autotuning candidate of each launch, not only its default (the
    first candidate, what runs without autotuning); rows say which is the default. ``fused``:
    plan the one-kernel backward (``FUSED_BACKWARD``; ``"tma"`` compiles as ``"red"`` below
    sm_90, which has no TMA). ``masked=False``: no key bias, padding or causal mask (the
    benchmarked target calls), where the default is all three.
    """
    rows = []
    flags = {"optimizer": "gd", "energies": False} if light else {}
    if not masked:
        flags.update(key_bias=False, padding=False, is_causal=False)
    for arch in archs:
        for dt in dtypes:
            for D in head_dims:
                for short in (False, True):
                    if short and not hd.short_path_keys(D, _DTYPES[dt]):
                        continue
                    mode = "red" if fused == "tma" and arch < 90 else fused
                    for launch in plans(dtype=_DTYPES[dt], head_dim=D, short_keys=short,
                                        fused=mode, **flags):
                        if short and not launch.meta.get("SHORT"):
                            continue  # no short path here: the streaming rows cover it
                        for i, tiles in enumerate(launch.candidates if space else
                                                  launch.candidates[:1]):
                            row = compile_launch(with_tiles(launch, tiles), arch)
                            row.update(dtype=dt, flags="light" if light else "heavy",
                                       default=i == 0, masked=masked)
                            rows.append(row)
    return rows


def markdown_table(rows, tier: bool = False) -> str:
    """A markdown table of :func:`resource_report` rows (with their flag tier if ``tier``)."""
    cols = ["arch", "dtype", "D", *(["flags"] if tier else []), "kernel", "path",
            "BLOCK_N×BLOCK_M", "warps", "stages", "registers", "spilled bytes", "shared KiB"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["arch"], r["dtype"], r["BLOCK_D"], *([r["flags"]] if tier else []),
                 r["kernel"] + (f" (FUSED={r['fused']})" if r.get("fused") else ""),
                 "short" if r["short"] else "stream",
                 f"{r['BLOCK_N']}×{r['BLOCK_M']}", r["num_warps"], r["num_stages"],
                 r["registers"], r["spill_bytes"], f"{r['shared_bytes'] / 1024:.1f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m energy_attn.kernels.compile_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90],
                   help="compute capabilities to compile for (default: 90)")
    p.add_argument("--dtype", nargs="+", default=["bf16"], choices=sorted(_DTYPES))
    p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    p.add_argument("--light", action="store_true",
                   help="GD without energies (masks and bias kept); the default compiles the "
                   "heaviest flag set (Nesterov, energies)")
    p.add_argument("--space", action="store_true",
                   help="compile every autotuning candidate, not only the default tiles")
    p.add_argument("--fused", choices=["red", "tma"],
                   help="plan the experimental one-kernel backward (FUSED_BACKWARD)")
    p.add_argument("--no-spills", action="store_true",
                   help="fail on register spills too (always fails on shared memory overruns)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if hd._interpreting():
        p.error("unset TRITON_INTERPRET: the interpreter replaces the compiled kernels")
    rows = resource_report(args.arch, args.dtype, args.head_dim, args.light, args.space,
                           args.fused)
    print(markdown_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"triton": triton.__version__, "rows": rows}, fh, indent=1)
    status = 0
    for r in rows:
        where = f"{r['kernel']} {r['arch']} {r['dtype']} D={r['BLOCK_D']}"
        if r["shared_limit"] is not None and r["shared_bytes"] > r["shared_limit"]:
            print(f"error: {where} needs {r['shared_bytes']} bytes of shared memory "
                  f"(limit {r['shared_limit']}): it cannot launch", file=sys.stderr)
            status = 1
        elif r["spill_bytes"]:
            print(f"{'error' if args.no_spills else 'note'}: {where} spills "
                  f"{r['spill_bytes']} bytes to local memory", file=sys.stderr)
            status = 1 if args.no_spills else status
    return status


if __name__ == "__main__":
    sys.exit(main())
