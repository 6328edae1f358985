"""Memory and time of T Hopfield descent steps: unrolled vs fixed point (implicit backward).

``solver="unrolled"`` differentiates through the T steps, so autograd keeps every step's
activations: memory grows linearly in T. ``solver="fixed_point"`` runs the T iterations without
a graph and solves the adjoint fixed point in backward (energy_attn.fixed_point): it keeps only
``ξ*`` and the keys, whatever T. Each (solver, T) runs in a fresh subprocess so its peak memory
is its own: peak RSS above the post-setup baseline on CPU, ``torch.cuda.max_memory_allocated``
on CUDA, and the bytes autograd saves for backward (deterministic, both devices).

    python benchmarks/fixed_point_memory.py                  # B=2, H=4, N=M=512, D=64, T=1..64
    python benchmarks/fixed_point_memory.py --device cuda
    python benchmarks/fixed_point_memory.py --quick          # a smoke run (writes only to --out)

Prints a table and writes ``benchmarks/results/fixed_point_memory[_cuda].json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys

from _machine import (  # this folder is on sys.path
    cpu_script_args,
    device_arg,
    host_times_ms,
    machine_name,
    positive_int,
    run_child,
    write_results,
)

SOLVERS = ("unrolled", "fixed_point")


def run_one(solver: str, T: int, B: int, H: int, N: int, D: int, repeats: int,
            device: str) -> dict:
    """Runs inside the child process: time and peak memory of forward+backward."""
    import torch

    from energy_attn import hopfield_descent
    from energy_attn._memory import saved_bytes

    torch.manual_seed(0)
    # keys of norm ~1 and β = 1: a contractive regime where both solvers converge
    q = torch.randn(B, H, N, D, device=device, requires_grad=True)
    k = (torch.randn(B, H, N, D, device=device) / D**0.5).requires_grad_()

    cuda = device.startswith("cuda")

    def step():
        out = hopfield_descent(q, k, scale=1.0, num_steps=T, solver=solver, backend="reference")
        out.sum().backward()
        q.grad = k.grad = None
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        step()  # warm-up (allocator, kernels)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        # ru_maxrss is a high-water mark (KiB on Linux): take the baseline before any step
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step()  # warm-up
    times = host_times_ms(step, repeats, warmup=0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base

    out, saved = saved_bytes(lambda: hopfield_descent(q, k, scale=1.0, num_steps=T,
                                                      solver=solver, backend="reference"))
    with torch.no_grad():  # distance from a fixed point ξ = softmax(β ξ Kᵀ) K, for both solvers
        from energy_attn.fixed_point import _hopfield_readout
        from energy_attn.masks import Masks

        res = (_hopfield_readout(out, k, 1.0, Masks()) - out).norm(dim=-1).max().item()
    return {
        "solver": solver,
        "T": T,
        "median_ms": statistics.median(times),
        "peak_mib": peak / 2**20,
        "peak_kind": "cuda max_memory_allocated" if cuda else "peak RSS (coarse)",
        "saved_for_backward_mib": saved / 2**20,
        "max_residual": res,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--B", type=positive_int, default=2)
    p.add_argument("--H", type=positive_int, default=4)
    p.add_argument("--N", type=positive_int, default=512, help="N = M")
    p.add_argument("--D", type=positive_int, default=64)
    p.add_argument("--T", type=positive_int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--device", type=device_arg, default="cpu")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = cpu_script_args(p, argv, lambda a: f"fixed_point_memory{_suffix(a.device)}.json",
                           quick=dict(B=1, H=2, N=64, D=16, T=[2, 8], repeats=1))
    sizes = dict(B=args.B, H=args.H, N=args.N, D=args.D)
    if args.child:
        solver, T = args.child.split(":")
        print(json.dumps(run_one(solver, int(T), repeats=args.repeats, device=args.device,
                                 **sizes)))
        return 0

    rows = []
    for T in args.T:
        for solver in SOLVERS:
            cmd = [sys.executable, __file__, "--child", f"{solver}:{T}", "--repeats",
                   str(args.repeats), "--device", args.device]
            cmd += [f"--{k}={v}" for k, v in sizes.items()]
            rows.append(json.loads(run_child(cmd).strip().splitlines()[-1]))
    print(f"hopfield_descent forward+backward, float32, {args.device}; {sizes}, scale=1")
    print(f"machine: {machine_name()} (shared with other jobs: timings are noisy)")
    print(f"{'solver':<13}{'T':>4}{'median ms':>11}{'peak MiB':>10}{'saved MiB':>11}"
          f"{'residual':>10}")
    for r in rows:
        print(f"{r['solver']:<13}{r['T']:>4}{r['median_ms']:>11.1f}{r['peak_mib']:>10.1f}"
              f"{r['saved_for_backward_mib']:>11.2f}{r['max_residual']:>10.1e}")
    write_results(args.out, {"sizes": sizes, "dtype": "float32", "device": args.device,
                             "repeats": args.repeats, "rows": rows})
    return 0


def _suffix(device: str) -> str:
    """Result files of a GPU run are named apart from the CPU's: ``fixed_point_memory_cuda``."""
    return "" if device == "cpu" else "_cuda"


if __name__ == "__main__":
    sys.exit(main())
