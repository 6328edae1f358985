"""The cost of the drop-in: nn.MultiheadAttention vs EnergyMultiheadAttention on CPU.

Forward+backward of one self-attention layer (``need_weights=False``, as nn.Transformer*
layers call it), float32: ``nn.MultiheadAttention``, then ``EnergyMultiheadAttention`` with
``num_steps`` 1 (the same computation: the adapter's overhead), 2 and 4 (each extra step is one
more SDPA-sized read-out of the keys). Also the bytes autograd saves for backward
(distinct storages: a tensor saved twice counts once).

    python benchmarks/mha_cpu.py            # B=4, L=512, E=256, H=8
    python benchmarks/mha_cpu.py --quick    # small sizes, a smoke run (writes only to --out)

Prints a table and writes ``benchmarks/results/mha_cpu.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from _machine import (  # this folder is on sys.path
    cpu_script_args,
    host_times_ms,
    machine_name,
    positive_int,
    write_results,
)
from torch import nn

from energy_attn import EnergyMultiheadAttention
from energy_attn._memory import saved_bytes


def measure(layer: nn.Module, x: torch.Tensor, repeats: int) -> dict:
    def step():
        out, _ = layer(x, x, x, need_weights=False)
        out.sum().backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None

    times = host_times_ms(step, repeats)
    # one entry per storage: a tensor saved twice (or two views of it) counts once
    _, saved = saved_bytes(lambda: layer(x, x, x, need_weights=False), per_storage=True)
    return {"median_ms": statistics.median(times), "min_ms": min(times),
            "saved_for_backward_mib": saved / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--B", type=positive_int, default=4)
    p.add_argument("--L", type=positive_int, default=512)
    p.add_argument("--E", type=positive_int, default=256)
    p.add_argument("--H", type=positive_int, default=8)
    p.add_argument("--repeats", type=positive_int, default=7)
    args = cpu_script_args(p, argv, "mha_cpu.json", quick=dict(B=2, L=64, E=32, H=2, repeats=2))
    if args.E % args.H:
        p.error(f"--E ({args.E}) must be a multiple of --H ({args.H})")
    sizes = {"B": args.B, "L": args.L, "E": args.E, "H": args.H}

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(args.E, args.H, batch_first=True)
    x = torch.randn(args.B, args.L, args.E, requires_grad=True)
    rows = [{"layer": "nn.MultiheadAttention", **measure(mha, x, args.repeats)}]
    for T in (1, 2, 4):
        energy = EnergyMultiheadAttention.from_mha(mha, num_steps=T)
        rows.append({"layer": f"EnergyMultiheadAttention T={T}",
                     **measure(energy, x, args.repeats)})

    base = rows[0]["median_ms"]
    print(f"one self-attention layer, forward+backward, float32, CPU; {sizes}")
    print(f"machine: {machine_name()} (torch threads: {torch.get_num_threads()})")
    print(f"{'layer':<32}{'median ms':>11}{'min ms':>9}{'x MHA':>8}{'saved MiB':>11}")
    for r in rows:
        r["relative_to_mha"] = r["median_ms"] / base
        print(f"{r['layer']:<32}{r['median_ms']:>11.1f}{r['min_ms']:>9.1f}"
              f"{r['relative_to_mha']:>8.2f}{r['saved_for_backward_mib']:>11.1f}")
    write_results(args.out, {"sizes": sizes, "dtype": "float32", "repeats": args.repeats,
                             "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
