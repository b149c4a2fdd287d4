"""Streaming training data: partition over ranks x workers, per-epoch shuffle, exact mid-epoch resume (also on
another world size or per-rank batch size: re-dealing), bad rows."""
import dataclasses
import hashlib
import itertools
import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from brivl_ds.config import AugmentConfig
from brivl_ds.data import epoch_layout
from brivl_ds.data.dataset import Collator
from brivl_ds.data.shards import Row, shard_index, write_shards
from brivl_ds.data.stream import ShardStream, StreamState
from brivl_ds.data.tokenizer import load_tokenizer
from brivl_ds.data.transforms import PairTransform


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12), world=st.integers(1, 4),
       batch=st.integers(1, 5), block=st.integers(1, 30), streams=st.integers(1, 4), epoch=st.integers(0, 3))
def test_every_row_is_read_once_per_epoch_by_exactly_one_rank(sizes, world, batch, block, streams, epoch):
    sizes = np.array(sizes)
    total = int(sizes.sum())
    per_rank = []
    for rank in range(world):
        layout = epoch_layout.Layout(world, rank, batch, block, streams, seed=7)
        per_rank.append(epoch_layout.rank_batches(sizes, epoch, layout))
    steps = epoch_layout.batches_per_epoch(total, world, batch)
    assert all(b.shape == (steps, batch) for b in per_rank)  # every rank steps together
    rows = np.concatenate([b.ravel() for b in per_rank])
    assert len(np.unique(rows)) == len(rows)  # no overlap
    assert len(rows) == total - total % (world * batch)  # no gap beyond the dropped partial global batch
    assert rows.min(initial=0) >= 0 and rows.max(initial=0) < total


@settings(max_examples=40, deadline=None)
@given(num_batches=st.integers(0, 50), start=st.integers(0, 50), workers=st.integers(1, 6))
def test_workers_split_the_remaining_batches_in_dataloader_order(num_batches, start, workers):
    per_worker = [list(epoch_layout.worker_positions(num_batches, start, w, workers)) for w in range(workers)]
    # PyTorch's DataLoader takes one batch from each worker in turn; workers that run out are the last ones.
    order = [p for i in range(max(map(len, per_worker))) for w in per_worker if i < len(w) for p in [w[i]]]
    assert order == list(range(start, num_batches))


def test_order_is_a_function_of_seed_and_epoch():
    sizes = np.array([30, 7, 25, 40, 12])

    def batches(seed, epoch):
        return epoch_layout.rank_batches(sizes, epoch, epoch_layout.Layout(2, 1, 4, 16, 2, seed))

    # every rank and DataLoader worker computes the order on its own, whatever its global RNGs went through
    # (seeded per rank, advanced by augmentations): the order must not read them
    first, saved = batches(3, 0), (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        for state in (1, 2):
            random.seed(state)
            np.random.seed(state)
            torch.manual_seed(state)
            np.testing.assert_array_equal(batches(3, 0), first)
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
    # nor anything of this process (hash seed, import order): the order pinned below, computed in another process
    assert hashlib.sha256(first.astype(np.int64).tobytes()).hexdigest()[:16] == "47b970c428868b17"
    assert not np.array_equal(batches(3, 0), batches(3, 1))
    assert not np.array_equal(batches(3, 0), batches(4, 0))
    # a shuffle block mixes rows of different row groups within a batch
    starts = np.cumsum(sizes) - sizes
    groups = np.searchsorted(starts, batches(3, 0), side="right") - 1
    assert any(len(set(g)) > 1 for g in groups.tolist())


# The layout before re-dealing existed (sha256 of rank_batches as then computed): an epoch that is never re-dealt
# keeps exactly that order, so checkpoints of earlier runs resume exactly.
@pytest.mark.parametrize("sizes, world, rank, batch, block, streams, seed, epoch, shape, digest", [
    ([30, 7, 25, 40, 12], 2, 1, 4, 16, 2, 3, 0, (14, 4), "47b970c428868b17"),
    ([30, 7, 25, 40, 12], 3, 2, 5, 7, 3, 9, 2, (7, 5), "01664ad016bc0c79"),
    ([100] * 9 + [37], 4, 3, 8, 32, 2, 11, 1, (29, 8), "92269660db9373ea"),
    ([5, 1, 13, 64, 2, 9], 1, 0, 3, 1, 4, 0, 5, (31, 3), "c5afb6eeb48cab90"),
    ([1024, 800, 1024, 333], 2, 0, 16, 1024, 8, 11, 4, (99, 16), "6d203059f1898559"),
])
def test_an_epoch_that_is_not_redealt_keeps_its_order_bit_for_bit(sizes, world, rank, batch, block, streams, seed,
                                                                  epoch, shape, digest):
    got = epoch_layout.rank_batches(np.array(sizes), epoch,
                                    epoch_layout.Layout(world, rank, batch, block, streams, seed))
    assert got.shape == shape and hashlib.sha256(got.astype(np.int64).tobytes()).hexdigest()[:16] == digest


def epoch_rows(sizes, epoch, first: epoch_layout.Deal, seed):
    """Row ids of an epoch as its first deal lays it out, every rank."""
    return [r for rank in range(first.world) for b in epoch_layout.deal_batches(sizes, epoch, seed, [first], rank)
            for r in b.tolist()]


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=10), epoch=st.integers(0, 3),
       chain=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 3), st.integers(1, 20),
                                st.floats(0, 1)), min_size=2, max_size=4))
