"""Time and saved activations of ``energy_attn.Hopfield`` against hopfield-layers' ``Hopfield``.

Same module arguments, same weights (loaded from the hflayers model), forward+backward, float32
on CPU (or ``--device cuda``). "saved MiB" counts the bytes autograd keeps for backward
(deterministic). Needs hflayers importable: a checkout of ml-jku/hopfield-layers (commit
f56f929) on ``PYTHONPATH``.

    PYTHONPATH=path/to/hopfield-layers python benchmarks/hopfield_vs_hflayers.py [--quick]

Prints a table and writes ``benchmarks/results/hopfield_vs_hflayers[_cuda].json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _machine import machine_name

from energy_attn._memory import saved_bytes

CONFIGS = {  # name: (Hopfield kwargs, B, L)
    "T=0": (dict(input_size=256, num_heads=4), 8, 256),
    "T=3, eps=1e-4 (default rule)": (dict(input_size=256, num_heads=4, update_steps_max=3), 8, 256),
    "T=3, eps=0": (dict(input_size=256, num_heads=4, update_steps_max=3,
                        update_steps_eps=0.0), 8, 256),
}


def measure(module, x, repeats):
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out, saved = saved_bytes(lambda: module(x))
        out.square().mean().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3, saved / 2**20


def main():
    import hflayers

    import energy_attn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    args = ap.parse_args()
    rows = []
    for name, (kwargs, B, L) in CONFIGS.items():
        if args.quick:
            kwargs, B, L = {**kwargs, "input_size": 32}, 2, 16
        # hflayers refuses eps = 0; 1e-30 never stops early either
        theirs = hflayers.Hopfield(**{**kwargs, "update_steps_eps": kwargs.get(
            "update_steps_eps", 1e-4) or 1e-30}).to(args.device).eval()
        ours = energy_attn.Hopfield(**kwargs).to(args.device).eval()
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(B, L, kwargs["input_size"], device=args.device)
        t_h, m_h = measure(theirs, x, args.repeats)
        t_o, m_o = measure(ours, x, args.repeats)
        rows.append(dict(config=name, B=B, L=L, hflayers_ms=t_h, energy_attn_ms=t_o,
                         speedup=t_h / t_o, hflayers_saved_mib=m_h, energy_attn_saved_mib=m_o))
    print(f"{machine_name()}, {args.device}, float32, forward+backward, median of {args.repeats}")
    print("| config | B | L | hflayers ms | energy_attn ms | speed-up | hflayers saved MiB | "
          "energy_attn saved MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['config']} | {r['B']} | {r['L']} | {r['hflayers_ms']:.1f} | "
              f"{r['energy_attn_ms']:.1f} | {r['speedup']:.2f}x | {r['hflayers_saved_mib']:.1f} | "
              f"{r['energy_attn_saved_mib']:.1f} |")
    if not args.quick:
        out = Path(__file__).parent / "results" / \
            f"hopfield_vs_hflayers{'' if args.device == 'cpu' else '_' + args.device}.json"
        out.write_text(json.dumps(dict(machine=machine_name(), device=args.device, rows=rows),
                                  indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
