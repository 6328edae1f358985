"""Where the fused descent's time goes: each kernel launch timed alone, and the variants that
decide how the kernels are built.

For each case (bf16, GD) it times the forward launch (saving for backward), the backward's
query kernel (dq: the reverse chain) and its key kernel (dk, with the host-side sum of its
query parts), each autotuned as users get it, under these variants:

    default     as shipped
    dq-short    the query kernel on the short-memory path wherever the forward takes it
                (``DQ_SHORT_MIN_HEAD_DIM = 0``)
    streaming   the streaming path where the short-memory path would run
                (``SHORT_MAX_KEYS = 0``)
    parts=P     the dK kernel's queries split into P parts (``DK_PARTS``); ``default`` is
                ``dk_parts``' rule
    fused-red   the experimental one-kernel backward (``FUSED_BACKWARD = "red"``: relaxed
                float32 reductions of dK); its time is in the dq column (with zeroing dK)
    fused-tma   the same with one TMA bulk reduce-add per key tile (sm_90+)

    python benchmarks/kernel_breakdown.py            # the cases below (needs a CUDA GPU)
    python benchmarks/kernel_breakdown.py --smoke    # tiny sizes; CPU via the interpreter

Prints a markdown table and writes ``benchmarks/results/kernel-breakdown-<tag>.json``/``.md``
(rewritten after every case, so an interrupted run keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when loaded by path
from _machine import (  # noqa: E402
    gpu_script_args,
    median_ms,
    provenance,
    results_tag,
)

#: (D, N, M, T, B·H, causal, variants): the issue's target shapes.
CASES = [
    (64, 8192, 64, 8, 64, False, ("default", "dq-short", "streaming", "parts=8", "parts=64")),
    (64, 8192, 128, 8, 64, False, ("default", "dq-short", "streaming")),
    (128, 8192, 64, 8, 64, False, ("default", "dq-short", "streaming")),
    (64, 8192, 256, 8, 64, False, ("default", "parts=8", "parts=32", "parts=64")),
    (128, 8192, 8192, 4, 32, False, ("default", "parts=1", "fused-red", "fused-tma")),
    (64, 8192, 8192, 4, 32, False, ("default", "fused-red", "fused-tma")),
    (64, 2048, 2048, 4, 128, False, ("default", "parts=1", "fused-red", "fused-tma")),
    (128, 2048, 2048, 4, 128, False, ("default", "fused-red", "fused-tma")),
]
SMOKE = [(16, 64, 40, 2, 2, False, ("default", "dq-short", "parts=2", "streaming", "fused-red")),
         (16, 64, 64, 2, 2, True, ("default", "fused-tma"))]


class _Variant:
    """Sets the kernel module's knobs for one variant, restores them after."""

    def __init__(self, kmod, name):
        self.kmod, self.name = kmod, name

    def __enter__(self):
        k = self.kmod
        self.saved = (k.DQ_SHORT_MIN_HEAD_DIM, k.DK_PARTS, k.SHORT_MAX_KEYS, k.FUSED_BACKWARD)
        if self.name == "dq-short":
            k.DQ_SHORT_MIN_HEAD_DIM = 0
        elif self.name.startswith("parts="):
            k.DK_PARTS = int(self.name.split("=")[1])
        elif self.name == "streaming":
            k.SHORT_MAX_KEYS = 0
        elif self.name.startswith("fused-"):
            k.FUSED_BACKWARD = self.name.removeprefix("fused-")
        return self

    def __exit__(self, *exc):
        k = self.kmod
        k.DQ_SHORT_MIN_HEAD_DIM, k.DK_PARTS, k.SHORT_MAX_KEYS, k.FUSED_BACKWARD = self.saved


def _best(kmod, kernel) -> str:
    """The tiles autotuning picked for the last launch of ``kernel`` ("" if not autotuned)."""
    cfg = getattr(kmod._TUNERS.get(kernel), "best_config", None)
    if cfg is None:
        return ""
    kw = cfg.kwargs
    return f"{kw.get('BLOCK_N')}x{kw.get('BLOCK_M')}/{cfg.num_warps}w{cfg.num_stages}s"