def test_redeals_hand_out_every_row_of_the_epoch_once(sizes, epoch, chain):
    """A chain of deals (world, batch, streams, block; the fraction of its batches consumed before the next one):
    rows consumed under each deal, plus all of the last one's, are the first deal's epoch, each once."""
    sizes, seed = np.array(sizes), 5
    expected = epoch_rows(sizes, epoch, epoch_layout.Deal(*chain[0][:4]), seed)
    deals, seen = [], []
    for i, (world, batch, streams, block, fraction) in enumerate(chain):
        deal, left = epoch_layout.Deal(world, batch, streams, block), len(expected) - len(seen)
        try:
            per_rank = [epoch_layout.deal_batches(sizes, epoch, seed, deals + [deal], r) for r in range(world)]
        except ValueError as err:  # refused only when the last global batch would leave a rank without a row
            assert 0 < left % (world * batch) < world and "World sizes that work" in str(err)
            return
        n = epoch_layout.deal_batches_per_rank(int(sizes.sum()), epoch, seed, deals + [deal])
        assert all(len(b) == n for b in per_rank)  # ranks step together
        lengths = np.array([[len(x) for x in b] for b in per_rank]).reshape(world, n)
        assert (lengths[:, :-1] == batch).all() and (lengths >= 1).all() and (lengths <= batch).all()
        assert n == 0 or np.ptp(lengths[:, -1]) <= 1  # a smaller last batch is split evenly
        consumed = n if i == len(chain) - 1 else int(fraction * n)
        seen += [r for b in per_rank for x in b[:consumed] for r in x.tolist()]
        deals.append(dataclasses.replace(deal, consumed=consumed))
        remainder = epoch_layout.expand(epoch_layout.remaining(int(sizes.sum()), epoch, seed, deals))
        left_rows = epoch_layout.rows_at(sizes, epoch, seed, remainder)
        assert sorted(left_rows.tolist()) == sorted(set(expected) - set(seen))
    assert len(seen) == len(set(seen)) and sorted(seen) == sorted(expected)


