"""Every RNG a rank draws from (Python, NumPy, torch CPU and CUDA, the per-TP-rank dropout stream), saved in its
checkpoint so a resumed run continues the same draws."""
from __future__ import annotations

import random

import numpy as np
import torch

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
