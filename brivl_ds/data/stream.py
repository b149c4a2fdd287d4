"""Training data: a streaming, resumable view of Parquet shards that yields whole per-rank batches.

Each rank reads only its span of the epoch (see plan.py) and each DataLoader worker only the blocks of its batches:
row groups are read with the columns a sample needs and released once their block is done. Augmentation randomness
is a function of (seed, epoch, row) only, never of the worker layout or the training RNG, so a resumed run sees
exactly the images an uninterrupted one would have seen.

A row that fails at read time (undecodable image, missing text) is replaced by a good row of the same batch and
counted: the batch keeps its size (all ranks must step together) and the run goes on.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from brivl_ds.data import plan
from brivl_ds.data.dataset import Sample
from brivl_ds.data.shards import shard_index

log = logging.getLogger(__name__)
COLUMNS = ["id", "image", "text", "boxes"]


@dataclass
class StreamState:
    """The data position saved in every checkpoint."""
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` this rank has consumed
    streams: int = 1  # workers the epoch was laid out for
    world: int = 1
    fingerprint: str = ""


@dataclass
class RawSample:
    id: str
    image: bytes
    text: str
    boxes: list = field(default_factory=list)


class RowGroupReader:
    """Reads rows by global id from the shards' row groups, keeping a few recently used row groups."""

    def __init__(self, shards, capacity: int = 8):
        self.paths = [info.path for info in shards]
        sizes, owners = [], []
        for s, info in enumerate(shards):
            for g, n in enumerate(info.row_groups):
                sizes.append(n)
                owners.append((s, g))
        self.sizes = np.array(sizes, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.owners = owners
        self.files: dict[int, pq.ParquetFile] = {}
        self.cache: OrderedDict[int, dict] = OrderedDict()
        self.capacity = capacity

    def _group(self, g: int) -> dict:
        if g in self.cache:
            self.cache.move_to_end(g)
            return self.cache[g]
        shard, index = self.owners[g]
        if shard not in self.files:
            self.files[shard] = pq.ParquetFile(self.paths[shard])
        table = self.files[shard].read_row_group(index, columns=COLUMNS)
        columns = {name: table.column(name) for name in COLUMNS}
        self.cache[g] = columns
        if len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        return columns

    def rows(self, ids: np.ndarray) -> list[RawSample]:
        groups = np.searchsorted(self.starts, ids, side="right") - 1
        out = []
        for gid, g in zip(ids.tolist(), groups.tolist()):
            cols, i = self._group(g), gid - int(self.starts[g])
            out.append(RawSample(cols["id"][i].as_py(), cols["image"][i].as_py(), cols["text"][i].as_py(),
                                 cols["boxes"][i].as_py() or []))
        return out


class ShardStream(IterableDataset):
    """Yields (Batch, meta) for this rank's batches of the current epoch, from `set_position`'s batch on.

    meta: position (index in the rank's epoch sequence, checked by the trainer), ids, skipped (rows replaced).
    """

    def __init__(self, path: str | Path, transform, collate, batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, block_rows: int = 1024):
        self.shards = shard_index(path)
        self.row_groups = np.array([n for info in self.shards for n in info.row_groups], dtype=np.int64)
        self.total_rows = int(self.row_groups.sum())
        self.transform, self.collate = transform, collate
        self.batch_size, self.rank, self.world, self.seed, self.block_rows = batch_size, rank, world, seed, block_rows
        self.batches_per_epoch = plan.batches_per_epoch(self.total_rows, world, batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{self.total_rows} rows in {path} cannot fill one global batch of "
                             f"{batch_size} x {world} ranks")
        self.fingerprint = plan.fingerprint(self.row_groups)
        self.state = StreamState(world=world, fingerprint=self.fingerprint)
        self._reader: RowGroupReader | None = None

    def layout(self, streams: int) -> plan.Layout:
        return plan.Layout(self.world, self.rank, self.batch_size, self.block_rows, streams, self.seed)

    def set_position(self, state: StreamState) -> None:
        """Continue from `state` (a fresh epoch, or a checkpoint's mid-epoch position)."""
        if state.batch_in_epoch and (state.world != self.world or state.fingerprint != self.fingerprint):
            raise ValueError(
                f"cannot resume mid-epoch {state.epoch} exactly: the checkpoint was taken with {state.world} ranks on "
                f"data {state.fingerprint}, this run has {self.world} ranks on data {self.fingerprint}. Resume with "
                "the same ranks and shards, or from a checkpoint at an epoch boundary.")
        self.state = StreamState(state.epoch, state.batch_in_epoch, state.streams, self.world, self.fingerprint)

    def start_epoch(self, epoch: int, num_workers: int) -> None:
        self.set_position(StreamState(epoch, 0, max(1, num_workers), self.world, self.fingerprint))

    def __len__(self) -> int:
        return self.batches_per_epoch - self.state.batch_in_epoch

    def epoch_batches(self) -> np.ndarray:
        return plan.rank_batches(self.row_groups, self.state.epoch, self.layout(self.state.streams))

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        batches = self.epoch_batches()
        for position in plan.worker_positions(len(batches), self.state.batch_in_epoch, worker, workers):
            yield self._batch(position, batches[position])

    def sample_seed(self, row: int) -> int:
        return int(np.random.SeedSequence([self.seed, self.state.epoch, row]).generate_state(1)[0])

    def load_samples(self, ids: np.ndarray) -> tuple[list[Sample], list[int]]:
        """Transformed samples of rows `ids` (in order) and the rows that failed; bad rows are replaced by
        duplicates of good ones, so len(samples) == len(ids) unless every row failed."""
        if self._reader is None:  # opened lazily, in the worker process: file handles are not shared across forks
            typical_group = max(1, int(np.median(self.row_groups)))
            self._reader = RowGroupReader(self.shards, capacity=2 + -(-self.block_rows // typical_group))
        samples, failed = [], []
        for row, raw in zip(ids.tolist(), self._reader.rows(ids)):
            try:
                if not raw.text or not raw.text.strip():
                    raise ValueError("empty text")
                image, boxes, mask = self.transform(raw.image, raw.boxes, self.sample_seed(row))
                samples.append(Sample(image, boxes, mask, raw.text, row))
            except Exception as err:  # one bad row never stops a run: replaced below, counted
                log.warning("skipping row %d (%s): %s", row, raw.id, err)
                failed.append(row)
        good = len(samples)
        for k in range(len(failed) if good else 0):  # duplicates of good rows keep the batch size constant
            samples.append(samples[k % good])
        return samples, failed

    def _batch(self, position: int, ids: np.ndarray):
        samples, failed = self.load_samples(ids)
        if not samples:
            raise RuntimeError(f"every row of batch {position} failed to load ({failed[:4]}...): corrupt shard?")
        batch, meta = self.collate(samples)
        meta.update(position=position, skipped=len(failed), skipped_rows=failed)
        return batch, meta