def test_a_world_size_that_cannot_be_dealt_is_refused_naming_those_that_can():
    sizes, seed = np.array([60, 80, 50, 66]), 1  # 256 rows: 2 ranks x 7 keep 252, 18 batches a rank
    # 252 - 70 = 182 rows left; 4 x 9 leaves 182 % 36 = 2 rows < 4 ranks
    before = epoch_layout.Deal(2, 7, 2, 16, consumed=5)
    with pytest.raises(ValueError, match=r"182 rows left .* 4 ranks x 9 .* World sizes that work .*: \[(.*)\]") as err:
        epoch_layout.deal_batches_per_rank(256, 0, seed, [before, epoch_layout.Deal(4, 9)])
    fits = [int(w) for w in err.value.args[0].split("[")[1].split("]")[0].split(", ")]
    assert 3 in fits and 4 not in fits and 5 not in fits  # 182 % 45 = 2 < 5 too
    for world in fits:  # and those do deal
        assert epoch_layout.deal_batches_per_rank(256, 0, seed, [before, epoch_layout.Deal(world, 9)]) == \
            -(-182 // (9 * world))


# --------------------------------------------------------------------------------------------------------- real shards
@pytest.fixture(scope="module")
def stream_parts(shapes_data):
    tokenizer = load_tokenizer(shapes_data["tokenizer"])
    transform = PairTransform(AugmentConfig(crop_scale_min=0.5, hflip_prob=0.5), 32, 8, 0, train=True)
    return shapes_data["train"], transform, Collator(tokenizer, 40)


def make_stream(parts, rank=0, world=1, batch=8, block=32, cls=ShardStream):
    path, transform, collate = parts
    return cls(path, transform, collate, batch, rank, world, seed=11, block_rows=block)


class RowStream(ShardStream):
    """The stream's positions and row ids without reading images: for tests about which rows go where."""

    def _batch(self, position, ids):
        return None, {"position": position, "rows": ids.tolist()}


def collect(stream, workers):
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return [(meta["position"], meta["rows"], batch.images) for batch, meta in loader]


def test_dataloader_workers_yield_the_rank_sequence_in_order(stream_parts):
    stream = make_stream(stream_parts)
    assert len(shard_index(stream_parts[0])) > 1 and len(stream.row_groups) > 1
    stream.start_epoch(0, num_workers=2)
    got = collect(stream, workers=2)
    expected = stream.epoch_batches()
    assert [p for p, _, _ in got] == list(range(len(expected)))
    assert [rows for _, rows, _ in got] == [b.tolist() for b in expected]
    assert all(images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32) for _, _, images in got)


def test_mid_epoch_resume_gives_exactly_the_remaining_batches(stream_parts):
    full = make_stream(stream_parts)
    full.start_epoch(1, num_workers=2)
    uninterrupted = collect(full, workers=2)
    # a checkpoint after 5 batches, resumed in a fresh object with a different number of workers
    resumed = make_stream(stream_parts)
    resumed.set_position(StreamState(epoch=1, batch_in_epoch=5, streams=2, world=1, fingerprint=full.fingerprint))
    rest = collect(resumed, workers=1)
    assert [(p, r) for p, r, _ in rest] == [(p, r) for p, r, _ in uninterrupted[5:]]
    for (_, _, a), (_, _, b) in zip(rest, uninterrupted[5:]):
        assert torch.equal(a, b)  # the same augmentations, whatever the worker layout


def test_ranks_partition_an_epoch_and_an_old_checkpoint_on_other_ranks_is_refused(stream_parts):
    streams = [make_stream(stream_parts, rank=r, world=3) for r in range(3)]
    rows = []
    for s in streams:
        s.start_epoch(0, num_workers=1)
        rows += [r for b in s.epoch_batches() for r in b.tolist()]
    assert len(rows) == len(set(rows)) == streams[0].total_rows - streams[0].total_rows % 24
    other = make_stream(stream_parts, world=1)
    # a checkpoint from before re-dealing records no per-rank batch size: the rest of its epoch is unknown
    with pytest.raises(ValueError, match="same ranks"):
        other.set_position(StreamState(epoch=0, batch_in_epoch=3, streams=1, world=3,
                                       fingerprint=other.fingerprint))


