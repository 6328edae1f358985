"""Describe the machine and the code a benchmark ran on: helpers for every script here.

Scripts run as ``python benchmarks/<name>.py``, so this folder is on ``sys.path`` and they
``from _machine import machine, machine_name, commit, triton_version, provenance,
median_ms, gpu_script_args, results_tag``.
"""

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


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
        "note": "shared machine: other jobs were running, timings are noisy",
    }


def commit() -> str | None:
    """The repository's commit (the results' provenance): ``$BENCH_COMMIT`` when set (a copy
    of the tree without ``.git``, as on a lent GPU machine), else ``git rev-parse``, else None."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
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
    """What a GPU benchmark's JSON records about where it ran: machine, torch, Triton, commit."""
    return {"machine": machine_name(), "torch": torch.__version__, "triton": triton_version(),
            "commit": commit()}


def median_ms(fn, reps: int, device: str) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` (CUDA events, ``reps`` x
    10 ms of repetitions) on a GPU, else ``reps`` host-timed calls after one warm-up."""
    if device == "cuda":
        import triton.testing  # noqa: PLC0415

        return triton.testing.do_bench(fn, warmup=10, rep=reps * 10, return_mode="median")
    fn()  # warm-up (compiles/specialises)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


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
