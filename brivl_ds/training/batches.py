"""The training stream as optimizer steps of positioned micro-batches, epoch after epoch, from a saved position.

Each epoch is laid out afresh for the workers of this run; a mid-epoch resume gets the rest of its epoch (re-dealt
when the ranks or the batch size changed). Every micro-batch is checked to be the one the position expects: the
exact-resume guarantee, asserted as it runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader

from brivl_ds.data.stream import ShardStream, StreamState
from brivl_ds.models.brivl import Batch


@dataclass
class MicroBatch:
    batch: Batch
    rows: list[int]  # global row ids, for the post-mortem of a non-finite step
    content_ids: torch.Tensor  # [B, 2] int64 image and caption ids (data/content_ids.py): false negatives
    skipped: int  # rows that failed at read time and were replaced by others
    data_wait: float  # seconds the training loop waited for it


class StepBatches:
    """Iterates the micro-batches of each optimizer step, advancing `state` (the position saved in checkpoints)
    as each one is handed out."""

    def __init__(self, stream: ShardStream, state: Callable[[], StreamState], set_state: Callable[[StreamState], None],
                 micro_batches_per_step: int, num_workers: int, prefetch_factor: int, pin_memory: bool, seed: int):
        self.stream, self.state, self.set_state = stream, state, set_state
        self.per_step, self.num_workers = micro_batches_per_step, num_workers
        self.prefetch_factor, self.pin_memory, self.seed = prefetch_factor, pin_memory, seed
        self._micro = self._micro_batches()

    def next_step(self) -> list[MicroBatch]:
        return [next(self._micro) for _ in range(self.per_step)]

    def _micro_batches(self) -> Iterator[MicroBatch]:
        while True:  # epoch after epoch; the trainer stops at its step count
            state = self.state()
            if state.batch_in_epoch == 0:  # a fresh epoch is laid out for the workers we have now
                self.stream.start_epoch(state.epoch, self.num_workers)
            else:  # mid-epoch resume: the rest of the epoch, re-dealt if the ranks or batch size changed
                self.stream.set_position(state, num_workers=self.num_workers)
            self.set_state(state := self.stream.state)
            t_fetch = time.perf_counter()
            for batch, meta in self._loader():
                if meta["position"] != state.batch_in_epoch:  # the exact-resume guarantee, checked
                    raise RuntimeError(f"data loader yielded batch {meta['position']} of epoch {state.epoch}, "
                                       f"expected {state.batch_in_epoch}")
                state.batch_in_epoch += 1
                yield MicroBatch(batch, meta["rows"], meta["content_ids"], meta["skipped"], time.perf_counter() - t_fetch)
                t_fetch = time.perf_counter()
            self.set_state(StreamState(epoch=state.epoch + 1))

    def _loader(self) -> DataLoader:
        # Its own generator: every new iterator draws a base seed, and from the global RNG that draw would shift
        # dropout masks whenever a loader is (re)created, e.g. after a resume. Our rows' augmentation draws
        # depend on (seed, epoch, row) only, so this seed feeds nothing else.
        workers = self.num_workers
        return DataLoader(self.stream, batch_size=None, num_workers=workers,
                          prefetch_factor=self.prefetch_factor if workers else None, pin_memory=self.pin_memory,
                          persistent_workers=False, generator=torch.Generator().manual_seed(self.seed))
