"""T fused Hopfield descent steps: the Triton kernel vs the reference and the blog's path.

Providers (the first four through ``hopfield_descent``):
    triton     the fused kernel (``backend="triton"``)
    reference  one ``scaled_dot_product_attention`` per step under autograd
    auto       ``backend="auto"`` (must never be much slower than the faster of the two; the
               target table names the backend it picked)
    autograd   the blog's path, ``torch.autograd.grad(E, ξ, create_graph=True)`` (it stores N×M
               matrices per step; skipped where its estimate does not fit in memory)
    flash×T    T chained ``F.scaled_dot_product_attention(x, k, k)``: the floor an unfused
               implementation reaches (``--providers flash``)

Modes: ``fwd`` (no autograd recording) and ``fwd+bwd`` (``out.backward(dout)`` w.r.t. q and k).
Effective TFLOP/s count ``4·N·M·D·T`` per head forward and 3.5x that forward+backward (the
FlashAttention convention; causal: half), whatever a provider actually computes. Peak memory
is ``torch.cuda.max_memory_allocated`` above the inputs.

    python benchmarks/kernels.py --target        # the issue's target table (GPU, bf16)
    python benchmarks/kernels.py                 # the full grid, bf16 (needs a CUDA GPU)
    python benchmarks/kernels.py --quick         # a few sizes on the GPU
    python benchmarks/kernels.py --tiles         # time every autotuning candidate, print winners
    python benchmarks/kernels.py --target --dtype fp16           # the table in another dtype
    python benchmarks/kernels.py --target --head-dims 32 96 256  # ... at other head dims
    python benchmarks/kernels.py --smoke         # tiny sizes; runs on CPU via the interpreter

Prints a markdown table and writes ``benchmarks/results/kernels-<tag>.json`` and ``.md``
(``--tiles``: ``kernel-tiles-<tag>.*``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # the interpreter must be chosen before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from energy_attn import hopfield_descent

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when loaded by path
from _machine import (  # noqa: E402
    gpu_script_args,
    median_ms,
    provenance,
    results_tag,
)

PROVIDERS = ("triton", "reference", "autograd")
TARGET_PROVIDERS = ("triton", "reference", "flash", "auto")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def target_grid(head_dims=None):
    """The issue's targets: bf16, D ∈ {64, 128}, N = M ∈ {2048, 8192}, T = 4 (B·H as measured
    on the H200: 128 at N = 2048, 32 at N = 8192), few keys (M = 64 on the short-memory path,
    M = 256 streaming), T = 8, and one causal case. ``head_dims``: the same cases at these head
    dims instead (what ``backend="auto"`` needs before it may run other head dims)."""
    cases = [(D, N, N, 4, 128 if N == 2048 else 32, False) for D in (64, 128)
             for N in (2048, 8192)]
    cases += [(64, 8192, M, 8, 64, False) for M in (64, 256)]
    cases.append((128, 2048, 2048, 4, 128, True))  # causal: does the forward's lead hold?
    if head_dims:
        cases = list(dict.fromkeys((D, *case[1:]) for case in cases for D in head_dims))
    return cases


def grid(args):
    """(D, N, M, T, BH, causal) cases."""
    if args.smoke:
        return [(16, 64, 64, 2, 2, False), (16, 64, 64, 2, 2, True), (32, 48, 200, 1, 2, False)]
    if args.target:
        return target_grid(args.head_dims)
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


def autograd_fits(D, N, M, T, bh, elem, device) -> bool:
    """The blog's path keeps about four N×M matrices per step (logits, softmax, their grads)."""
    need = 4 * T * bh * N * M * max(elem, 4)
    if device != "cuda":
        return need < 2**28
    free, _ = torch.cuda.mem_get_info()
    return need < 0.8 * free


