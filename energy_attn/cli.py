"""The ``energy-attn`` command.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``, which registers
the subcommand and sets ``func`` (called with the parsed args, returning an exit status).
Modules import their heavy dependencies inside ``func`` so ``energy-attn --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# One module per subcommand, in help order.
COMMAND_MODULES = [
    "energy_attn.checks",
    "energy_attn.training.train",
    "energy_attn.training.compare",
    "energy_attn.landscape_cli",
]


def check_out_dir(path, name: str = "--out") -> None:
    """``path`` is, or can be made, a directory this process writes into: ValueError naming
    ``name`` if it, or the nearest of its parents that exists, is a file, or it cannot be
    created or written. Subcommands call it before any work; it leaves nothing behind (the
    folders it creates to find out are removed again)."""
    path = Path(path)
    missing = []
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "" if p == path else f": {str(p)!r}"
                raise ValueError(f"{name} {str(path)!r}{where} is a file, not a directory; "
                                 "choose another path")
            break
        missing.append(p)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{name} {str(path)!r} cannot be created ({err.strerror or err}); "
                         "choose another path") from None
    writable = os.access(path, os.W_OK | os.X_OK)
    for p in missing:  # deepest first
        p.rmdir()
    if not writable:
        raise ValueError(f"{name} {str(path)!r} is not writable; choose another path")


def seed(text: str) -> int:
    """argparse ``type`` of a ``--seed``: an int that ``torch.manual_seed`` takes (checked by
    :func:`energy_attn._utils.check_seed`); anything else is a usage error (exit 2) naming the
    value."""
    from ._utils import check_seed

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    try:
        return check_seed("the seed", value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="energy-attn",
        description="Energy-based attention: checks, pictures and experiments.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
