"""Time per training step of the byte-level GPT: block variants and optimizers.

A step is forward + backward(s) + optimizer step on one batch. Every variant (the five blocks
with AdamW; the mha block with AttentionInformedAdam, both normalisations) is timed interleaved
(round robin, ``--repeats`` rounds of ``--steps`` steps each) so that load from other jobs on a
shared machine hits all of them alike; the table reports the median step time and the ratio to
mha + AdamW, and the bare optimizer ``step()`` time (no forward/backward).

    python benchmarks/train_step_time.py --out benchmarks/results/train_step_time.json

Writes JSON only where ``--out`` says.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _machine import device_arg, machine_name, positive_int, write_results  # this folder

from energy_attn.optim import AttentionInformedAdam
from energy_attn.training.loop import TrainConfig, build_model, build_optimizer

VARIANTS = {"mha + adamw": {"optimizer": "adamw"},
            "momen + adamw": {"block": "momen"},
            "nag + adamw": {"block": "nag"},
            "2nd1st + adamw": {"block": "2nd1st"},
            "light2nd1st + adamw": {"block": "light2nd1st"},
            "mha + aiadam (norm=loss)": {"optimizer": "aiadam", "attention_norm": "loss"},
            "mha + aiadam (norm=own)": {"optimizer": "aiadam", "attention_norm": "own"}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-layer", type=positive_int, default=2)
    p.add_argument("--d-model", type=positive_int, default=64, help="a multiple of 4 (4 heads)")
    p.add_argument("--context", type=positive_int, default=64)
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--steps", type=positive_int, default=5)
    p.add_argument("--repeats", type=positive_int, default=6)
    p.add_argument("--device", type=device_arg, default="cpu")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: none written)")
    args = p.parse_args(argv)
    if args.d_model % 4:
        p.error(f"--d-model ({args.d_model}) must be a multiple of 4, the number of heads")
    dev = torch.device(args.device)
    setups = {}
    for name, kw in VARIANTS.items():
        cfg = TrainConfig(n_layer=args.n_layer, d_model=args.d_model, n_head=4,
                          context=args.context, batch=args.batch, lr=1e-4, **kw)
        torch.manual_seed(0)
        model = build_model(cfg).to(dev)
        setups[name] = (model, build_optimizer(cfg, model))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, args.context + 1), generator=g).to(dev)
    x, y = x[:, :-1], x[:, 1:]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def forward_backward(model, opt):
        """AttentionInformedAdam takes the loss itself: it adds the attention gradient's
        backward."""
        _, loss = model(x, y)
        if isinstance(opt, AttentionInformedAdam):
            opt.backward(loss)
        else:
            loss.backward()

    def full_step(model, opt):
        forward_backward(model, opt)
        opt.step()
        opt.zero_grad(set_to_none=False)

    times = {n: [] for n in setups}
    opt_only = {n: [] for n in setups}
    for model, opt in setups.values():  # warm-up
        full_step(model, opt)
    for _ in range(args.repeats):
        for name, (model, opt) in setups.items():
            for _ in range(args.steps):
                sync()
                t0 = time.perf_counter()
                full_step(model, opt)
                sync()
                times[name].append(time.perf_counter() - t0)
            # the bare optimizer step (AIAdam with its attention gradient from a fresh backward)
            forward_backward(model, opt)
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            opt_only[name].append(time.perf_counter() - t0)
            opt.zero_grad(set_to_none=False)
    base = statistics.median(times["mha + adamw"])
    rows = [{"variant": n, "median_step_ms": 1e3 * statistics.median(t),
             "ratio_to_mha_adamw": statistics.median(t) / base,
             "median_optimizer_step_ms": 1e3 * statistics.median(opt_only[n])}
            for n, t in times.items()]
    print(f"GPT {args.n_layer} layers, d_model {args.d_model}, context {args.context}, batch "
          f"{args.batch}, device {args.device}; {args.repeats}x{args.steps} interleaved steps")
    print(f"{'variant':<28}{'step ms':>10}{'x mha+AdamW':>13}{'opt.step ms':>13}")
    for r in rows:
        print(f"{r['variant']:<28}{r['median_step_ms']:>10.1f}{r['ratio_to_mha_adamw']:>13.2f}"
              f"{r['median_optimizer_step_ms']:>13.2f}")
    print(f"machine: {machine_name()} (shared with other jobs)")
    if args.out:
        write_results(args.out, {"args": {k: v for k, v in vars(args).items() if k != "out"},
                                 "rows": rows})


if __name__ == "__main__":
    main()