def run_case(provider, mode, D, N, M, T, bh, causal, dtype, reps, device, optimizer="gd"):
    torch.manual_seed(0)
    q = torch.randn(1, bh, N, D, device=device, dtype=dtype)
    k = torch.randn(1, bh, M, D, device=device, dtype=dtype)
    train = mode == "fwd+bwd"
    q.requires_grad_(train)
    k.requires_grad_(train)
    dout = torch.randn_like(q)
    kw = dict(num_steps=T, step_size=1.0 if optimizer == "gd" else 0.8, is_causal=causal,
              backend=provider, optimizer=optimizer, momentum=0.0 if optimizer == "gd" else 0.5)

    def op(q, k):
        if provider == "flash":  # T chained SDPA calls: the unfused floor
            x = q
            for _ in range(T):
                x = F.scaled_dot_product_attention(x, k, k, is_causal=causal)
            return x
        return hopfield_descent(q, k, **kw)

    def fwd():
        with torch.no_grad():
            op(q, k)

    def fwd_bwd():
        out = op(q, k)
        torch.autograd.backward(out, dout)
        q.grad = k.grad = None

    fn = fwd_bwd if train else fwd
    peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn()  # the first call: compiling and (triton) autotuning a new shape class happen here
    if device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    first_s = time.perf_counter() - t0
    ms = median_ms(fn, reps, device)
    flops = 4 * N * M * D * T * bh * (0.5 if causal else 1.0) * (3.5 if train else 1.0)
    row = {"ms": ms, "tflops": flops / ms / 1e9, "peak_gib": peak, "first_call_s": first_s}
    if provider == "auto":
        row["auto_picked"] = auto_picks(q, k, T, causal, optimizer, train)
    return row


def auto_picks(q, k, T, causal, optimizer, train) -> str:
    """The backend ``backend="auto"`` runs for this call (``"triton"`` or ``"reference"``), so a
    table can tell a wrong pick from two timings of the same code path."""
    from energy_attn import masks  # noqa: PLC0415
    from energy_attn.ops.hopfield import _auto_backend  # noqa: PLC0415

    with torch.set_grad_enabled(train):
        return _auto_backend(q, k, masks.from_user("mask", None, is_causal=causal), None,
                             causal, optimizer, T, q.device.type)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few GPU sizes")
    ap.add_argument("--target", action="store_true",
                    help="the issue's target table: triton, reference, flash×T and auto")
    ap.add_argument("--tiles", action="store_true",
                    help="time every autotuning candidate of the target classes; print winners")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--head-dims", type=int, nargs="+",
                    help="with --target: its cases at these head dims instead of 64 and 128")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    args, device = gpu_script_args(ap, argv)
    dtype = DTYPES[args.dtype]
    if device == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32  # CPU SDPA and the interpreter are slow/odd in bf16; smoke only
    reps = args.reps or (2 if args.smoke else 20)
    providers = args.providers.split(",")
    if args.target and args.providers == ",".join(PROVIDERS):
        providers = list(TARGET_PROVIDERS)
    if args.tiles:
        return tile_sweep(args, dtype, reps, device)

    rows = []
    try:
        _run_grid(args, providers, dtype, reps, device, rows)
    except KeyboardInterrupt:  # Ctrl-C or ``timeout`` (SIGTERM): keep what was measured
        print(f"interrupted: writing the {len(rows)} rows measured so far", flush=True)
    _write(args, rows)


def _run_grid(args, providers, dtype, reps, device, rows):
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


def _write(args, rows):
    for r in rows:  # speed-up over the unrolled SDPA reference
        ref = next((x for x in rows if x["provider"] == "reference" and x["mode"] == r["mode"]
                    and (x["D"], x["N"], x["M"], x["T"], x["BH"], x["causal"])
                    == (r["D"], r["N"], r["M"], r["T"], r["BH"], r["causal"])), None)
        ok = ref is not None and ref.get("ms") and r.get("ms")
        r["speedup_vs_reference"] = ref["ms"] / r["ms"] if ok else None

    tag = _tag(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**provenance(), "smoke": args.smoke,
            "note": ("Triton interpreter on a shared CPU: proves the script runs; these are "
                     "NOT kernel timings") if args.smoke else "GPU timings (do_bench medians)",
            "rows": rows}
    (out / f"kernels-{tag}.json").write_text(json.dumps(meta, indent=2))
    table = _target_table(rows) if args.target else _table(rows)
    (out / f"kernels-{tag}.md").write_text(
        f"# Fused Hopfield descent kernels\n\nMachine: {meta['machine']}. {meta['note']}\n\n"
        + table + "\n")
    print("\n" + table)
    print(f"\nwrote {out / f'kernels-{tag}.json'} and .md ({meta['machine']})")


