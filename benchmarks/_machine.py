"""Describe the machine a benchmark ran on: one helper for every script in this folder.

Scripts run as ``python benchmarks/<name>.py``, so this folder is on ``sys.path`` and they
``from _machine import machine, machine_name``.
"""

import os
import platform

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
