"""AttentionInformedAdam vs AdamW on scikit-learn's 8×8 digits: a small ViT and image-to-text.

Tasks (one small transformer built from the package's ``OptimizerBlock``s, ``mha`` variant):

* ``vit``: 16 patches of 2×2 pixels → bidirectional blocks → mean pool → 10 classes.
  Metrics: validation cross-entropy and accuracy.
* ``img2txt``: a prefix decoder writes the digit's English name ("seven") letter by letter.
  The sequence is ``[16 patch embeddings] + [BOS, letters]``; patches attend to patches, text
  attends to every patch (the cross-attention part of the mask) and causally to earlier
  letters. The package's shared attention module is self-attention, so the cross-attention is
  this masked joint attention rather than a separate module. Metrics: validation per-letter
  cross-entropy and exact-match accuracy of the greedy decoding.

The data is ``sklearn/datasets/data/digits.csv.gz`` from an installed scikit-learn wheel, read
directly (scikit-learn itself is never imported). Without scikit-learn a run that is not saved
yet cannot train: the script says so and exits with status 0 having written nothing. Split: a
fixed permutation (seed 0), 360 validation images.

    python benchmarks/experiments/digits.py --task vit --out docs/results/digits_vit

Writes ``OUT/compare.{json,csv,md,png}`` like ``energy-attn compare`` and prints the table.
Each run is saved as ``OUT/runs/<variant>-s<seed>.json`` and reused when the script runs again,
so a second call re-renders the summary from the saved runs without training (and without
needing scikit-learn, which only a missing run needs).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from energy_attn.layers.blocks import OptimizerBlock
from energy_attn.optim import AttentionInformedAdam
from energy_attn.training.compare import (
    parse_grid,
    summarize_runs,
    variant_name,
    write_summary,
)
from energy_attn.training.loop import (
    TrainConfig,
    attention_maps,
    build_optimizer,
    lr_at,
    machine_info,
    mean_kl,
)

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
BOS, EOS, PAD = 26, 27, -1  # letters are 0..25
TEXT_LEN = 1 + max(len(n) for n in NAMES)  # BOS + letters (targets: letters + EOS)
N_PATCH, PATCH_DIM = 16, 4


def digits_path() -> Path | None:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    return path if path.exists() else None


def load_digits(n_val=360):
    """Images ``[n, 16, 4]`` (2×2 patches, values in [0, 1]) and labels, split train/val."""
    path = digits_path()
    if path is None:
        return None
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(data[:, :-1] / 16.0).view(-1, 4, 2, 4, 2)  # [n, row, 2, col, 2]
    x = x.permute(0, 1, 3, 2, 4).reshape(-1, N_PATCH, PATCH_DIM)       # [n, 16 patches, 4]
    y = torch.from_numpy(data[:, -1]).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    val, tr = perm[:n_val], perm[n_val:]
    return (x[tr], y[tr]), (x[val], y[val])


def text_targets(labels):
    """``inp [B, TEXT_LEN]`` (BOS + letters, padded with EOS) and ``tgt`` (letters + EOS, PAD)."""
    inp = torch.full((len(labels), TEXT_LEN), EOS, dtype=torch.long)
    tgt = torch.full((len(labels), TEXT_LEN), PAD, dtype=torch.long)
    for i, lab in enumerate(labels.tolist()):
        codes = [ord(c) - ord("a") for c in NAMES[lab]]
        inp[i, 0] = BOS
        inp[i, 1:1 + len(codes)] = torch.tensor(codes)
        tgt[i, :len(codes)] = torch.tensor(codes)
        tgt[i, len(codes)] = EOS
    return inp, tgt


class DigitsTransformer(nn.Module):
    """Patch embedding + ``n_layer`` mha blocks; a classifier (vit) or a letter decoder."""

    def __init__(self, task, d_model=64, n_head=4, n_layer=2):
        super().__init__()
        self.task = task
        self.patch = nn.Linear(PATCH_DIM, d_model)
        n = N_PATCH + (TEXT_LEN if task == "img2txt" else 0)
        self.pos = nn.Parameter(torch.randn(n, d_model) * 0.02)
        self.blocks = nn.ModuleList(OptimizerBlock(d_model, n_head, "mha") for _ in range(n_layer))
        self.ln = nn.LayerNorm(d_model)
        if task == "vit":
            self.head = nn.Linear(d_model, 10)
        else:
            self.letters = nn.Embedding(28, d_model)
            self.head = nn.Linear(d_model, 28)
            allowed = torch.ones(n, n, dtype=torch.bool).tril()  # text: causal over letters
            allowed[:, :N_PATCH] = True                          # everyone sees every patch
            allowed[:N_PATCH, N_PATCH:] = False                  # patches never see text
            self.register_buffer("mask", allowed[None, None], persistent=False)  # [1,1,N,N]

    def forward(self, images, text=None):
        x = self.patch(images)                                       # [B, 16, d]
        if self.task == "img2txt":
            x = torch.cat([x, self.letters(text)], dim=1)            # [B, 16 + T, d]
        x = x + self.pos[: x.shape[1]]
        mask = self.mask[..., : x.shape[1], : x.shape[1]] if self.task == "img2txt" else None
        for block in self.blocks:
            x, _ = block(x, mask=mask)
        x = self.ln(x)
        if self.task == "vit":
            return self.head(x.mean(1))                              # [B, 10]
        return self.head(x[:, N_PATCH:])                             # [B, T, 28]


def loss_fn(model, images, labels):
    if model.task == "vit":
        return F.cross_entropy(model(images), labels)
    inp, tgt = text_targets(labels)
    logits = model(images, inp)
    return F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=PAD)


@torch.no_grad()
def evaluate(model, images, labels):
    model.eval()
    loss = loss_fn(model, images, labels).item()
    if model.task == "vit":
        acc = (model(images).argmax(-1) == labels).float().mean().item()
    else:  # greedy decoding, exact match of the whole name (up to EOS)
        text = torch.full((len(labels), 1), BOS, dtype=torch.long)
        for _ in range(TEXT_LEN - 1):
            nxt = model(images, text)[:, -1].argmax(-1, keepdim=True)
            text = torch.cat([text, nxt], dim=1)
        inp, _ = text_targets(labels)
        acc = (text == inp).all(-1).float().mean().item()
    model.train()
    return loss, acc


def run(task, cfg: TrainConfig, data):
    (xtr, ytr), (xva, yva) = data
    torch.manual_seed(cfg.seed)
    model = DigitsTransformer(task, cfg.d_model, cfg.n_head, cfg.n_layer)
    opt = build_optimizer(cfg, model)
    stab = (xva[:32], text_targets(yva[:32])[0]) if task == "img2txt" else (xva[:32],)
    log = {"config": {**cfg.__dict__, "task": task}, "machine": machine_info("cpu"),
           "train": [], "eval": []}
    prev, t_train = None, 0.0

    def do_eval(step):
        nonlocal prev
        loss, acc = evaluate(model, xva, yva)
        maps = attention_maps(model, *stab)
        log["eval"].append({"step": step, "time": t_train, "val_loss": loss, "val_acc": acc,
                            "attn_kl": mean_kl(prev, maps) if prev is not None else None})
        prev = maps

    do_eval(0)
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + step)
        idx = torch.randint(0, len(ytr), (cfg.batch,), generator=gen)
        loss = loss_fn(model, xtr[idx], ytr[idx])
        if isinstance(opt, AttentionInformedAdam):
            opt.backward(loss)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lv = loss.item()
        dt = time.perf_counter() - t0
        t_train += dt
        rec = {"step": step + 1, "loss": lv, "time": t_train, "step_time": dt}
        if isinstance(opt, AttentionInformedAdam) and opt.last_alpha:
            rec["alpha"] = opt.last_alpha[0].item()
        log["train"].append(rec)
        if not math.isfinite(lv):
            log["diverged_at"] = step + 1
            do_eval(step + 1)
            break
        if (step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.steps:
            do_eval(step + 1)
    ev, st = log["eval"], sorted(1e3 * t["step_time"] for t in log["train"])
    kls = [e["attn_kl"] for e in ev if e["attn_kl"] is not None]
    log["summary"] = {
        "steps": log["train"][-1]["step"], "diverged_at": log.get("diverged_at"),
        "final_val_loss": ev[-1]["val_loss"], "best_val_loss": min(e["val_loss"] for e in ev),
        "final_val_acc": ev[-1]["val_acc"], "train_time": t_train,
        "median_step_ms": st[len(st) // 2], "mean_attn_kl": sum(kls) / len(kls) if kls else None,
    }
    return log


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("vit", "img2txt"), required=True)
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                   default=None, help="TrainConfig fields to vary (as energy-attn compare)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--target-loss", type=float, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected integers separated by commas, e.g. 0,1,2")
    try:  # every configuration is checked before the first run
        base = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr,
                           d_model=args.d_model, n_layer=args.n_layer, n_head=4,
                           eval_interval=args.eval_interval, warmup=20, beta2=0.99)
        runs = [(variant_name(variant), seed, replace(base, **variant, seed=seed))
                for variant in parse_grid(args.grid or ["optimizer=adamw,aiadam"], TrainConfig)
                for seed in seeds]
    except ValueError as err:
        p.error(str(err))
    data = None  # loaded for the first run that is not saved yet
    out = Path(args.out)
    logs = {}
    for name, seed, cfg in runs:
        run_file = out / "runs" / f"{name}-s{seed}.json"
        if run_file.exists():
            log = json.loads(run_file.read_text())
        else:
            data = data or load_digits()
            if data is None:
                print("scikit-learn is not installed: its bundled digits data set is "
                      "unavailable; skipping (pip install scikit-learn to run this "
                      "experiment)")
                return 0
            log = run(args.task, cfg, data)
            run_file.parent.mkdir(parents=True, exist_ok=True)
            run_file.write_text(json.dumps(log))
        s = log["summary"]
        print(f"[{args.task} {name} seed {seed}] val loss {s['final_val_loss']:.4f} "
              f"acc {s['final_val_acc']:.3f} {s['median_step_ms']:.1f} ms/step",
              file=sys.stderr, flush=True)
        logs.setdefault(name, []).append(log)
    rows = summarize_runs(logs, args.target_loss, extra_keys=("final_val_acc",))
    print(write_summary(logs, rows, out, args.target_loss,
                        "python benchmarks/experiments/digits.py " + " ".join(sys.argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
