"""Streaming training data: partition over ranks x workers, per-epoch shuffle, exact mid-epoch resume, bad rows."""
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from brivl_ds.config import AugmentConfig
from brivl_ds.data import plan
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
        layout = plan.Layout(world, rank, batch, block, streams, seed=7)
        per_rank.append(plan.rank_batches(sizes, epoch, layout))
    steps = plan.batches_per_epoch(total, world, batch)
    assert all(b.shape == (steps, batch) for b in per_rank)  # every rank steps together
    rows = np.concatenate([b.ravel() for b in per_rank])
    assert len(np.unique(rows)) == len(rows)  # no overlap
    assert len(rows) == total - total % (world * batch)  # no gap beyond the dropped partial global batch
    assert rows.min(initial=0) >= 0 and rows.max(initial=0) < total


@settings(max_examples=40, deadline=None)
@given(num_batches=st.integers(0, 50), start=st.integers(0, 50), workers=st.integers(1, 6))
def test_workers_split_the_remaining_batches_in_dataloader_order(num_batches, start, workers):
    per_worker = [list(plan.worker_positions(num_batches, start, w, workers)) for w in range(workers)]
    # PyTorch's DataLoader takes one batch from each worker in turn; workers that run out are the last ones.
    order = [p for i in range(max(map(len, per_worker))) for w in per_worker if i < len(w) for p in [w[i]]]
    assert order == list(range(start, num_batches))


def test_order_is_a_function_of_seed_and_epoch():
    sizes = np.array([30, 7, 25, 40, 12])

    def batches(seed, epoch):
        return plan.rank_batches(sizes, epoch, plan.Layout(2, 1, 4, 16, 2, seed))

    np.testing.assert_array_equal(batches(3, 0), batches(3, 0))
    assert not np.array_equal(batches(3, 0), batches(3, 1))
    assert not np.array_equal(batches(3, 0), batches(4, 0))
    # a shuffle block mixes rows of different row groups within a batch
    starts = np.cumsum(sizes) - sizes
    groups = np.searchsorted(starts, batches(3, 0), side="right") - 1
    assert any(len(set(g)) > 1 for g in groups.tolist())


# --------------------------------------------------------------------------------------------------------- real shards
@pytest.fixture(scope="module")
def stream_parts(shapes_data):
    tokenizer = load_tokenizer(shapes_data["tokenizer"])
    transform = PairTransform(AugmentConfig(crop_scale_min=0.5, hflip_prob=0.5), 32, 8, 0, train=True)
    return shapes_data["train"], transform, Collator(tokenizer, 40)


def make_stream(parts, rank=0, world=1, batch=8, block=32):
    path, transform, collate = parts
    return ShardStream(path, transform, collate, batch, rank, world, seed=11, block_rows=block)


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
    assert [rows for _, rows, _ in got] == expected.tolist()
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


def test_ranks_partition_an_epoch_and_a_resume_on_other_ranks_is_refused(stream_parts):
    streams = [make_stream(stream_parts, rank=r, world=3) for r in range(3)]
    rows = []
    for s in streams:
        s.start_epoch(0, num_workers=1)
        rows += [r for b in s.epoch_batches().tolist() for r in b]
    assert len(rows) == len(set(rows)) == streams[0].total_rows - streams[0].total_rows % 24
    other = make_stream(stream_parts, world=1)
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
    import dataclasses

    from brivl_ds.trainer import Position

    stream = make_stream(stream_parts)
    stream.start_epoch(2, num_workers=3)
    pos = Position(step=7, samples=56, data=stream.state)
    assert Position.from_dict(dataclasses.asdict(pos)) == pos
    old = Position.from_dict({"step": 7, "epoch": 2, "batch_in_epoch": 5, "samples": 56, "skipped_rows": 0})
    with pytest.raises(ValueError, match="cannot resume mid-epoch"):
        stream.set_position(old.data)
