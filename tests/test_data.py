"""Official JSONL -> shards -> batches, with boxes scaled exactly like the official dataset code."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from brivl_ds.config import AugmentConfig
from brivl_ds.data.convert import main as convert_main
from brivl_ds.data.dataset import DistributedBatchSampler, PairDataset
from brivl_ds.data.shards import read_table


@pytest.fixture(scope="module")
def official_shards(official_fixture, tmp_path_factory):
    out = tmp_path_factory.mktemp("official")
    report = convert_main(["--jsonl", str(official_fixture / "example.jsonl"),
                           "--image-root", str(official_fixture / "imgs"), "--out", str(out)])
    assert report["written"] == 3
    return out


def test_converter_keeps_sur_text_and_boxes(official_fixture, official_shards):
    records = [json.loads(line) for line in (official_fixture / "example.jsonl").read_text().splitlines()]
    table = read_table(official_shards).to_pylist()
    assert len(table) == len(records)
    for row, rec in zip(table, records):
        assert row["text"] == dict(rec["sentences"])["sur_text"].strip()  # surrounding whitespace trimmed
        assert [t["kind"] for t in row["texts"]] == [k for k, _ in rec["sentences"]]
        with Image.open(official_fixture / "imgs" / rec["image_id"].split("/")[-1]) as im:
            assert (row["width"], row["height"]) == im.size
        w, h = row["width"], row["height"]
        clipped = [[min(max(x1, 0), w), min(max(y1, 0), h), min(max(x2, 0), w), min(max(y2, 0), h)]
                   for x1, y1, x2, y2 in rec["bbox"]]
        expected = [b for b in clipped if b[2] - b[0] >= 1 and b[3] - b[1] >= 1]
        np.testing.assert_allclose(np.array(row["boxes"]).reshape(-1, 4), np.array(expected).reshape(-1, 4))


def test_batches_scale_boxes_like_the_official_dataset(official_shards):
    size, max_boxes = 96, 36
    data = PairDataset(official_shards, size, max_boxes, AugmentConfig(), train=False)
    rows = read_table(official_shards).to_pylist()
    for i, row in enumerate(rows):
        sample = data[(i, 0)]
        assert sample.image.shape == (3, size, size)
        sx, sy = size / row["width"], size / row["height"]
        expected = torch.tensor(row["boxes"][:max_boxes]) * torch.tensor([sx, sy, sx, sy])
        n = expected.shape[0]
        torch.testing.assert_close(sample.boxes[:n], expected, rtol=1e-5, atol=1e-3)
        assert sample.boxes[n].tolist() == [0, 0, size, size]  # the whole image comes right after the boxes
        assert sample.box_mask.tolist() == [True] * (n + 1) + [False] * (max_boxes - n)
        assert sample.boxes.shape == (max_boxes + 1, 4)


def test_a_corrupt_image_is_skipped_and_counted(official_shards, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = read_table(official_shards)
    images = table.column("image").to_pylist()
    images[1] = images[1][:200]  # truncated JPEG
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    pq.write_table(table, tmp_path / "bad.parquet")
    data = PairDataset(tmp_path / "bad.parquet", 64, 36, AugmentConfig(), train=False)
    sample = data[(1, 0)]
    assert sample.index == 2 and sample.skipped == 1


def test_batch_sampler_splits_global_batches_across_ranks_and_resumes():
    world, b, n = 3, 4, 50
    samplers = [DistributedBatchSampler(n, b, r, world, seed=5) for r in range(world)]
    per_rank = [list(s) for s in samplers]
    assert all(len(p) == n // (b * world) for p in per_rank)
    seen = [i for p in per_rank for batch in p for i, _ in batch]
    assert len(seen) == len(set(seen)) == (n // (b * world)) * b * world  # no overlap, constant global batch
    # rank order of each step's slices is the global batch of a single-process sampler with batch b * world
    single = list(DistributedBatchSampler(n, b * world, 0, 1, seed=5))
    for j, global_batch in enumerate(single):
        assert [x for r in range(world) for x in per_rank[r][j]] == global_batch
    samplers[0].set_position(0, 2)
    assert list(samplers[0]) == per_rank[0][2:]
    samplers[0].set_position(1, 0)
    assert list(samplers[0]) != per_rank[0]  # a new epoch reshuffles


def test_converter_drops_bad_rows_by_reason_and_keeps_good_ones(official_fixture, tmp_path):
    good = [json.loads(line) for line in (official_fixture / "example.jsonl").read_text().splitlines()]
    images = tmp_path / "imgs"
    images.mkdir()
    for rec in good:
        name = rec["image_id"].split("/")[-1]
        (images / name).write_bytes((official_fixture / "imgs" / name).read_bytes())
    (images / "truncated.jpg").write_bytes((official_fixture / "imgs" / good[0]["image_id"].split("/")[-1])
                                           .read_bytes()[:300])
    ok = good[0]
    rows = [
        json.dumps({**ok, "bbox": [[float("nan"), 0, 5, 5], [-10, -10, 5000, 5000], [3, 3, 3, 9]]}),  # 2 bad boxes
        json.dumps({**ok, "image_id": "../data/imgs/missing.jpg"}),
        json.dumps({**ok, "image_id": "truncated.jpg"}),
        json.dumps({**ok, "sentences": [["sur_text", "   "]]}),
        "{not json",
    ]
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_bytes(("\n".join(rows) + "\n").encode() + b"\xff\xfe bad utf-8\n")
    report = convert_main(["--jsonl", str(jsonl), "--image-root", str(images), "--out", str(tmp_path / "out")])
    assert report["read"] == 6 and report["written"] == 1
    assert report["dropped: image file missing"] == 1
    assert report["dropped: undecodable image"] == 1
    assert report["dropped: no non-empty sur_text"] == 1
    assert report["dropped: invalid JSON or UTF-8"] == 2
    assert report["boxes dropped (NaN/degenerate/outside)"] == 2
    (row,) = read_table(tmp_path / "out").to_pylist()
    assert row["boxes"] == [[0.0, 0.0, float(row["width"]), float(row["height"])]]  # the outside box, clipped