def test_undecodable_rows_are_replaced_and_counted(stream_parts, tmp_path):
    path, transform, collate = stream_parts
    table = pq.read_table(shard_index(path)[0].path)
    rows = table.to_pylist()[:24]
    for i in (3, 4, 17):
        rows[i]["image"] = rows[i]["image"][:200]  # truncated JPEG
    rows[9]["text"] = "   "
    write_shards([Row(**r) for r in rows], tmp_path, rows_per_shard=10)
    stream = ShardStream(tmp_path, transform, collate, 8, seed=0, block_rows=8)
    stream.start_epoch(0, num_workers=0)
    metas = [meta for _, meta in DataLoader(stream, batch_size=None)]
    assert all(len(m["rows"]) == 8 for m in metas)
    assert sorted(r for m in metas for r in m["skipped_rows"]) == [3, 4, 9, 17]
    assert sum(m["skipped"] for m in metas) == 4
    assert not {3, 4, 9, 17} & {r for m in metas for r in m["rows"]}


def test_a_checkpoint_position_round_trips_and_an_old_mid_epoch_one_is_refused(stream_parts):
    from brivl_ds.checkpointing.state import Position

    stream = make_stream(stream_parts)
    stream.start_epoch(2, num_workers=3)
    pos = Position(step=7, samples=56, data=stream.state)
    assert Position.from_dict(dataclasses.asdict(pos)) == pos
    old = Position.from_dict({"step": 7, "epoch": 2, "batch_in_epoch": 5, "samples": 56, "skipped_rows": 0})
    with pytest.raises(ValueError, match="cannot resume mid-epoch"):
        stream.set_position(old.data)


# ---------------------------------------------------------------------------------------------------- re-dealing
def train_ranks(parts, world, batch, checkpoint, batches=None, workers=1, block=32):
    """`world` ranks resume from `checkpoint` (a saved position's JSON; None: epoch 1 from its start) and train
    `batches` batches each (None: to the end of the epoch) in step, checking positions as the trainer does.
    Returns the rows they trained on and the checkpoint they would save next (the same on every rank)."""
    rows, saved = [], set()
    for rank in range(world):
        stream = make_stream(parts, rank=rank, world=world, batch=batch, block=block, cls=RowStream)
        if checkpoint is None:
            stream.start_epoch(1, workers)
        else:
            stream.set_position(StreamState(**json.loads(checkpoint)), num_workers=workers)
        state, remaining = stream.state, len(stream)
        metas = [meta for _, meta in itertools.islice(stream, batches)]
        assert len(metas) == (remaining if batches is None else batches)  # len(): the batches left
        for meta in metas:
            assert meta["position"] == state.batch_in_epoch
            rows += meta["rows"]
            state.batch_in_epoch += 1
        saved.add(json.dumps(dataclasses.asdict(state)))
    assert len(saved) == 1
    return rows, saved.pop()


@pytest.mark.parametrize("runs", [
    [(4, 8, 32, 3), (2, 8, 32, None)],  # 160 rows left: 2 x 8 deal them exactly
    [(2, 8, 32, 5), (4, 8, 16, None)],  # 176 left: 5 global batches of 32, then one of 16 (4 a rank)
    [(2, 8, 32, 5), (2, 16, 32, None)],  # the per-rank batch size changes, the world does not
    # a chain within one epoch, with a resume on the same ranks after a re-deal (it goes on with that deal, in its
    # recorded shuffle blocks) and a last global batch of 13 rows: 5 + 4 + 4
    [(4, 8, 32, 3), (2, 12, 24, 2), (2, 12, 48, 1), (3, 5, 10, None)],
], ids=["4to2", "2to4", "batch8to16", "4to2to2to3"])
def test_resumes_on_other_world_sizes_mid_epoch_train_on_each_row_once(stream_parts, runs):
    (world, batch, block, _), seen, checkpoint = runs[0], [], None
    expected = epoch_rows(make_stream(stream_parts).row_groups, 1, epoch_layout.Deal(world, batch, 1, block), seed=11)
    for world, batch, block, batches in runs:
        rows, checkpoint = train_ranks(stream_parts, world, batch, checkpoint, batches, block=block)
        seen += rows
    assert len(seen) == len(set(seen)) and sorted(seen) == sorted(expected)
    assert len(StreamState(**json.loads(checkpoint)).history) == len({run[:2] for run in runs}) - 1
    # the epoch is over on every rank: a later resume, on any world, has nothing left of it
    rest, _ = train_ranks(stream_parts, 4, 8, checkpoint)
    assert rest == []


