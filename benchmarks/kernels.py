"""T fused Hopfield descent steps: the Triton kernel vs the reference and the blog's path.

Providers (all through ``hopfield_descent``):
    triton     the fused kernel (``backend="triton"``)
    reference  one ``scaled_dot_product_attention`` per step under autograd
    autograd   the blog's path, ``torch.autograd.grad(E, ξ, create_graph=True)`` (it stores N×M
               matrices per step; skipped where its estimate does not fit in memory)

Modes: ``fwd`` (no autograd recording) and ``fwd+bwd`` (``out.backward(dout)`` w.r.t. q and k).
Effective TFLOP/s count ``4·N·M·D·T`` per head forward and 2.5x that backward (causal: half),
whatever a provider actually computes. Peak memory is ``torch.cuda.max_memory_allocated``
above the inputs.

    python benchmarks/kernels.py                 # the issue's grid, bf16 (needs a CUDA GPU)
    python benchmarks/kernels.py --quick         # a few sizes on the GPU
    python benchmarks/kernels.py --smoke         # tiny sizes; runs on CPU via the interpreter

Prints a markdown table and writes ``benchmarks/results/kernels-<tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the interpreter must be chosen before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from energy_attn import hopfield_descent

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when loaded by path
from _machine import machine_name  # noqa: E402

PROVIDERS = ("triton", "reference", "autograd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}




def grid(args):
    """(D, N, M, T, BH, causal) cases."""
    if args.smoke:
        return [(16, 64, 64, 2, 2, False), (16, 64, 64, 2, 2, True), (32, 48, 200, 1, 2, False)]
    if args.quick:
        return [(128, 2048, 2048, 4, 64, False), (64, 8192, 256, 8, 32, False)]
    cases = []
    for D in (64, 128):
        for N in (512, 2048, 8192, 32768):
            bh = max(16, 2**18 // N)  # about 256k query rows in flight: fills an H100
            for T in (1, 4, 8):
                cases.append((D, N, N, T, bh, False))
        cases.append((D, 4096, 4096, 4, 64, True))
    # The short-memory path: few stored patterns (Hopfield pooling / lookup).
    for M in (64, 256):
        cases.append((64, 8192, M, 8, 64, False))
    cases.append((128, 32768, 32768, 8, 16, False))  # the memory target
    return cases


def bench(fn, reps: int, device: str) -> float:
    """Median milliseconds of ``fn()``."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=reps * 10, return_mode="median")
    fn()  # warm-up (compiles/specialises)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def autograd_fits(D, N, M, T, bh, elem, device) -> bool:
    """The blog's path keeps about four N×M matrices per step (logits, softmax, their grads)."""
    need = 4 * T * bh * N * M * max(elem, 4)
    if device != "cuda":
        return need < 2**28
    free, _ = torch.cuda.mem_get_info()
    return need < 0.8 * free


