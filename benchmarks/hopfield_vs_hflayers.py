"""Time and saved activations of ``energy_attn.Hopfield`` against hopfield-layers' ``Hopfield``.

Same module arguments, same weights (loaded from the hflayers model), forward+backward, float32
on CPU (or ``--device cuda``). "saved MiB" counts the bytes autograd keeps for backward
(deterministic). Needs hflayers importable: a checkout of ml-jku/hopfield-layers (commit
f56f929) on ``PYTHONPATH``.

    PYTHONPATH=path/to/hopfield-layers python benchmarks/hopfield_vs_hflayers.py [--quick]

Prints a table and writes ``benchmarks/results/hopfield_vs_hflayers[_cuda].json`` (or ``--out``;
a ``--quick`` smoke run writes only to ``--out``).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _machine import (  # this folder is on sys.path
    cpu_script_args,
    device_arg,
    host_times_ms,
    machine_name,
    positive_int,
    write_results,
)

from energy_attn._memory import saved_bytes

CONFIGS = {  # name: (Hopfield kwargs, B, L)
    "T=0": (dict(input_size=256, num_heads=4), 8, 256),
    "T=3, eps=1e-4 (default rule)": (dict(input_size=256, num_heads=4, update_steps_max=3), 8, 256),
    "T=3, eps=0": (dict(input_size=256, num_heads=4, update_steps_max=3,
                        update_steps_eps=0.0), 8, 256),
}


def measure(module, x, repeats):
    """Median ms of forward+backward (after one warm-up) and the MiB saved for backward."""
    saved = 0

    def step():
        nonlocal saved
        out, saved = saved_bytes(lambda: module(x))
        out.square().mean().backward()
        if x.is_cuda:
            torch.cuda.synchronize()

    return statistics.median(host_times_ms(step, repeats)), saved / 2**20


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", type=device_arg, default="cpu")
    ap.add_argument("--repeats", type=positive_int, default=5)
    args = cpu_script_args(ap, argv, lambda a: "hopfield_vs_hflayers"
                           f"{'' if a.device == 'cpu' else '_' + a.device}.json", quick={})
    try:
        import hflayers
    except ImportError:
        ap.error("hflayers is not importable: put a checkout of ml-jku/hopfield-layers "
                 "(commit f56f929) on PYTHONPATH")

    import energy_attn

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
    write_results(args.out, dict(device=args.device, repeats=args.repeats, rows=rows))


if __name__ == "__main__":
    main()
