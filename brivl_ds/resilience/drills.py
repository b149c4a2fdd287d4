"""Fault drills: the `drill.*` config switches, applied at the points where the real faults strike.

They let an on-call team rehearse recovery on its own cluster before a long run, and the tests inject faults
through the same path a user would.
"""
from __future__ import annotations

import os
import signal
import time

import torch

from brivl_ds.config import DrillConfig
from brivl_ds.checkpointing.store import SaveFaults


class Drills:
    def __init__(self, cfg: DrillConfig, rank: int, world: int):
        self.cfg, self.rank = cfg, rank
        for name in ("nonfinite_loss_rank", "stall_rank", "crash_rank", "fail_save_rank"):
            if not 0 <= getattr(cfg, name) < world:
                raise ValueError(f"drill.{name}={getattr(cfg, name)} is not a rank of this {world}-rank job")
        if cfg.crash_during not in ("step", "save"):
            raise ValueError(f"drill.crash_during must be 'step' or 'save', got {cfg.crash_during!r}")

    def announce(self, what: str) -> None:
        print(f"fault drill: rank {self.rank} {what}", flush=True)

    def save_faults(self) -> SaveFaults:
        """Which checkpoint tags this rank fails or dies writing."""
        c = self.cfg
        return SaveFaults(
            fail_tag=f"step{c.fail_save_at_step}" if c.fail_save_at_step >= 0 and c.fail_save_rank == self.rank
            else None,
            crash_tag=f"step{c.crash_at_step}" if c.crash_at_step >= 0 and c.crash_during == "save"
            and c.crash_rank == self.rank else None)

    def loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        c = self.cfg
        if c.nonfinite_loss_at_step <= step < c.nonfinite_loss_at_step + c.nonfinite_loss_steps \
                and c.nonfinite_loss_at_step >= 0 and self.rank == c.nonfinite_loss_rank:
            self.announce(f"makes its loss NaN at step {step}")
            return loss * float("nan")
        return loss

    def poison(self, images: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """A sample whose pixels are NaN (float images, after normalisation)."""
        if self.cfg.poison_row < 0 or self.cfg.poison_row not in rows:
            return images
        self.announce(f"poisons row {self.cfg.poison_row} (NaN pixels)")
        images = images.clone()
        images[rows.index(self.cfg.poison_row)] = float("nan")
        return images

    def maybe_stall(self, step: int) -> None:
        if self.cfg.stall_at_step == step and self.rank == self.cfg.stall_rank:
            self.announce(f"stalls while waiting for the batch of step {step}")
            while True:  # a reader that never returns
                time.sleep(3600)

    def maybe_crash_mid_step(self, step: int) -> None:
        c = self.cfg
        if c.crash_at_step == step and c.crash_during == "step" and self.rank == c.crash_rank:
            self.announce(f"is killed (SIGKILL) in the middle of step {step}")
            os.kill(os.getpid(), signal.SIGKILL)