def time_case(kmod, D, N, M, T, bh, causal, variant, reps, device):
    torch.manual_seed(0)
    q = torch.randn(1, bh, N, D, device=device, dtype=torch.bfloat16)
    k = (0.5 * torch.randn(1, bh, M, D, device=device)).to(torch.bfloat16)
    hyper = (D ** -0.5, 1.0, 0.0, T, causal, "gd")
    with _Variant(kmod, variant):
        fwd, (_, _, mu, lse, else_) = kmod.plan_forward(q, k, None, None, *hyper, False, True)
        fwd()
        dout = torch.randn_like(q)
        launches, (_, dk_parts, _) = kmod.plan_backward(
            dout, None, q, k, None, None, mu, lse, else_, *hyper)
        dq_launch = launches[0]
        fused = dq_launch.meta["FUSED"]

        def dq_all():  # fused: the whole backward, zeroing the dK it adds into included
            if fused:
                dk_parts.zero_()
            dq_launch()

        def dk_and_sum():
            launches[1]()
            if dk_parts.shape[0] > 1:
                dk_parts.sum(0)

        times, tiles = {"dk": 0.0}, {"dk": ""}
        for name, fn, kern in (("fwd", fwd, kmod._fwd_kernel),
                               ("dq", dq_all, kmod._bwd_dq_kernel),
                               ("dk", dk_and_sum, kmod._bwd_dk_kernel))[:3 - bool(fused)]:
            fn()  # compile and autotune outside the timing
            tiles[name] = _best(kmod, kern)
            times[name] = median_ms(fn, reps, device)
        parts = dk_parts.shape[0]
        paths = {name: "short" if launch.meta.get("SHORT") else "stream"
                 for name, launch in (("fwd", fwd), ("dq", dq_launch))}
    flop = 4 * N * M * D * T * bh * (0.5 if causal else 1.0)
    return {"D": D, "N": N, "M": M, "T": T, "BH": bh, "causal": causal, "variant": variant,
            "paths": paths, "dk_parts": parts, "fused": fused,
            **{f"{n}_ms": t for n, t in times.items()},
            "bwd_ms": times["dq"] + times["dk"],
            "fwd_tflops": flop / times["fwd"] / 1e9,
            "bwd_tflops": 2.5 * flop / (times["dq"] + times["dk"]) / 1e9,
            "tiles": tiles}


def _table(rows) -> str:
    head = ("| D | N | M | T | B·H | causal | variant | fwd / dq path | dk parts | fwd ms | dq ms "
            "| dk ms "
            "| bwd ms | fwd TFLOP/s | bwd TFLOP/s | tiles fwd / dq / dk |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        t = r["tiles"]
        lines.append(
            f"| {r['D']} | {r['N']} | {r['M']} | {r['T']} | {r['BH']} | "
            f"{'yes' if r['causal'] else 'no'} | {r['variant']} | "
            f"{r['paths']['fwd']} / {r['paths']['dq']} | {r['dk_parts']} | "
            f"{r['fwd_ms']:.3f} | {r['dq_ms']:.3f} | {r['dk_ms']:.3f} | {r['bwd_ms']:.3f} | "
            f"{r['fwd_tflops']:.0f} | {r['bwd_tflops']:.0f} | "
            f"{t['fwd'] or '-'} / {t['dq'] or '-'} / {t['dk'] or '-'} |")
    return "\n".join(lines)


def _write(args, rows):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = results_tag(args.smoke)
    meta = {**provenance(), "rows": rows}
    (out / f"kernel-breakdown-{tag}.json").write_text(json.dumps(meta, indent=2))
    (out / f"kernel-breakdown-{tag}.md").write_text(
        f"# Kernel breakdown\n\nMachine: {meta['machine']}, commit {meta['commit']}, torch "
        f"{meta['torch']}, Triton {meta['triton']}. bf16, GD, median ms per launch.\n\n"
        f"{_table(rows)}\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args, device = gpu_script_args(ap, argv)
    from energy_attn.kernels import hopfield_descent as kmod  # noqa: PLC0415

    reps = args.reps or (1 if args.smoke else 10)
    rows = []
    try:
        for D, N, M, T, bh, causal, variants in (SMOKE if args.smoke else CASES):
            for variant in variants:
                row = time_case(kmod, D, N, M, T, bh, causal, variant, reps, device)
                rows.append(row)
                print(_table([row]).splitlines()[-1], flush=True)
            _write(args, rows)
    except KeyboardInterrupt:
        print("interrupted: the cases measured so far are written", flush=True)
    print("\n" + _table(rows))
    _write(args, rows)
    return rows


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `timeout` keeps partial results
    main()