def _tag(args):
    """``<machine>[-target][-<dtype> unless bf16][-d<head dims> if given]``."""
    name = results_tag(args.smoke)
    if args.target:
        name += "-target"
    if args.dtype != "bf16" and not args.smoke:
        name += f"-{args.dtype}"
    if args.head_dims:
        name += "-d" + "-".join(map(str, args.head_dims))
    return name


#: Tiles the sweep times besides the autotuning candidates, (kernel, padded D) -> configs:
#: neighbours of the measured winners. A winner from here belongs in ``_SPACE``
#: (energy_attn_kernels/hopfield_descent.py).
EXPLORE = {
    ("dq", 128): ((128, 64, 8, 2), (128, 32, 4, 2)),
    ("dk", 128): ((64, 64, 4, 2), (64, 128, 4, 2)),
    ("dq", 64): ((128, 64, 4, 2), (64, 64, 4, 3)),
    ("dk", 64): ((64, 64, 4, 2), (64, 128, 4, 2)),
}


def tile_sweep(args, dtype, reps, device):
    """Time each autotuning candidate of each kernel (forced; the other kernels autotuned), and
    the ``EXPLORE`` tiles, on the target classes; print the winner per class. The JSON and
    table are rewritten after every class, so an interrupted sweep keeps what it measured."""
    from energy_attn.kernels import hopfield_descent as kmod  # noqa: PLC0415

    cases = ([(16, 64, 64, 2, 2, False)] if args.smoke else
             [(128, 8192, 8192, 4, 32, False), (64, 8192, 8192, 4, 32, False),
              (64, 8192, 256, 8, 64, False)])
    rows, winners = [], []
    saved, kmod.FORCE_TILES = kmod.FORCE_TILES, None
    try:
        for D, N, M, T, bh, causal in cases:
            block_d = max(16, 1 << (D - 1).bit_length())
            block_m_all = max(16, 1 << (M - 1).bit_length())
            for optimizer in ("gd", "nesterov"):
                heavy = optimizer != "gd"
                for kernel, mode in (("fwd", "fwd"), ("dq", "fwd+bwd"), ("dk", "fwd+bwd"),
                                     ("dqk", "fwd+bwd")):
                    on_short = kmod.takes_short_path(M, D, dtype, kernel)
                    space = kmod.candidates(kernel, dtype.itemsize, heavy, block_d, on_short,
                                            block_m_all)
                    if not on_short and not args.smoke:
                        space += tuple(c for c in EXPLORE.get((kernel, block_d), ())
                                       if c not in space)
                    best = None
                    for cfg in space:
                        row = _time_tiles(kmod, kernel, mode, cfg, optimizer, D, N, M, T, bh,
                                          causal, dtype, reps, device)
                        rows.append(row)
                        if row.get("ms") and (best is None or row["ms"] < best["ms"]):
                            best = row
                    if best is not None:
                        winners.append(best)
                    _write_tiles(args, rows, winners)
    except KeyboardInterrupt:
        print("interrupted: the classes swept so far are written", flush=True)
    finally:
        kmod.FORCE_TILES = saved
    print("\n" + _tiles_table(winners))
    return winners


def _time_tiles(kmod, kernel, mode, cfg, optimizer, D, N, M, T, bh, causal, dtype, reps,
                device):
    kmod.FORCE_TILES = {kernel: cfg}
    if kernel == "dqk":  # the experimental one-kernel backward, TMA form where it runs
        kmod.FUSED_BACKWARD = "tma"
    try:
        res = run_case("triton", mode, D, N, M, T, bh, causal, dtype, reps, device,
                       optimizer=optimizer)
    except Exception as e:  # noqa: BLE001 - a config that cannot launch (e.g. out of resources)
        res = {"ms": None, "note": f"{type(e).__name__}"}
    finally:
        kmod.FORCE_TILES = None
        kmod.FUSED_BACKWARD = None
    print(f"{kernel:>4} {optimizer:>8} D={D} N={N} M={M} tiles={cfg}: "
          f"{_fmt(res.get('ms'), '.3f')} ms", flush=True)
    return {"kernel": kernel, "mode": mode, "D": D, "N": N, "M": M, "T": T, "BH": bh,
            "optimizer": optimizer, "tiles": list(cfg), **res}


