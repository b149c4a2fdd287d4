"""Training data: a streaming, resumable view of Parquet shards that yields whole per-rank batches.

Each rank reads only its span of the epoch (see epoch_layout.py) and each DataLoader worker only the blocks of its
batches: row groups are read with the columns a sample needs and released once their block is done. Augmentation
randomness is a function of (seed, epoch, row) only, never of the worker layout or the training RNG, so a resumed
run sees exactly the images an uninterrupted one would have seen. Resuming mid-epoch with another number of ranks or
per-rank batch size re-deals the rows no rank has consumed yet (epoch_layout.py): each is still seen once in the
epoch.

A row that fails at read time (undecodable image, missing text) is replaced by a good row of the same batch and
counted: the batch keeps its size (all ranks must step together) and the run goes on.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset, get_worker_info

from brivl_ds.data import content_ids, epoch_layout
from brivl_ds.data.dataset import Sample
from brivl_ds.data.shards import shard_index

log = logging.getLogger(__name__)
COLUMNS = ["id", "image", "text", "boxes"]


@dataclass
class StreamState:
    """The data position saved in every checkpoint: the epoch's current deal (epoch_layout.py) and the earlier ones."""
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` this rank has consumed, over all its deals
    streams: int = 1  # workers the current deal was laid out for
    world: int = 1
    fingerprint: str = ""
    batch_size: int = 0  # per rank, of the current deal; 0: not recorded (a checkpoint from before re-dealing)
    block_rows: int = 0  # shuffle block of the current deal; 0: not recorded
    history: list[epoch_layout.Deal] = field(default_factory=list)  # earlier deals of this epoch, oldest first

    def __post_init__(self):  # rebuilt from a checkpoint's dict: StreamState(**dataclasses.asdict(state))
        self.history = [h if isinstance(h, epoch_layout.Deal) else epoch_layout.Deal(**h) for h in self.history]

    @property
    def deal_start(self) -> int:
        """Position of the current deal's first batch: the batches consumed under the earlier deals."""
        return sum(h.consumed for h in self.history)

    def deals(self) -> list[epoch_layout.Deal]:
        """The epoch's deals, the current one last with what it has consumed so far."""
        return self.history + [epoch_layout.Deal(self.world, self.batch_size, self.streams, self.block_rows,
                                                 self.batch_in_epoch - self.deal_start)]


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

    meta: position (index in the rank's epoch sequence, over all its deals; checked by the trainer), ids, skipped
    (rows replaced).
    """

    def __init__(self, path: str | Path, transform, collate, batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, block_rows: int = 1024):
        self.shards = shard_index(path)
        self.row_groups = np.array([n for info in self.shards for n in info.row_groups], dtype=np.int64)
        self.total_rows = int(self.row_groups.sum())
        self.transform, self.collate = transform, collate
        self.batch_size, self.rank, self.world, self.seed, self.block_rows = batch_size, rank, world, seed, block_rows
        # batches per rank in the current epoch
        self.batches_per_epoch = epoch_layout.batches_per_epoch(self.total_rows, world, batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{self.total_rows} rows in {path} cannot fill one global batch of "
                             f"{batch_size} x {world} ranks")
        self.fingerprint = epoch_layout.fingerprint(self.row_groups)
        self.state = StreamState(world=world, fingerprint=self.fingerprint, batch_size=batch_size,
                                 block_rows=block_rows)
        self._reader: RowGroupReader | None = None

    def set_position(self, state: StreamState, num_workers: int | None = None) -> None:
        """Continue from `state`: a fresh epoch, or a checkpoint's mid-epoch position, continued exactly. A
        mid-epoch checkpoint of another world size or per-rank batch size (same data) is re-dealt (epoch_layout.py): the
        rows no rank has consumed are dealt to this run's ranks, laid out for `num_workers` DataLoader workers
        (default: as the checkpoint's deal was), and positions go on from `state.batch_in_epoch`. Raises ValueError
        when the resume cannot be exact."""
        if not state.batch_in_epoch:  # an epoch boundary: laid out for this run
            state = StreamState(state.epoch, 0, state.streams, block_rows=self.block_rows)
        else:
            if state.fingerprint != self.fingerprint:
                raise ValueError(
                    f"cannot resume mid-epoch {state.epoch} exactly: the checkpoint was taken on data "
                    f"{state.fingerprint}, this run has data {self.fingerprint}. Resume with the same shards, or "
                    "from a checkpoint at an epoch boundary.")
            if not state.batch_size and state.world != self.world:
                raise ValueError(
                    f"cannot resume mid-epoch {state.epoch} exactly: the checkpoint was taken with {state.world} "
                    f"ranks and records no per-rank batch size (it predates re-dealing); this run has {self.world} "
                    "ranks. Resume with the same ranks, or from a checkpoint at an epoch boundary.")
            # What a checkpoint from before re-dealing did not record was this run's, as it has always been taken.
            state = replace(state, batch_size=state.batch_size or self.batch_size,
                            block_rows=state.block_rows or self.block_rows)
            if (state.world, state.batch_size) != (self.world, self.batch_size):  # re-deal the rest of the epoch
                done = state.deals()[-1]
                state = StreamState(state.epoch, state.batch_in_epoch,
                                    state.streams if num_workers is None else max(1, num_workers),
                                    block_rows=self.block_rows,
                                    history=state.history + ([done] if done.consumed else []))
        # A continued deal keeps its recorded shuffle block: the order of its remaining batches depends on it.
        self.state = StreamState(state.epoch, state.batch_in_epoch, state.streams, self.world, self.fingerprint,
                                 self.batch_size, state.block_rows, list(state.history))
        # Sized (and checked) here, so that an impossible re-deal fails at resume time, not in a DataLoader worker.
        self.batches_per_epoch = self.state.deal_start + epoch_layout.deal_batches_per_rank(
            self.total_rows, self.state.epoch, self.seed, self.state.deals())

    def start_epoch(self, epoch: int, num_workers: int) -> None:
        self.set_position(StreamState(epoch, 0, max(1, num_workers)))

    def __len__(self) -> int:
        return self.batches_per_epoch - self.state.batch_in_epoch

    def epoch_batches(self) -> list[np.ndarray]:
        """This rank's batches of the current deal, in order (row ids): batch i has position deal_start + i. Only a
        re-deal's last batch may be smaller than batch_size."""
        return epoch_layout.deal_batches(self.row_groups, self.state.epoch, self.seed, self.state.deals(), self.rank)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        batches, first = self.epoch_batches(), self.state.deal_start
        for i in epoch_layout.worker_positions(len(batches), self.state.batch_in_epoch - first, worker, workers):
            yield self._batch(first + i, batches[i])

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
                samples.append(Sample(image, boxes, mask, raw.text, row, content_ids.image_id(raw.image)))
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
