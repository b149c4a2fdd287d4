"""Which rows each data-parallel rank reads in an epoch, and in which order: pure functions of the row-group sizes,
the seed and the layout, so every rank and DataLoader worker computes its share without talking to the others.

Epoch e, seed s, R ranks, per-rank batch b:
  1. Row groups (the Parquet read unit) are permuted with rng(s, e) and concatenated: the epoch's row sequence.
  2. Its tail is dropped so that the length is a multiple of R * b: the global batch stays constant. The dropped rows
     differ from epoch to epoch, since the row-group order does.
  3. Rank r takes the r-th of R equal contiguous spans: it only ever reads the row groups inside its span.
  4. The span is cut into shuffle blocks of `block_rows` rows (a multiple of b); each block's rows are permuted with
     rng(s, e, r, block). A DataLoader worker holds one block of encoded images in memory at a time.
  5. Blocks are dealt round-robin to `streams` streams (one per DataLoader worker) and the rank's batch sequence
     interleaves the streams' batches round-robin, so that worker w, which produces batches w, w + W, w + 2W, ...
     of the sequence (the order PyTorch's DataLoader yields them in), reads whole blocks of its own - except near the
     end of the epoch, once the streams run out unevenly, when a worker may read a few rows of another's blocks.

Resuming mid-epoch needs only (epoch, batches consumed, streams the epoch was laid out for): the remaining batches
are the tail of the same sequence, dealt to however many workers there are now.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    world: int
    rank: int
    batch_size: int  # per rank
    block_rows: int  # shuffle block, rounded down to a multiple of batch_size
    streams: int  # DataLoader workers the epoch is laid out for (>= 1)
    seed: int

    def __post_init__(self):
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside world {self.world}")
        if self.batch_size < 1 or self.streams < 1:
            raise ValueError("batch_size and streams must be >= 1")

    @property
    def block_batches(self) -> int:
        return max(1, self.block_rows // self.batch_size)


def fingerprint(row_groups: np.ndarray) -> str:
    """Identifies the dataset's row layout: a mid-epoch resume on different shards would not be exact."""
    return hashlib.sha256(np.asarray(row_groups, dtype=np.int64).tobytes()).hexdigest()[:16]


def batches_per_epoch(total_rows: int, world: int, batch_size: int) -> int:
    return total_rows // (world * batch_size)


def rank_rows(row_groups: np.ndarray, epoch: int, layout: Layout) -> np.ndarray:
    """Global row ids (canonical order: shards in manifest order, rows in file order) of this rank's span, in epoch
    order, before block shuffling. Only the row groups overlapping the span are expanded."""
    sizes = np.asarray(row_groups, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    order = np.random.default_rng([layout.seed, epoch]).permutation(len(sizes))
    ends_in_epoch = np.cumsum(sizes[order])
    span = batches_per_epoch(int(sizes.sum()), layout.world, layout.batch_size) * layout.batch_size
    lo, hi = layout.rank * span, (layout.rank + 1) * span
    if span == 0:
        return np.zeros(0, dtype=np.int64)
    first = int(np.searchsorted(ends_in_epoch, lo, side="right"))
    last = int(np.searchsorted(ends_in_epoch, hi - 1, side="right"))
    pieces = [np.arange(starts[g], starts[g] + sizes[g]) for g in order[first:last + 1]]
    rows = np.concatenate(pieces)
    skip = lo - (ends_in_epoch[first] - sizes[order[first]])  # rows of the first group that belong to rank r-1
    return rows[skip:skip + span]


def rank_batches(row_groups: np.ndarray, epoch: int, layout: Layout) -> np.ndarray:
    """This rank's batches for the epoch: int64 [batches, batch_size] of global row ids, in the order trained."""
    rows = rank_rows(row_groups, epoch, layout)
    b, block = layout.batch_size, layout.block_batches * layout.batch_size
    blocks = []
    for k, start in enumerate(range(0, len(rows), block)):
        chunk = rows[start:start + block]
        rng = np.random.default_rng([layout.seed, epoch, layout.rank, k])
        blocks.append(chunk[rng.permutation(len(chunk))].reshape(-1, b))
    # Stream s owns blocks s, s + S, ...; the sequence takes one batch from each live stream in turn.
    streams = [np.concatenate(blocks[s::layout.streams]) if blocks[s::layout.streams] else np.zeros((0, b), np.int64)
               for s in range(layout.streams)]
    sequence, cursor = [], [0] * layout.streams
    while len(sequence) < len(rows) // b:
        for s in range(layout.streams):
            if cursor[s] < len(streams[s]):
                sequence.append(streams[s][cursor[s]])
                cursor[s] += 1
    return np.stack(sequence) if sequence else np.zeros((0, b), dtype=np.int64)


def worker_positions(num_batches: int, start: int, worker: int, num_workers: int) -> range:
    """Positions in the rank's sequence that DataLoader worker `worker` produces, from batch `start` on: PyTorch's
    DataLoader yields worker 0's first batch, worker 1's first, ..., so these come out in sequence order."""
    return range(start + worker, num_batches, num_workers)
