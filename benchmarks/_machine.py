"""Describe the machine and the code a benchmark ran on: helpers for every script here.

Scripts run as ``python benchmarks/<name>.py``, so this folder is on ``sys.path`` and they
``from _machine import ...`` what they need: the machine and commit (``machine``,
``machine_name``, ``commit``, ``provenance``), timing (``host_times_ms``, ``median_ms``), a
measurement in a fresh process (``run_child``), arguments (``positive_int``, ``device_arg``,
``cpu_script_args``, ``gpu_script_args``) and results (``write_results``, ``results_tag``).
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from energy_attn._device import check_device
from energy_attn.training.loop import machine_info


def _cpu_model() -> str:
    return machine_info("cpu")["cpu"]


def machine_name() -> str:
    """One line: the GPU when CUDA is available, else the CPU model and core count."""
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return f"{_cpu_model()}, {os.cpu_count()} cores, {platform.system()}"


def machine() -> dict:
    """The same, as a record for JSON results."""
    return {
        "name": machine_name(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        # what else was running: the docs quote it beside CPU timings taken on shared machines
        "load_average": [round(x, 2) for x in os.getloadavg()],  # 1, 5, 15 minutes
    }


def commit(repo: Path = Path(__file__).parent) -> str | None:
    """The repository's commit (the results' provenance): ``$BENCH_COMMIT`` when set (a copy
    of the tree without ``.git``, as on a lent GPU machine), else ``git rev-parse`` with
    ``+dirty`` appended when tracked files differ from it, else None."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=repo,
                              check=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def triton_version() -> str | None:
    """Triton's version, or None where it is not installed."""
    try:
        import triton  # noqa: PLC0415
    except ImportError:
        return None
    return triton.__version__


def provenance() -> dict:
    """What a kernel benchmark's JSON records about where it ran: machine, torch, Triton, commit
    and the command line."""
    return {"machine": machine_name(), "torch": torch.__version__, "triton": triton_version(),
            "commit": commit(), "command": command()}


def median_ms(fn, reps: int, device: str) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` (CUDA events, ``reps`` x
    10 ms of repetitions) on a GPU, else ``reps`` host-timed calls after one warm-up."""
    if device == "cuda":
        import triton.testing  # noqa: PLC0415

        return triton.testing.do_bench(fn, warmup=10, rep=reps * 10, return_mode="median")
    return statistics.median(host_times_ms(fn, reps))


def host_times_ms(fn, reps: int, warmup: int = 1) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn()``, timed on the host after ``warmup``
    untimed calls (``fn`` synchronises a GPU itself if it uses one)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def positive_int(text: str) -> int:
    """``argparse`` type for sizes and repetition counts: an integer of at least 1."""
    return _positive(int, "an integer >= 1", text)


def positive_float(text: str) -> float:
    """``argparse`` type for a step size or an inverse temperature: a number above 0."""
    return _positive(float, "a number > 0", text)


def _positive(kind, expected: str, text: str):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def device_arg(text: str) -> str:
    """``argparse`` type for ``--device``: a torch device that exists on this machine."""
    try:
        check_device(text, name="device")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def run_child(cmd: list[str], env: dict | None = None) -> str:
    """Run one measurement in a fresh process (its peak memory is its own); return its stdout.
    If it fails, exit with its command and its error output rather than a bare exit status."""
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.exit(f"measurement failed (exit status {res.returncode}): {shlex.join(cmd)}\n"
                 f"{res.stderr.strip()}")
    return res.stdout


def cpu_script_args(ap, argv, name, quick: dict):
    """Parse the arguments of a CPU benchmark with a smoke mode: adds ``--quick`` (the values
    in ``quick`` become the defaults; arguments given explicitly still win) and ``--out`` (the
    JSON path: ``results/<name>`` here for a full run, ``name`` a file name or a function of
    the parsed arguments; a ``--quick`` run without ``--out`` writes nothing, so that it never
    replaces the committed results the docs quote)."""
    ap.add_argument("--quick", action="store_true", help="a smoke run: " + (
        " ".join(f"{k}={v}" for k, v in quick.items()) or "small sizes"))
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default: under benchmarks/results; none for --quick)")
    args = ap.parse_args(argv)
    if args.quick:
        ap.set_defaults(**quick)
        args = ap.parse_args(argv)
    if args.out is None and not args.quick:
        args.out = Path(__file__).parent / "results" / (name if isinstance(name, str)
                                                        else name(args))
    return args


def command() -> str:
    """The command line that ran this script, the script's path relative to the repository."""
    script = Path(sys.argv[0]).resolve()
    root = Path(__file__).resolve().parents[1]
    if script.is_relative_to(root):
        script = script.relative_to(root)
    return shlex.join(["python", str(script), *sys.argv[1:]])


def write_results(path: Path | None, record: dict) -> None:
    """Write a benchmark's results as JSON, with where they come from first: ``machine()``,
    the command line, the commit and the UTC date. ``path=None`` (a smoke run) writes nothing."""
    if path is None:
        print("not written (--quick without --out)")
        return
    record = {"machine": machine(), "command": command(), "commit": commit(),
              "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
              **record}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


def results_tag(smoke: bool) -> str:
    """The machine part of a GPU benchmark's result file names: ``"smoke-cpu"`` for a
    ``--smoke`` run, else the GPU's name in lower case with dashes (``"nvidia-h200"``)."""
    return "smoke-cpu" if smoke else torch.cuda.get_device_name(0).replace(" ", "-").lower()


def gpu_script_args(ap, argv):
    """Parse the arguments of a GPU benchmark with a CPU ``--smoke`` mode: adds ``--smoke``,
    ``--reps`` and ``--out`` to ``ap`` (an ``argparse.ArgumentParser``) and returns
    ``(args, device)``; without CUDA anything but ``--smoke`` is an argument error."""
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU interpreter is fine)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        ap.error("no CUDA GPU: only --smoke runs here (through the Triton interpreter)")
    return args, device
