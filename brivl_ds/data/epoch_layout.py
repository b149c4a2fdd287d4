"""Which rows each data-parallel rank reads in an epoch, and in which order: pure functions of the row-group sizes,
the seed and the layout, so every rank and DataLoader worker computes its share without talking to the others.

Epoch e, seed s, R ranks, per-rank batch b:
  1. Row groups (the Parquet read unit) are permuted with rng(s, e) and concatenated: the epoch's row sequence. A
     row's index in it is its epoch position.
  2. Its tail is dropped so that the length is a multiple of R * b: the global batch stays constant. The dropped rows
     differ from epoch to epoch, since the row-group order does.
  3. Rank r takes the r-th of R equal contiguous spans: it only ever reads the row groups inside its span.
  4. The span is cut into shuffle blocks of `block_rows` rows (a multiple of b); each block's rows are permuted with
     rng(s, e, r, block). A DataLoader worker holds one block of encoded images in memory at a time.
  5. Blocks are dealt round-robin to `streams` streams (one per DataLoader worker) and the rank's batch sequence
     interleaves the streams' batches round-robin, so that worker w, which produces batches w, w + W, w + 2W, ...
     of the sequence (the order PyTorch's DataLoader yields them in), reads whole blocks of its own - except near the
     end of the epoch, once the streams run out unevenly, when a worker may read a few rows of another's blocks.

Resuming mid-epoch on the same ranks needs only (epoch, batches consumed, streams the epoch was laid out for): the
remaining batches are the tail of the same sequence, dealt to however many workers there are now.

Re-dealing: resuming mid-epoch with another number of ranks or per-rank batch size. An epoch is then a list of
deals (`Deal`: world, per-rank batch, shuffle block, streams, and the batches each rank consumed under it); the
first is the layout above, each later one deals the rows that no rank consumed under the earlier ones:
  a. The remainder, in epoch order. A rank's consumed batches are the first c of its sequence, which is, per stream,
     a prefix of its blocks: the remainder is every untouched block whole plus, per stream, the rest of the block it
     was reading. Every rank computes it for all ranks from the deals alone, expanding only those partly read
     blocks, so it stays cheap on a large epoch.
  b. Steps 3-5 on the remainder, with nothing dropped (its rows were promised to this epoch): of M rows, each of
     the R' new ranks takes M // (R' b') batches of b' rows, then the L = M mod (R' b') rows left form one last,
     smaller global batch, split over the ranks in sizes that differ by at most one (the first L mod R' ranks take
     one more) and comes last in every rank's sequence. Spans stay contiguous, so a rank still reads nearby row
     groups; every rank has the same batch count, so ranks step together; block shuffles use rng(s, e, r, block,
     d) for deal d. If 0 < L < R', some rank would get an empty batch: that world size is refused, naming those
     that work.
Every row of the first deal's epoch is trained on exactly once, whatever chain of deals the epoch went through.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Deal:
    """How (the rest of) an epoch was dealt; `consumed`: batches each rank took under it before the next deal."""
    world: int
    batch_size: int  # per rank
    streams: int = 1  # DataLoader workers the deal is laid out for
    block_rows: int = 1024  # shuffle block, rounded down to a multiple of batch_size
    consumed: int = 0

    def __post_init__(self):
        if min(self.world, self.batch_size, self.streams, self.block_rows) < 1 or self.consumed < 0:
            raise ValueError(f"invalid deal {self}")

    @property
    def block_batches(self) -> int:
        return max(1, self.block_rows // self.batch_size)


@dataclass(frozen=True)
class Layout:
    """One rank's view of an epoch's first deal."""
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

    @property
    def deal(self) -> Deal:
        return Deal(self.world, self.batch_size, self.streams, self.block_rows)


def fingerprint(row_groups: np.ndarray) -> str:
    """Identifies the dataset's row layout: a mid-epoch resume on different shards would not be exact."""
    return hashlib.sha256(np.asarray(row_groups, dtype=np.int64).tobytes()).hexdigest()[:16]


def batches_per_epoch(total_rows: int, world: int, batch_size: int) -> int:
    return total_rows // (world * batch_size)