def run_case(provider, mode, D, N, M, T, bh, causal, dtype, reps, device):
    torch.manual_seed(0)
    q = torch.randn(1, bh, N, D, device=device, dtype=dtype)
    k = torch.randn(1, bh, M, D, device=device, dtype=dtype)
    train = mode == "fwd+bwd"
    q.requires_grad_(train)
    k.requires_grad_(train)
    dout = torch.randn_like(q)
    kw = dict(num_steps=T, step_size=1.0, is_causal=causal, backend=provider)

    def fwd():
        with torch.no_grad():
            hopfield_descent(q, k, **kw)

    def fwd_bwd():
        out = hopfield_descent(q, k, **kw)
        torch.autograd.backward(out, dout)
        q.grad = k.grad = None

    fn = fwd_bwd if train else fwd
    peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    ms = bench(fn, reps, device)
    flops = 4 * N * M * D * T * bh * (0.5 if causal else 1.0) * (3.5 if train else 1.0)
    return {"ms": ms, "tflops": flops / ms / 1e9, "peak_gib": peak}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU interpreter is fine)")
    ap.add_argument("--quick", action="store_true", help="a few GPU sizes")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        ap.error("no CUDA GPU: only --smoke runs here (through the Triton interpreter)")
    dtype = DTYPES[args.dtype]
    if device == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32  # CPU SDPA and the interpreter are slow/odd in bf16; smoke only
    reps = args.reps or (2 if args.smoke else 20)
    providers = args.providers.split(",")

    rows = []
    for D, N, M, T, bh, causal in grid(args):
        for mode in ("fwd", "fwd+bwd"):
            for provider in providers:
                row = {"provider": provider, "mode": mode, "D": D, "N": N, "M": M, "T": T,
                       "BH": bh, "causal": causal, "dtype": str(dtype).removeprefix("torch.")}
                if provider == "autograd" and not autograd_fits(D, N, M, T, bh,
                                                                dtype.itemsize, device):
                    row.update(ms=None, tflops=None, peak_gib=None, note="does not fit")
                else:
                    try:
                        row.update(run_case(provider, mode, D, N, M, T, bh, causal, dtype,
                                            reps, device))
                    except torch.cuda.OutOfMemoryError:
                        row.update(ms=None, tflops=None, peak_gib=None, note="out of memory")
                        torch.cuda.empty_cache()
                rows.append(row)
                print(_fmt_row(row), flush=True)

    for r in rows:  # speed-up over the unrolled SDPA reference
        ref = next((x for x in rows if x["provider"] == "reference" and x["mode"] == r["mode"]
                    and (x["D"], x["N"], x["M"], x["T"], x["BH"], x["causal"])
                    == (r["D"], r["N"], r["M"], r["T"], r["BH"], r["causal"])), None)
        ok = ref is not None and ref.get("ms") and r.get("ms")
        r["speedup_vs_reference"] = ref["ms"] / r["ms"] if ok else None

    tag = "smoke-cpu" if args.smoke else torch.cuda.get_device_name(0).replace(" ", "-").lower()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine_name(), "torch": torch.__version__, "smoke": args.smoke,
            "note": ("Triton interpreter on a shared CPU: proves the script runs; these are "
                     "NOT kernel timings") if args.smoke else "GPU timings (do_bench medians)",
            "rows": rows}
    (out / f"kernels-{tag}.json").write_text(json.dumps(meta, indent=2))
    table = _table(rows)
    (out / f"kernels-{tag}.md").write_text(
        f"# Fused Hopfield descent kernels\n\nMachine: {meta['machine']}. {meta['note']}\n\n"
        + table + "\n")
    print("\n" + table)
    print(f"\nwrote {out / f'kernels-{tag}.json'} and .md ({meta['machine']})")


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _fmt_row(r):
    return (f"{r['provider']:>9} {r['mode']:>7} D={r['D']} N={r['N']} M={r['M']} T={r['T']} "
            f"BH={r['BH']} causal={r['causal']}: {_fmt(r.get('ms'), '.3f')} ms, "
            f"{_fmt(r.get('tflops'), '.3g')} TFLOP/s, peak {_fmt(r.get('peak_gib'), '.2f')} GiB"
            + (f" ({r['note']})" if r.get("note") else ""))


def _table(rows):
    head = ("| provider | mode | D | N | M | T | B·H | causal | ms | TFLOP/s | x ref | "
            "peak GiB |\n|" + "---|" * 12)
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['provider']} | {r['mode']} | {r['D']} | {r['N']} | {r['M']} | {r['T']} | "
            f"{r['BH']} | {r['causal']} | {_fmt(r.get('ms'), '.3f')} | "
            f"{_fmt(r.get('tflops'), '.3g')} | {_fmt(r.get('speedup_vs_reference'), '.2f')} | "
            f"{_fmt(r.get('peak_gib'), '.2f')} |" + (f" {r['note']}" if r.get("note") else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
