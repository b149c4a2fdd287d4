"""Benchmarks: they print what they measured on this machine, and nothing asserts.
construction.py (peak memory while building a preset, partitioned or plain), data.py (decode + augment + collate
against torchvision), serving.py (an exported model and its HTTP service, micro-batching on and off), kernels.py
(the fused Triton kernels against eager and torch.compile; GPU only), negatives.py (queue vs in-batch negatives:
a study of the objective through the trainer, at matched steps and samples)."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine() or "unknown CPU")


def cores() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{os.cpu_count()} cores ({usable} usable)"
