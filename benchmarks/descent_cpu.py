"""Forward+backward of T Hopfield descent steps on CPU: reference backend vs the blog's path.

The blog's path is autograd on the energy with ``create_graph=True`` (``backend="autograd"``),
which keeps several N×M matrices per step; the reference backend reads out with one
``scaled_dot_product_attention`` per step. Each provider runs in a fresh subprocess so its
peak resident memory (``ru_maxrss`` above the post-setup baseline) is its own.

    python benchmarks/descent_cpu.py            # B=2, H=8, N=M=1024, D=64, T=4, float32
    python benchmarks/descent_cpu.py --quick    # small sizes, a smoke run (writes only to --out)

Prints a table and writes ``benchmarks/results/descent_cpu.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys

from _machine import (  # this folder is on sys.path
    cpu_script_args,
    host_times_ms,
    machine_name,
    positive_int,
    run_child,
    write_results,
)

PROVIDERS = ("reference", "autograd")


def run_one(provider: str, B: int, H: int, N: int, D: int, T: int, repeats: int) -> dict:
    """Runs inside the child process: time and peak memory of forward+backward."""
    import torch

    from energy_attn import hopfield_descent
    from energy_attn._memory import saved_bytes

    torch.manual_seed(0)
    q = torch.randn(B, H, N, D, requires_grad=True)
    k = torch.randn(B, H, N, D, requires_grad=True)

    def step():
        out = hopfield_descent(q, k, num_steps=T, step_size=1.0, backend=provider)
        out.sum().backward()
        q.grad = k.grad = None

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = host_times_ms(step, repeats, warmup=0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    # Bytes autograd saves for backward (deterministic), counted on one more forward.
    _, saved = saved_bytes(lambda: hopfield_descent(q, k, num_steps=T, step_size=1.0,
                                                    backend=provider))
    return {
        "provider": provider,
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "peak_rss_mib": (peak - base) / 1024,  # ru_maxrss is KiB on Linux
        "saved_for_backward_mib": saved / 2**20,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--B", type=positive_int, default=2)
    p.add_argument("--H", type=positive_int, default=8)
    p.add_argument("--N", type=positive_int, default=1024, help="N = M")
    p.add_argument("--D", type=positive_int, default=64)
    p.add_argument("--T", type=positive_int, default=4)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = cpu_script_args(p, argv, "descent_cpu.json",
                           quick=dict(B=1, H=2, N=128, D=32, T=2, repeats=2))
    sizes = dict(B=args.B, H=args.H, N=args.N, D=args.D, T=args.T)
    if args.child:
        print(json.dumps(run_one(args.child, repeats=args.repeats, **sizes)))
        return 0

    rows = []
    for provider in PROVIDERS:
        cmd = [sys.executable, __file__, "--child", provider, "--repeats", str(args.repeats)]
        cmd += [f"--{k}={v}" for k, v in sizes.items()]
        rows.append(json.loads(run_child(cmd).strip().splitlines()[-1]))
    ref, blog = rows
    speedup = blog["median_ms"] / ref["median_ms"]
    mem_ratio = blog["peak_rss_mib"] / max(ref["peak_rss_mib"], 1e-9)
    print(f"hopfield_descent forward+backward, float32, CPU; {sizes}")
    print(f"machine: {machine_name()}")
    print(f"{'provider':<22}{'median ms':>12}{'min ms':>10}{'peak MiB':>11}{'saved MiB':>11}")
    for r in rows:
        name = "reference (SDPA)" if r["provider"] == "reference" else "blog autograd path"
        print(f"{name:<22}{r['median_ms']:>12.1f}{r['min_ms']:>10.1f}"
              f"{r['peak_rss_mib']:>11.1f}{r['saved_for_backward_mib']:>11.1f}")
    print(f"reference is {speedup:.2f}x faster and uses {mem_ratio:.1f}x less peak memory "
          f"({blog['saved_for_backward_mib'] / ref['saved_for_backward_mib']:.1f}x less saved "
          f"for backward)")
    write_results(args.out,
                  {"sizes": sizes, "dtype": "float32", "repeats": args.repeats, "rows": rows,
                   "speedup": speedup, "peak_memory_ratio": mem_ratio})
    return 0


if __name__ == "__main__":
    sys.exit(main())