def test_after_a_redeal_dataloader_workers_do_not_change_the_sequence(stream_parts):
    _, checkpoint = train_ranks(stream_parts, 4, 8, None, batches=3, workers=2)
    stream = make_stream(stream_parts, rank=1, world=2, batch=12)
    stream.set_position(StreamState(**json.loads(checkpoint)), num_workers=2)
    one, three = collect(stream, workers=0), collect(stream, workers=3)
    # 160 rows left: 6 batches of 2 x 12, then one of 2 x 8; positions go on from the checkpoint's
    assert [p for p, _, _ in one] == list(range(3, 10)) == [p for p, _, _ in three]
    assert [len(r) for _, r, _ in one] == [12] * 6 + [8] and [i.shape[0] for _, _, i in one] == [12] * 6 + [8]
    assert [r for _, r, _ in one] == [r for _, r, _ in three] == [b.tolist() for b in stream.epoch_batches()]
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(one, three))


def test_a_redeal_that_cannot_be_exact_is_refused_at_resume(stream_parts):
    _, checkpoint = train_ranks(stream_parts, 2, 8, None, batches=5)  # 176 rows left
    state = StreamState(**json.loads(checkpoint))
    stream = make_stream(stream_parts, world=3, batch=29)  # 176 % 87 = 2 rows for 3 ranks
    with pytest.raises(ValueError, match="World sizes that work"):
        stream.set_position(state)
    other = make_stream(stream_parts, world=4)
    with pytest.raises(ValueError, match="same shards"):
        other.set_position(dataclasses.replace(state, fingerprint="0123456789abcdef"))


def test_each_rank_and_worker_reads_only_the_row_groups_of_its_own_rows_once(stream_parts, tmp_path, monkeypatch):
    """README: each rank and DataLoader worker reads only its own row groups, once per epoch. Every row-group read
    is recorded (from the worker processes too: they fork with the patched reader): a rank's workers read exactly
    the row groups that hold its rows, and no worker reads a row group twice."""
    import os

    from brivl_ds.data.stream import RowGroupReader

    log = tmp_path / "reads.txt"
    real_group = RowGroupReader._group

    def recording(self, g):
        if g not in self.cache:
            with open(log, "a") as f:  # one short appended line per read: whole lines, whatever the process
                f.write(f"{os.environ['TEST_RANK']} {os.getpid()} {g}\n")
        return real_group(self, g)

    monkeypatch.setattr(RowGroupReader, "_group", recording)
    for rank in range(2):
        monkeypatch.setenv("TEST_RANK", str(rank))
        stream = make_stream(stream_parts, rank=rank, world=2, batch=8, block=16)
        stream.start_epoch(0, num_workers=2)
        starts = np.cumsum(stream.row_groups) - np.asarray(stream.row_groups)
        own = {int(g) for b in stream.epoch_batches() for g in np.searchsorted(starts, b, side="right") - 1}
        assert 1 < len(own) < len(stream.row_groups)  # a rank's span covers some of the row groups, not all
        collect(stream, workers=2)
        reads = [line.split() for line in log.read_text().splitlines() if line.split()[0] == str(rank)]
        assert {int(g) for _, _, g in reads} == own, rank
        per_worker = [(pid, g) for _, pid, g in reads]
        assert len(per_worker) == len(set(per_worker)) and len({pid for pid, _ in per_worker}) == 2, rank
