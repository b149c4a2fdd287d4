"""A run's checkpoints, saved and resumed in one call each (the trainer knows nothing of their format).

Save: DeepSpeed's engine state plus every rank's TrainState, published atomically (store.py). Resume: the newest
checkpoint that verifies (or the one named), through DeepSpeed's own load when it was written on this run's
(data-parallel, tensor-parallel) layout, else resharded onto it (reshard.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch import nn

from brivl_ds.checkpointing.files import checkpoint_world
from brivl_ds.checkpointing.reshard import Resharder
from brivl_ds.checkpointing.state import TrainState, queue_slices
from brivl_ds.checkpointing.store import CheckpointStore, SaveFaults
from brivl_ds.config import ResilienceConfig
from brivl_ds.distributed import gather_objects


class Checkpointer:
    def __init__(self, ckpt_dir: Path, resilience: ResilienceConfig, engine, groups, is_main: bool,
                 whole_model_meta: Callable[[], nn.Module], vocab_parallel: bool,
                 faults: SaveFaults | None = None):
        """`whole_model_meta` builds the unsplit model on the meta device (shapes only): resharding across TP sizes
        needs to know which parameters TP splits, and how."""
        self.ckpt_dir = Path(ckpt_dir)
        self.store = CheckpointStore(self.ckpt_dir, resilience.keep_last, resilience.verify_checksums,
                                     faults or SaveFaults())
        self.verify_checksums = resilience.verify_checksums
        self.engine, self.groups, self.is_main = engine, groups, is_main
        self.whole_model_meta, self.vocab_parallel = whole_model_meta, vocab_parallel

    def latest(self) -> str | None:
        return self.store.latest()

    def save(self, state: TrainState, rank: int, world: int) -> None:
        self.store.save(self.engine, f"step{state.position.step}", state.state_dict(rank, world))

    def resume(self, state: TrainState, resume: str) -> bool:
        """Load the checkpoint `resume` names (`auto`: the newest in this run's folder that verifies, falling back
        past torn or damaged ones; `none`; or a checkpoint folder, verified, with no silent substitute) into the
        engine and `state`. False when there is nothing to resume."""
        if resume == "none":
            return False
        if resume == "auto":
            ckpt_dir, tag = self.ckpt_dir, self.store.choose()
        else:
            ckpt_dir, tag = Path(resume).parent, Path(resume).name
            problems = CheckpointStore(ckpt_dir, verify_checksums=self.verify_checksums).verify(tag)
            if problems:
                raise ValueError(f"checkpoint {resume} is incomplete or damaged: {'; '.join(problems[:3])}")
        if tag is None:
            return False
        if ckpt_dir.resolve() == self.ckpt_dir.resolve():
            self.store.resumed_tag = tag  # retention never deletes it
        folder = ckpt_dir / tag
        universal = (folder / "zero").is_dir()
        written_on = (0, 0) if universal else checkpoint_world(folder)
        if written_on == (self.groups.dp, self.groups.tp):  # the same layout: DeepSpeed's own load, rank by rank
            path, own = self.engine.load_checkpoint(str(ckpt_dir), tag=tag)
            if path is None:
                raise FileNotFoundError(f"could not load checkpoint {folder}")
            state.load_state_dict(own, gather_objects(queue_slices(own)))
        else:
            self._load_resharded(folder, state, written_on)
            how = "DeepSpeed universal checkpoint" if universal else \
                f"{written_on[0]} data-parallel x {written_on[1]} tensor-parallel ranks"
            if self.is_main:
                print(f"resharding {folder} ({how}) onto {self.groups.dp} x {self.groups.tp}", flush=True)
        if self.is_main:
            print(f"resumed from {folder} at step {state.position.step}", flush=True)
        return True

    def _load_resharded(self, folder: Path, state: TrainState, written_on: tuple[int, int]) -> None:
        """A checkpoint written on other ranks, resharded onto this run's: the engine's partitions from every old
        rank's files, the train state from every old rank's client state."""
        whole = None
        written_tp = 1 if written_on == (0, 0) else written_on[1]  # (0, 0): a universal checkpoint, TP = 1
        if self.groups.tp > 1 or written_tp > 1:  # TP-split parameters are merged and cut again
            whole = self.whole_model_meta()
        resharder = Resharder(self.engine, self.groups, whole, self.vocab_parallel)
        every_rank = resharder.load(folder)
        masters = None
        if state.momentum.lowp is not None:
            names = {p: n for n, p in self.engine.module.named_parameters()}
            masters = resharder.momentum_masters([names[m] for _, m in state.momentum.pairs])
        state.load_state_dict(resharder.own_client_state(), [queue_slices(s) for s in every_rank],
                              momentum_masters=masters, keep_tensor_parallel_rng=written_on[1] != self.groups.tp)

