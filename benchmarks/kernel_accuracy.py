"""The fused kernel's accuracy at realistic sizes, and its backward's determinism.

For each case the output and every gradient of the triton and the reference backends are
compared with the reference backend in float64 on the same device (the ground truth):
relative error ``‖x − truth‖ / ‖truth‖``. The kernel should be at or below the reference's own
error in the same dtype (the kernel tests assert that at small sizes).

Determinism: the backward sums every key gradient inside one program per key tile (no
atomics), so three runs on the same inputs must agree bit for bit; also the time of one run.
With ``--fused red|tma`` the experimental one-kernel backward (``FUSED_BACKWARD``) runs
instead: its key gradients add up in float32 in arrival order, so the runs' spread is what is
reported.

    python benchmarks/kernel_accuracy.py            # GPU sizes (needs a CUDA GPU)
    python benchmarks/kernel_accuracy.py --smoke    # tiny sizes; CPU through the interpreter
    python benchmarks/kernel_accuracy.py --fused tma

Prints two tables and writes ``kernel-accuracy-<tag>.json`` to ``--out``.
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

from energy_attn import hopfield_descent

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import (  # noqa: E402
    gpu_script_args,
    median_ms,
    provenance,
    results_tag,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cases(smoke: bool):
    """(name, dtype, B, H, Hk, N, M, D, T, optimizer, mask kind)."""
    if smoke:
        return [("gd", "fp32", 1, 2, 1, 40, 40, 16, 2, "gd", "none"),
                ("causal+padding gqa", "fp32", 2, 4, 2, 40, 40, 16, 2, "momentum", "causal+pad")]
    return [
        ("gd D=128", "bf16", 1, 8, 8, 2048, 2048, 128, 4, "gd", "none"),
        ("nesterov D=128", "bf16", 1, 8, 8, 2048, 2048, 128, 4, "nesterov", "none"),
        ("momentum causal+padding, bias, gqa 8/2", "bf16", 2, 8, 2, 2048, 2048, 128, 4,
         "momentum", "causal+pad"),
        ("gd D=64", "fp16", 1, 8, 8, 2048, 2048, 64, 4, "gd", "none"),
        ("gd D=64", "fp32", 1, 8, 8, 1024, 1024, 64, 4, "gd", "none"),
        ("short path M=64, T=8", "bf16", 1, 8, 8, 4096, 64, 64, 8, "gd", "none"),
    ]


def inputs(B, H, Hk, N, M, D, mask_kind, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hk, M, D, generator=g, dtype=torch.float64)
    bias = 0.5 * torch.randn(B, Hk, M, generator=g, dtype=torch.float64)
    dout = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    mask = None
    if mask_kind == "causal+pad":
        mask = torch.ones(B, 1, 1, M, dtype=torch.bool)
        mask[-1, ..., : M // 8] = False  # the first rows of the last sequence see nothing
        mask = mask.to(device)
    else:
        bias = None
    return [t.to(device) if t is not None else None for t in (q, k, bias, dout)], mask


def run(backend, q, k, bias, dout, dtype, **kw):
    """Output and gradients of ``<out, dout>`` with ``q, k`` in ``dtype``, the key bias in
    float32."""
    leaves = [t.detach().requires_grad_(True) if t is not None else None
              for t in (q.to(dtype), k.to(dtype), None if bias is None else bias.float())]
    out = hopfield_descent(leaves[0], leaves[1], key_bias=leaves[2], backend=backend, **kw)
    used = [t for t in leaves if t is not None]
    return [out, *torch.autograd.grad(out, used, dout.to(out.dtype))]


def rel(x, truth):
    return ((x.double() - truth).norm() / truth.norm().clamp_min(1e-300)).item()


def accuracy(smoke, device):
    rows = []
    for name, dt, B, H, Hk, N, M, D, T, opt, mask_kind in cases(smoke):
        (q, k, bias, dout), mask = inputs(B, H, Hk, N, M, D, mask_kind, device)
        kw = dict(num_steps=T, step_size=1.0 if opt == "gd" else 0.8, optimizer=opt,
                  momentum=0.0 if opt == "gd" else 0.5, mask=mask,
                  is_causal=mask_kind.startswith("causal"))
        truth = run("reference", q, k, bias, dout, torch.float64, **kw)
        got = {b: run(b, q, k, bias, dout, DTYPES[dt], **kw) for b in ("triton", "reference")}
        for i, what in enumerate(["out", "dq", "dk", "dkey_bias"][: len(truth)]):
            e_t, e_r = rel(got["triton"][i], truth[i]), rel(got["reference"][i], truth[i])
            finite = bool(torch.isfinite(got["triton"][i]).all())
            rows.append({"case": name, "dtype": dt, "B": B, "H": H, "Hk": Hk, "N": N, "M": M,
                         "D": D, "T": T, "optimizer": opt, "mask": mask_kind, "tensor": what,
                         "triton": e_t, "reference": e_r, "finite": finite})
            print(f"{name} {dt} {what}: triton {e_t:.3g}, reference {e_r:.3g}"
                  + ("" if finite else " NON-FINITE"), flush=True)
    return rows


def determinism(smoke, device, reps):
    """Three forward+backward runs on the same inputs (grouped heads: several query heads add
    into each key head's gradient): the largest difference between runs' gradients, and the
    time of one run."""
    B, H, Hk, N, D, T = (1, 4, 2, 40, 16, 2) if smoke else (1, 8, 2, 4096, 128, 4)
    dtype = torch.float32 if smoke else torch.bfloat16
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, N, D, generator=g).to(device, dtype).requires_grad_(True)
    k = torch.randn(B, Hk, N, D, generator=g).to(device, dtype).requires_grad_(True)
    dout = torch.randn(B, H, N, D, generator=g).to(device, dtype)

    def step():
        o = hopfield_descent(q, k, num_steps=T, backend="triton")
        return torch.autograd.grad(o, (q, k), dout)

    grads = [step() for _ in range(3)]
    spread = max(max((a - b).abs().max().item() for a, b in zip(gr, grads[0]))
                 for gr in grads[1:])
    bitwise = all(torch.equal(a, b) for gr in grads[1:] for a, b in zip(gr, grads[0]))
    ms = median_ms(step, reps, device)
    print(f"three runs: spread {spread:.3g}, bitwise {bitwise}, {ms:.3f} ms", flush=True)
    return {"B": B, "H": H, "Hk": Hk, "N": N, "M": N, "D": D, "T": T,
            "dtype": str(dtype).removeprefix("torch."), "max_run_spread": spread,
            "bitwise_repeatable": bitwise, "fwd_bwd_ms": ms}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fused", choices=["red", "tma"],
                    help="the experimental one-kernel backward (FUSED_BACKWARD)")
    args, device = gpu_script_args(ap, argv)
    from energy_attn.kernels import hopfield_descent as kmod  # noqa: PLC0415

    saved, kmod.FUSED_BACKWARD = kmod.FUSED_BACKWARD, args.fused
    try:
        acc = accuracy(args.smoke, device)
        det = determinism(args.smoke, device, args.reps or (1 if args.smoke else 20))
    finally:
        kmod.FUSED_BACKWARD = saved

    head = ("| case | dtype | tensor | triton rel. error | reference rel. error |\n"
            "|---|---|---|---|---|")
    table = [head] + [f"| {r['case']} | {r['dtype']} | {r['tensor']} | {r['triton']:.3g} | "
                      f"{r['reference']:.3g} |" for r in acc]
    table += ["", "| max spread between runs | bitwise repeatable | f+b ms |", "|---|---|---|",
              f"| {det['max_run_spread']:.3g} | {det['bitwise_repeatable']} | "
              f"{det['fwd_bwd_ms']:.3f} |"]
    text = "\n".join(table)
    print("\n" + text)
    tag = results_tag(args.smoke) + (f"-fused-{args.fused}" if args.fused else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**provenance(), "fused_backward": args.fused, "accuracy": acc, "determinism": det}
    (out / f"kernel-accuracy-{tag}.json").write_text(json.dumps(meta, indent=2))
    return meta


if __name__ == "__main__":
    main()
