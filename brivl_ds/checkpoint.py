"""Checkpoint and resume through DeepSpeed's own checkpointing.

DeepSpeed saves, per rank, the ZeRO-3 parameter and optimizer partitions (the momentum encoders included: they
are frozen parameters of the same engine), the LR scheduler, and our client state. Our client state is per rank
too (ZeRO-3 writes one model-states file per data-parallel rank): trainer position, this rank's slice of each
queue, the fp32 momentum shards of low-precision runs, and this rank's RNG states (with TP, its dropout stream too).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from brivl_ds.parallel.rng import rng_tracker_state, set_rng_tracker_state


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    state["tensor_parallel"] = rng_tracker_state()  # the per-TP-rank dropout stream (None without TP)
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    set_rng_tracker_state(state.get("tensor_parallel"))


def latest_tag(checkpoint_dir: str | Path) -> str | None:
    """The tag DeepSpeed recorded in <dir>/latest, if a checkpoint was completed there."""
    latest = Path(checkpoint_dir) / "latest"
    return latest.read_text().strip() if latest.exists() else None


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a list of one outside distributed runs)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