def rows_at(row_groups: np.ndarray, epoch: int, seed: int, positions: np.ndarray) -> np.ndarray:
    """Global row ids (canonical order: shards in manifest order, rows in file order) at epoch positions."""
    sizes = np.asarray(row_groups, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    order = np.random.default_rng([seed, epoch]).permutation(len(sizes))
    ends = np.cumsum(sizes[order])
    g = np.searchsorted(ends, positions, side="right")
    return starts[order[g]] + positions - (ends[g] - sizes[order[g]])


# ---------------------------------------------------------------------------------- sets of positions, as runs
# A set of epoch positions in increasing order is kept as runs, int64 [n, 2] of [start, end): a remainder is a few
# long stretches plus the scattered rests of partly read blocks, never expanded whole.
def _runs(sorted_positions: np.ndarray) -> np.ndarray:
    p = np.asarray(sorted_positions, dtype=np.int64)
    if not len(p):
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(p) != 1) + 1
    return np.stack([p[np.r_[0, breaks]], p[np.r_[breaks - 1, len(p) - 1]] + 1], axis=1)


def expand(runs: np.ndarray) -> np.ndarray:
    """The positions that `runs` describes, in order."""
    lengths = runs[:, 1] - runs[:, 0]
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(runs[:, 0] - offsets, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def _take(runs: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Items lo..hi-1 of the sequence that `runs` describes, as runs."""
    if lo >= hi:
        return np.zeros((0, 2), dtype=np.int64)
    ends = np.cumsum(runs[:, 1] - runs[:, 0])
    first, last = int(np.searchsorted(ends, lo, side="right")), int(np.searchsorted(ends, hi, side="left"))
    out = runs[first:last + 1].copy()
    out[0, 0] += lo - (ends[first] - (runs[first, 1] - runs[first, 0]))
    out[-1, 1] -= ends[last] - hi
    return out


def count(runs: np.ndarray) -> int:
    return int((runs[:, 1] - runs[:, 0]).sum())


# ------------------------------------------------------------------------------------------------------ deals
def split(rows: int, world: int, batch_size: int) -> tuple[int, np.ndarray]:
    """How a deal cuts `rows` rows (step b): every rank takes `full` batches of batch_size rows, then, if any rows
    are left, one more batch of last[r] rows (>= 1 on every rank)."""
    full, left = divmod(rows, world * batch_size)
    if 0 < left < world:
        fits = [w for w in range(1, 2 * world + 9) if w <= rows and not 0 < rows % (w * batch_size) < w]
        raise ValueError(
            f"cannot deal the {rows} rows left in this epoch to {world} ranks x {batch_size} rows per batch: the "
            f"last global batch would have {left} rows, fewer than one per rank. World sizes that work with this "
            f"per-rank batch size: {fits}; or change the per-rank batch size, or resume from an epoch boundary.")
    last = left // world + (np.arange(world) < left % world)
    return full, last.astype(np.int64)


def _cut(rows: int, deal: Deal) -> tuple[np.ndarray, np.ndarray]:
    """A deal of `rows` rows: the span-order index of each batch in every rank's sequence (all ranks alike), and
    the ranks' span offsets [world + 1]."""
    full, last = split(rows, deal.world, deal.batch_size)
    order = _sequence(full + int(last.any()), deal.block_batches, deal.streams)
    if last.any():  # the smaller batch goes last, so that all the others are full (it ends its block and stream)
        order = np.r_[order[order != full], full]
    return order, np.concatenate([[0], np.cumsum(full * deal.batch_size + last)])


def _sequence(num_batches: int, block_batches: int, streams: int) -> np.ndarray:
    """Span-order index of the batch at each place of the rank's sequence (step 5): stream s owns blocks s, s + S,
    ...; the sequence takes one batch from each live stream in turn, i.e. sorts by (index in stream, stream)."""
    j = np.arange(num_batches)
    block = j // block_batches
    in_stream = block // streams * block_batches + j % block_batches  # every earlier block of a stream is full
    return np.lexsort((block % streams, in_stream))


def _shuffle(block: np.ndarray, seed: int, epoch: int, rank: int, k: int, d: int) -> np.ndarray:
    key = [seed, epoch, rank, k] + ([d] if d else [])  # the first deal keeps the original layout's keys
    return block[np.random.default_rng(key).permutation(len(block))]


def _first_rows(total_rows: int, deal: Deal) -> np.ndarray:
    kept = batches_per_epoch(total_rows, deal.world, deal.batch_size) * deal.world * deal.batch_size
    return np.array([[0, kept]] if kept else np.zeros((0, 2)), dtype=np.int64)


def _after(rows: np.ndarray, deal: Deal, d: int, epoch: int, seed: int) -> np.ndarray:
    """What is left of `rows` (runs) once every rank has consumed `deal.consumed` batches of deal number d."""
    order, offsets = _cut(count(rows), deal)
    n, b, bb = len(order), deal.batch_size, deal.block_batches
    if deal.consumed > n:
        raise ValueError(f"{deal} consumed more than its {n} batches per rank")
    blocks = -(-n // bb)
    # Per block, how many of its batches were consumed: within a stream, batches go in span order.
    taken = np.bincount(order[:deal.consumed] // bb, minlength=blocks)
    whole = np.flatnonzero(np.diff(np.r_[0, (taken == 0).astype(np.int8), 0])).reshape(-1, 2)  # untouched stretches
    partial = np.flatnonzero((taken > 0) & (taken < np.minimum(bb, n - np.arange(blocks) * bb)))
    pieces = []
    for rank in range(deal.world):
        span = _take(rows, offsets[rank], offsets[rank + 1])
        start = np.minimum(np.arange(blocks + 1) * bb * b, offsets[rank + 1] - offsets[rank])  # block k's first item
        kept = [(k0, _take(span, start[k0], start[k1])) for k0, k1 in whole]
        for k in partial:
            block = _shuffle(expand(_take(span, start[k], start[k + 1])), seed, epoch, rank, k, d)
            kept.append((k, _runs(np.sort(block[taken[k] * b:]))))
        pieces += [runs for _, runs in sorted(kept, key=lambda piece: piece[0])]
    return np.concatenate(pieces) if pieces else np.zeros((0, 2), dtype=np.int64)


def _dealt_rows(total_rows: int, epoch: int, seed: int, deals: list[Deal]) -> np.ndarray:
    """Runs of the positions that deals[-1] deals: the first deal's epoch, less what the earlier deals consumed."""
    rows = _first_rows(total_rows, deals[0])
    for d, deal in enumerate(deals[:-1]):
        rows = _after(rows, deal, d, epoch, seed)
    return rows


def remaining(total_rows: int, epoch: int, seed: int, deals: list[Deal]) -> np.ndarray:
    """Epoch positions (runs, in epoch order) that no rank has consumed once every deal consumed its batches."""
    return _after(_dealt_rows(total_rows, epoch, seed, deals), deals[-1], len(deals) - 1, epoch, seed)


def deal_batches_per_rank(total_rows: int, epoch: int, seed: int, deals: list[Deal]) -> int:
    """Batches every rank has in deals[-1]; raises ValueError if that deal cannot give each rank a row."""
    return len(_cut(count(_dealt_rows(total_rows, epoch, seed, deals)), deals[-1])[0])


def deal_batches(row_groups: np.ndarray, epoch: int, seed: int, deals: list[Deal], rank: int) -> list[np.ndarray]:
    """Rank `rank`'s batches under deals[-1] (its `consumed` unused), in the order trained: global row ids, int64;
    only a re-deal's last batch may be smaller than the batch size."""
    deal, d = deals[-1], len(deals) - 1
    if not 0 <= rank < deal.world:
        raise ValueError(f"rank {rank} outside world {deal.world}")
    rows = _dealt_rows(int(np.sum(row_groups)), epoch, seed, deals)
    order, offsets = _cut(count(rows), deal)
    span = expand(_take(rows, offsets[rank], offsets[rank + 1]))
    step = deal.block_batches * deal.batch_size
    blocks = [_shuffle(span[lo:lo + step], seed, epoch, rank, k, d) for k, lo in enumerate(range(0, len(span), step))]
    ids = rows_at(row_groups, epoch, seed, np.concatenate(blocks)) if blocks else span
    bounds = np.minimum(np.arange(len(order) + 1) * deal.batch_size, len(span))
    return [ids[bounds[j]:bounds[j + 1]] for j in order]


def rank_batches(row_groups: np.ndarray, epoch: int, layout: Layout) -> np.ndarray:
    """This rank's batches for an epoch's first deal: int64 [batches, batch_size] of global row ids, in order."""
    batches = deal_batches(row_groups, epoch, layout.seed, [layout.deal], layout.rank)
    return np.stack(batches) if batches else np.zeros((0, layout.batch_size), dtype=np.int64)


def worker_positions(num_batches: int, start: int, worker: int, num_workers: int) -> range:
    """Positions in the rank's sequence that DataLoader worker `worker` produces, from batch `start` on: PyTorch's
    DataLoader yields worker 0's first batch, worker 1's first, ..., so these come out in sequence order."""
    return range(start + worker, num_batches, num_workers)
