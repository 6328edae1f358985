"""``energy-attn train``: train the byte-level GPT on a text corpus (see ``training.loop``).

Only the options given on the command line are taken from it; the others come from the
:class:`TrainConfig` defaults, or, with ``--resume``, from the run's checkpoint (without one,
its ``log.json``), so ``energy-attn train --out RUN --resume --steps 60`` extends a finished
30-step run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HELP = {
    "data": "text file or folder (default: this Python's standard-library .py files)",
    "out": "run directory: log.json, log.csv, loss.png, ckpt.pt (default: a new "
           "runs/train-DATE-TIME)",
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
    "amp": "fp16 autocast with a GradScaler (CUDA only; --no-amp turns a resumed run's off, "
           "e.g. to continue it on the CPU)",
    "ckpt_interval": "steps between checkpoints (0: at each validation)",
    "stability_batch": "sequences in the fixed attention-stability batch: the first "
                       "validation windows, at most eval-batches x batch (0: off)",
    "threads": "CPU threads (torch.set_num_threads; 0: torch's default; at most the CPU "
               "count). On a machine shared with other busy jobs use 1 (or OMP_NUM_THREADS=1)",
}


def add_train_arguments(p, help_overrides=None) -> None:
    """One ``--option`` per :class:`TrainConfig` field. Unset options stay out of the parsed
    args (``argparse.SUPPRESS``): see :func:`given_options`. ``help_overrides`` replaces
    entries of :data:`HELP` (a subcommand whose option means something else)."""
    helps = {**HELP, **(help_overrides or {})}
    from dataclasses import MISSING, fields

    from .loop import CHOICES, TrainConfig

    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        if f.type in ("bool", bool):  # --no-X too: a resumed run may turn a saved X off
            p.add_argument(flag, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=helps.get(f.name))
            continue
        typ = {"int": int, "float": float}.get(str(f.type), str)
        text = helps.get(f.name, f.name.replace("_", " "))
        if default is not None:  # None defaults are described in the help text itself
            text += f" (default {default})"
        p.add_argument(flag, type=typ, default=argparse.SUPPRESS, choices=CHOICES.get(f.name),
                       help=text)


def given_options(args) -> dict:
    """The :class:`TrainConfig` fields given on the command line."""
    from dataclasses import fields

    from .loop import TrainConfig

    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}


def config_from_args(args):
    """A :class:`TrainConfig` from the given options and the dataclass defaults."""
    from .loop import TrainConfig

    return TrainConfig(**given_options(args))


def default_run_dir() -> str:
    """``runs/train-YYYYmmdd-HHMMSS`` (with ``-2``, ``-3``, ... if taken)."""
    base = Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return str(path)


def resolve_config(args):
    """The run's config: with ``--resume`` the run's saved config (its checkpoint's, else its
    ``log.json``'s: :func:`~energy_attn.training.loop.saved_config`) updated by the options
    given, else the given options over the defaults (``out`` defaulting to a new run
    directory). Prints where the run goes."""
    from .loop import CHECKPOINT, TrainConfig, saved_config

    given = given_options(args)
    main = int(os.environ.get("RANK", "0")) == 0
    if args.resume:
        if "out" not in given:
            raise ValueError("--resume needs --out RUN_DIR (the run to continue)")
        saved = saved_config(given["out"])
        if main and not (Path(given["out"]) / CHECKPOINT).is_file():
            print(f"no checkpoint {Path(given['out']) / CHECKPOINT}: starting a new run"
                  + (" with the settings of its log.json" if saved is not None else ""),
                  file=sys.stderr)
        if saved is not None:
            return TrainConfig.from_dict({**saved, **given})
    elif "out" not in given:
        given["out"] = default_run_dir()
        if main:
            print(f"run directory: {given['out']} (choose one with --out)", file=sys.stderr)
    return TrainConfig(**given)


def _run(args) -> int:
    from ..cli import check_out_dir
    from .corpus import CorpusError
    from .loop import train

    try:
        cfg = resolve_config(args)
        check_out_dir(cfg.out)
        log = train(cfg, resume=args.resume, stop_at=args.stop_at)
    except (CorpusError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = log["summary"]
    if int(os.environ.get("RANK", "0")) == 0:
        ms = "" if s["median_step_ms"] is None else f", {s['median_step_ms']:.1f} ms/step"
        print(f"done: {s['steps']} steps, final validation loss {s['final_val_loss']:.4f} "
              f"(step {log['eval'][-1]['step']}){ms}" + (f"; wrote {cfg.out}" if cfg.out else ""))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train the byte-level GPT on a text corpus",
        description="Train energy_attn.models.GPT (byte-level, vocab 256). Default corpus: the "
                    "running Python's standard-library .py files (fixed split by file). Runs "
                    "under torchrun (DDP: gloo on CPU, nccl on CUDA).")
    add_train_arguments(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint: its settings unless "
                        "given again; --steps, intervals, --threads, learning-rate settings "
                        "may change, the model, data and optimizer may not (no checkpoint, "
                        "e.g. diverged before the first: start it anew with its log's settings)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this many steps (checkpointed), keeping the schedule")
    p.set_defaults(func=_run)
