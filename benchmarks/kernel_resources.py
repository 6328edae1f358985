"""Registers, spills and shared memory of the fused kernels, compiled for GPUs without one.

Every kernel (forward, backward; streaming and short-memory key paths) is compiled through
Triton's GPU pipeline and ptxas for each architecture, dtype, head dim and flag tier, with the
default tiles (the first autotuning candidate: the measured winner where one exists;
``energy_attn.kernels.compile_check``). These are compile-time facts, not timings: tiles are
chosen by autotuning on the GPU. Needs no GPU; must run without ``TRITON_INTERPRET``.

    python benchmarks/kernel_resources.py            # sm_80 and sm_90; bf16 and fp32; D 64, 128
    python benchmarks/kernel_resources.py --quick    # sm_90, bf16, D = 128

A second table compiles the benchmarked target calls (sm_90, bf16, GD, no masks) with the
two-kernel backward and both forms of the one-kernel backward (``FUSED_BACKWARD``).

Prints a markdown table and writes ``benchmarks/results/kernel_resources.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import triton
from energy_attn.kernels.compile_check import markdown_table, resource_report
from energy_attn.kernels.hopfield_descent import _interpreting

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when loaded by path
from _machine import machine_name, provenance  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    if _interpreting():
        p.error("unset TRITON_INTERPRET: the interpreter replaces the compiled kernels")
    archs, dtypes, dims = ((90,), ("bf16",), (128,)) if args.quick else (
        (90, 80), ("bf16", "fp32"), (64, 128))
    start = time.perf_counter()
    rows = []
    for light in (True, False):
        rows += resource_report(archs, dtypes, dims, light=light)
    # the benchmarked target calls (GD, no masks) on sm_90, with each backward form
    target = [r for fused in (None, "red", "tma")
              for r in resource_report((90,), ("bf16",), dims, light=True, fused=fused,
                                       masked=False)
              if fused is None or r["kernel"] != "_fwd_kernel"]
    table = (markdown_table(rows, tier=True) + "\n\nThe benchmarked target calls (sm_90, bf16, "
             "GD without energies and without masks), two-kernel and one-kernel backward:\n\n"
             + markdown_table(target))
    header = (f"Compiled on {machine_name()} (no GPU) with Triton {triton.__version__}, "
              f"{time.perf_counter() - start:.0f} s. light = GD without energies; heavy = "
              "Nesterov with energies (both with key bias, padding and causal masks).\n")
    print(header)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "kernel_resources-quick" if args.quick else "kernel_resources"
    (out / f"{name}.json").write_text(json.dumps({**provenance(), "rows": rows,
                                                    "target_rows": target}, indent=1))
    (out / f"{name}.md").write_text(header + "\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