def _tiles_table(winners):
    table = ["| kernel | opt | D | N | M | T | winner (BLOCK_N, BLOCK_M, warps, stages) | ms |",
             "|---|---|---|---|---|---|---|---|"]
    table += [f"| {w['kernel']} | {w['optimizer']} | {w['D']} | {w['N']} | {w['M']} | "
              f"{w['T']} | {tuple(w['tiles'])} | {w['ms']:.3f} |" for w in winners]
    return "\n".join(table)


def _write_tiles(args, rows, winners):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = results_tag(args.smoke)
    meta = {**provenance(), "rows": rows, "winners": winners}
    (out / f"kernel-tiles-{tag}.json").write_text(json.dumps(meta, indent=2))
    (out / f"kernel-tiles-{tag}.md").write_text(
        f"# Tile sweep\n\nMachine: {meta['machine']}, commit {meta['commit']}.\n\n"
        f"{_tiles_table(winners)}\n")


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _fmt_row(r):
    return (f"{r['provider']:>9} {r['mode']:>7} D={r['D']} N={r['N']} M={r['M']} T={r['T']} "
            f"BH={r['BH']} causal={r['causal']}: {_fmt(r.get('ms'), '.3f')} ms, "
            f"{_fmt(r.get('tflops'), '.3g')} TFLOP/s, peak {_fmt(r.get('peak_gib'), '.2f')} GiB"
            + (f" ({r['note']})" if r.get("note") else ""))


def _target_table(rows):
    """Side by side per shape: ms of every provider, speed-ups, effective TFLOP/s."""
    def ms(provider, mode, case, field="ms"):
        r = next((x for x in rows if x["provider"] == provider and x["mode"] == mode
                  and _case(x) == case), None)
        return r.get(field) if r else None

    def ratio(a, b):
        return a / b if a and b else None

    head = ("| D | N | M | T | B·H | causal | mode | triton ms | reference ms | flash×T ms | "
            "auto ms | triton × ref | auto ÷ best | triton TFLOP/s | triton bwd TFLOP/s | "
            "triton first call s |")
    lines = [head, "|" + "---|" * 16]
    for case in dict.fromkeys(_case(r) for r in rows):
        D, N, M, T, bh, causal = case
        for mode in ("fwd", "fwd+bwd"):
            tr, ref = ms("triton", mode, case), ms("reference", mode, case)
            fl, au = ms("flash", mode, case), ms("auto", mode, case)
            picked = ms("auto", mode, case, "auto_picked")
            best = min((x for x in (tr, ref) if x), default=None)
            flops = 4 * N * M * D * T * bh * (0.5 if causal else 1.0)
            tf = flops * (3.5 if mode == "fwd+bwd" else 1.0) / tr / 1e9 if tr else None
            bwd = None
            if mode == "fwd+bwd" and tr and ms("triton", "fwd", case):
                bwd_ms = tr - ms("triton", "fwd", case)
                bwd = 2.5 * flops / bwd_ms / 1e9 if bwd_ms > 0 else None
            lines.append(
                f"| {D} | {N} | {M} | {T} | {bh} | {'yes' if causal else 'no'} | {mode} | "
                f"{_fmt(tr, '.3f')} | "
                f"{_fmt(ref, '.3f')} | {_fmt(fl, '.3f')} | {_fmt(au, '.3f')}"
                f"{f' ({picked})' if picked else ''} | "
                f"{_fmt(ratio(ref, tr), '.2f')} | {_fmt(ratio(au, best), '.2f')} | "
                f"{_fmt(tf, '.0f')} | {_fmt(bwd, '.0f')} | "
                f"{_fmt(ms('triton', mode, case, 'first_call_s'), '.1f')} |")
    return "\n".join(lines)


def _case(r):
    return r["D"], r["N"], r["M"], r["T"], r["BH"], r["causal"]


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


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, _interrupt)  # ``timeout`` ends a GPU session's run cleanly
    main()
