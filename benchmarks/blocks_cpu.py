"""Forward+backward time, FLOPs and memory of each optimizer-inspired block on CPU.

    python benchmarks/blocks_cpu.py [--batch 8 --seq 256 --d-model 256 --heads 4 --reps 15
                                     --threads 1]

FLOPs are given twice: counted by ``torch.utils.flop_counter`` over forward+backward (it does not
see the fused CPU SDPA kernel, so it misses MHA's attention core) and analytic forward FLOPs.
Blocks are timed interleaved, rep by rep; the ratio uses the minimum over reps (the
least disturbed by other jobs), the median is printed too. Prints a table relative to ``MHA``
and writes ``benchmarks/results/blocks_cpu.json`` (or ``--out``). Memory is reported two ways:
bytes saved for backward (deterministic, from saved-tensor hooks) and the peak resident-set
growth during one forward+backward (Linux), measured in a fresh subprocess per block.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine, positive_int, run_child, write_results  # noqa: E402

from energy_attn._memory import saved_bytes  # noqa: E402
from energy_attn.layers.blocks import BLOCKS  # noqa: E402

# Attention-core forward FLOPs per sequence in units of N²·C (QKᵀ and PV = 4; the full Newton
# correction adds R Vᵀ and (P⊙S)V = 4; the light one reads out 2d-wide values = 2).
CORE = {"mha": 4, "momen": 4, "nag": 4, "2nd1st": 8, "light2nd1st": 6}

NAMES = {"mha": "MHA", "momen": "MomenMHA", "nag": "NagMHA", "2nd1st": "MHA2nd1st",
         "light2nd1st": "LightMHA2nd1st"}


def setup(variant, a):
    torch.manual_seed(0)
    block = BLOCKS[variant](a.d_model, a.heads)
    x = torch.randn(a.batch, a.seq, a.d_model, requires_grad=True)
    state = torch.randn(a.batch, a.seq, a.d_model) if variant in ("momen", "nag") else None
    return block, x, state


def model_flops(variant, a):
    """Analytic forward FLOPs: projections + FFN ``24·N·C²`` and the full (unmasked) core."""
    N, C = a.seq, a.d_model
    return a.batch * (24 * N * C * C + CORE[variant] * N * N * C)


def step(block, x, state):
    out, new_state = block(x, state, is_causal=True)
    loss = out.square().mean() + (0 if new_state is None else new_state.square().mean())
    loss.backward()


def block_saved_bytes(block, x, state):
    """Bytes the block's forward keeps for backward, each storage counted once."""
    return saved_bytes(lambda: block(x, state, is_causal=True), per_storage=True)[1]


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_child(variant, a):
    """Run in a subprocess: peak RSS growth (bytes) over one forward+backward.

    The parent starts it with ``MALLOC_MMAP_THRESHOLD_`` fixed so that glibc returns freed
    tensors to the OS (RSS then tracks live memory); the peak (VmHWM) is reset after a warm-up
    step through ``/proc/self/clear_refs``.
    """
    block, x, state = setup(variant, a)
    step(block, x, state)  # warm up: parameter gradients exist from here on
    x.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS
    rss0 = _status_kb("VmRSS")
    step(block, x, state)
    return _status_kb("VmHWM") - rss0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--seq", type=positive_int, default=256)
    p.add_argument("--d-model", type=positive_int, default=256)
    p.add_argument("--heads", type=positive_int, default=4)
    p.add_argument("--reps", type=positive_int, default=15)
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads (1 keeps timings comparable on a shared machine)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" /
                   "blocks_cpu.json")
    p.add_argument("--no-peak", action="store_true",
                   help="skip the per-block subprocess that measures peak RSS (smoke runs)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.d_model % a.heads:
        p.error(f"--d-model ({a.d_model}) must be a multiple of --heads ({a.heads})")
    torch.set_num_threads(a.threads)
    if a.child:
        print(peak_rss_child(a.child, a))
        return

    setups = {v: setup(v, a) for v in NAMES}
    times = {v: [] for v in NAMES}
    for v, (block, x, state) in setups.items():
        for _ in range(2):  # warm-up
            step(block, x, state)
    # Interleave the blocks rep by rep so that load from other jobs hits them alike.
    for _ in range(a.reps):
        for v, (block, x, state) in setups.items():
            t0 = time.perf_counter()
            step(block, x, state)
            times[v].append(time.perf_counter() - t0)
    rows = []
    for variant, (block, x, state) in setups.items():
        with FlopCounterMode(display=False) as fc:
            step(block, x, state)
        peak = None
        if not a.no_peak:
            peak = int(run_child(
                [sys.executable, __file__, "--child", variant, "--threads", str(a.threads),
                 "--batch", str(a.batch), "--seq", str(a.seq), "--d-model", str(a.d_model),
                 "--heads", str(a.heads)],
                env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}).strip())
        rows.append(dict(block=NAMES[variant], variant=variant,
                         median_s=statistics.median(times[variant]), min_s=min(times[variant]),
                         flops=fc.get_total_flops(), model_fwd_flops=model_flops(variant, a),
                         saved_bytes=block_saved_bytes(block, x, state),
                         peak_rss_bytes=peak))
    base = rows[0]
    for r in rows:
        r["time_x"] = r["min_s"] / base["min_s"]
        r["median_x"] = r["median_s"] / base["median_s"]
        r["flops_x"] = r["flops"] / base["flops"]
        r["model_fwd_x"] = r["model_fwd_flops"] / base["model_fwd_flops"]
        r["saved_x"] = r["saved_bytes"] / base["saved_bytes"]
        r["peak_x"] = None if a.no_peak else r["peak_rss_bytes"] / base["peak_rss_bytes"]
    m = machine()
    print(f"# blocks fwd+bwd, B={a.batch} N={a.seq} d_model={a.d_model} heads={a.heads} float32, "
          f"causal, {a.threads} thread(s); {m['cpu']}, {m['cores']} cores, load average "
          f"{m['load_average'][0]}")
    print(f"{'block':<16}{'min ms':>8}{'x MHA':>7}{'median ms':>10}{'x':>6}{'cnt GF':>8}{'x':>6}"
          f"{'fwd GF':>8}{'x':>6}{'saved MiB':>10}{'x':>6}"
          + ("" if a.no_peak else f"{'peak MiB':>9}{'x':>6}"))
    for r in rows:
        print(f"{r['block']:<16}{1e3 * r['min_s']:>8.1f}{r['time_x']:>7.2f}"
              f"{1e3 * r['median_s']:>10.1f}{r['median_x']:>6.2f}"
              f"{r['flops'] / 1e9:>8.2f}{r['flops_x']:>6.2f}"
              f"{r['model_fwd_flops'] / 1e9:>8.2f}{r['model_fwd_x']:>6.2f}"
              f"{r['saved_bytes'] / 2**20:>10.1f}"
              f"{r['saved_x']:>6.2f}"
              + ("" if a.no_peak else f"{r['peak_rss_bytes'] / 2**20:>9.1f}{r['peak_x']:>6.2f}"))
    write_results(a.out, dict(config=dict(batch=a.batch, seq=a.seq, d_model=a.d_model,
                                          heads=a.heads, dtype="float32", causal=True,
                                          reps=a.reps, threads=a.threads), rows=rows))


if __name__ == "__main__":
    main()
