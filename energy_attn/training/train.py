"""``energy-attn train``: train the byte-level GPT on a text corpus (see ``training.loop``)."""

from __future__ import annotations

import os
import sys

HELP = {
    "data": "text file or folder (default: this Python's standard-library .py files)",
    "out": "output folder: log.json, log.csv, loss.png, ckpt.pt",
    "block": "block variant: mha | momen | nag | 2nd1st | light2nd1st",
    "attn_steps": "energy attention: T steps (T-1 Hopfield descent steps, then the read-out)",
    "attn_step_size": "energy attention: descent step size",
    "attention": "attention kind: softmax | energy",
    "optimizer": "adamw | aiadam (AttentionInformedAdam)",
    "gamma": "aiadam's gamma in alpha = sigmoid(gamma * mean energy)",
    "attention_norm": "aiadam: divide the attention gradient by its own RMS (own) or by the "
                      "loss gradient's (loss, the seed's literal form; unstable)",
    "batch": "sequences per step per process",
    "steps": "training steps (the schedule's length)",
    "context": "sequence length in bytes",
    "amp": "fp16 autocast with a GradScaler (CUDA only)",
    "ckpt_interval": "steps between checkpoints (0: at each validation)",
    "stability_batch": "sequences in the fixed attention-stability batch (0: off)",
}


def add_train_arguments(p) -> None:
    """One ``--option`` per :class:`TrainConfig` field (defaults from the dataclass)."""
    from dataclasses import MISSING, fields

    from .loop import OPTIMIZER_NAMES, TrainConfig

    choices = {"optimizer": OPTIMIZER_NAMES,
               "block": ("mha", "momen", "nag", "2nd1st", "light2nd1st"),
               "attention": ("softmax", "energy"), "attention_norm": ("loss", "own")}
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", help=HELP.get(f.name))
            continue
        typ = {"int": int, "float": float}.get(str(f.type), str)
        p.add_argument(flag, type=typ, default=default, choices=choices.get(f.name),
                       help=f"{HELP.get(f.name, f.name.replace('_', ' '))} (default {default})")


def config_from_args(args):
    from dataclasses import fields

    from .loop import TrainConfig

    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def _run(args) -> int:
    from .corpus import CorpusError
    from .loop import train

    try:
        cfg = config_from_args(args)
        log = train(cfg, resume=args.resume, stop_at=args.stop_at)
    except (CorpusError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = log["summary"]
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {s['steps']} steps, final validation loss {s['final_val_loss']:.4f}, "
              f"{s['median_step_ms']:.1f} ms/step" + (f"; wrote {cfg.out}" if cfg.out else ""))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train the byte-level GPT on a text corpus",
        description="Train energy_attn.models.GPT (byte-level, vocab 256). Default corpus: the "
                    "running Python's standard-library .py files (fixed split by file). Runs "
                    "under torchrun (DDP: gloo on CPU, nccl on CUDA).")
    add_train_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this many steps (checkpointed), keeping the schedule")
    p.set_defaults(func=_run)
