"""Official JSONL -> shards -> batches, with boxes scaled exactly like the official dataset code."""
import pytest
import torch

from brivl_ds.config import AugmentConfig
from brivl_ds.data.convert import main as convert_main
from brivl_ds.data.dataset import PairDataset
from brivl_ds.data.shards import read_table
from brivl_ds.data.transforms import PairTransform


@pytest.fixture(scope="module")
def official_shards(official_fixture, tmp_path_factory):
    out = tmp_path_factory.mktemp("official")
    report = convert_main(["official", "--jsonl", str(official_fixture / "example.jsonl"),
                           "--image-root", str(official_fixture / "imgs"), "--out", str(out),
                           "--workers", "1", "--no-progress"])
    assert report["rows written"] == 3
    return out


def test_batches_scale_boxes_like_the_official_dataset(official_shards):
    size, max_boxes = 96, 36
    data = PairDataset(official_shards, PairTransform(AugmentConfig(), size, max_boxes, grid=0, train=False))
    rows = read_table(official_shards).to_pylist()
    for i, row in enumerate(rows):
        sample = data[i]
        assert sample.image.shape == (3, size, size) and sample.image.dtype == torch.uint8
        sx, sy = size / row["width"], size / row["height"]
        expected = torch.tensor(row["boxes"][:max_boxes]) * torch.tensor([sx, sy, sx, sy])
        n = expected.shape[0]
        torch.testing.assert_close(sample.boxes[:n], expected, rtol=1e-5, atol=1e-3)
        assert sample.boxes[n].tolist() == [0, 0, size, size]  # the whole image comes right after the boxes
        assert sample.box_mask.tolist() == [True] * (n + 1) + [False] * (max_boxes - n)
        assert sample.boxes.shape == (max_boxes + 1, 4)


def test_a_corrupt_held_out_image_is_replaced_and_counted(official_shards, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = read_table(official_shards)
    images = table.column("image").to_pylist()
    images[1] = images[1][:200]  # truncated JPEG
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    pq.write_table(table, tmp_path / "bad.parquet")
    data = PairDataset(tmp_path / "bad.parquet", PairTransform(AugmentConfig(), 64, 36, grid=0, train=False))
    assert data[1].row == 2 and data.skipped == {1}
    assert data[0].row == 0


def test_shard_writer_cuts_row_groups_by_image_bytes_and_lists_them(official_fixture, tmp_path):
    import pyarrow.parquet as pq

    from brivl_ds.data.shards import Row, shard_index, verify, write_shards

    image = next((official_fixture / "imgs").iterdir()).read_bytes()
    rows = [Row(id=str(i), image=image, width=1, height=1, text="t") for i in range(7)]
    write_shards(rows, tmp_path, rows_per_shard=5, row_group_bytes=2 * len(image), row_group_rows=1024)
    (first, second) = shard_index(tmp_path)
    assert (first.rows, first.row_groups, second.row_groups) == (5, [2, 2, 1], [2])
    meta = pq.ParquetFile(first.path).metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == first.row_groups
    image_column = meta.row_group(0).column(meta.schema.names.index("image"))
    assert image_column.compression == "UNCOMPRESSED" and not any("DICTIONARY" in e for e in image_column.encodings)
    assert verify(tmp_path) == []
    first.path.write_bytes(first.path.read_bytes()[:-10])
    assert verify(tmp_path) == [first.path.name]
