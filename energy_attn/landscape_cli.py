"""``energy-attn landscape``: write the blog's flatland figures and the norm sweep as PNG files.

Quick by default (coarse grids, a 12 × 8 sweep: seconds); ``--full`` uses the blog's
resolution (the 100 × 50 sweep). Progress goes to stderr, the written paths to stdout.
"""

from __future__ import annotations

import sys

from ._progress import StatusLine, bar


def _progress_bar(stream=None, width=28):
    """A plain text progress bar: ``\\r``-redrawn on a terminal, one line per update otherwise."""
    status = StatusLine(stream)

    def update(done, total, label):
        line = f"[{bar(done, total, width)}] {done}/{total} {label}"
        status.show(line[:79], final=done == total)

    return update


def _run(args) -> int:
    from .cli import check_out_dir

    try:
        check_out_dir(args.out)
        from .viz import write_gallery
        from .viz._mpl import require_matplotlib

        require_matplotlib()
    except (ImportError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    paths = write_gallery(args.out, full=args.full, seed=args.seed, progress=_progress_bar())
    for path in paths:
        print(path)
    return 0


def add_parser(subparsers) -> None:
    from .cli import seed

    p = subparsers.add_parser(
        "landscape", help="write the blog's energy landscapes and norm sweep as PNG files",
        description="Flatland energy landscapes with descent trajectories (big/small/many "
                    "steps, high/low temperature, Q/K/V maps, bare self-attention), the "
                    "optimizers on one landscape with their energy traces, and the d_k x "
                    "scale norm sweep of bare self-attention. Needs the [viz] extra.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument("--full", action="store_true",
                   help="the blog's resolution (slower); default: quick mode")
    p.add_argument("--seed", type=seed, default=0, help="seed of the toy patterns (default 0)")
    p.set_defaults(func=_run)
