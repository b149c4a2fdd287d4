"""The converter: official and pairs inputs, every kind of bad row dropped and counted, restarts, workers, dedup."""
import io
import json
import os
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from brivl_ds.data import convert as cv
from brivl_ds.data.convert import Drop, check_image, convert_official, convert_pairs, main
from brivl_ds.data.shards import read_table, verify


def jpeg(seed: int, size=(32, 24), **save) -> bytes:
    """A small noise JPEG: a different seed gives different bytes."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", **save)
    return buffer.getvalue()


def encoded(fmt: str, size=(20, 10), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 1).save(buffer, fmt)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A few-hundred-byte PNG whose header claims width x height (a decompression bomb, never decoded here)."""
    data = bytearray(encoded("PNG", (8, 8), "1"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR's CRC covers its type and data
    return bytes(data)


def write_jsonl(path, lines) -> None:
    path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
                              for line in lines))


def dropped(report) -> int:
    return sum(v for k, v in report.items() if k.startswith("dropped: "))


RUN_KEYS = {"shards", "shards converted", "shards redone in isolation", "shards reused", "shards rewritten by dedup",
            "seconds", "rows/s"}  # about this run, not the output: the only keys manifest.json does not report


def assert_consistent(report, out) -> None:
    assert report["rows read"] == report["rows written"] + dropped(report)
    assert report["boxes read"] == report["boxes kept"] + sum(v for k, v in report.items()
                                                              if k.startswith("boxes dropped: "))
    assert report["dropped: unexpected error"] == 0
    assert verify(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == report["rows written"]
    assert manifest["report"] == {k: v for k, v in report.items() if k not in RUN_KEYS}
    assert all(k in manifest["report"] for k in cv.COUNTS)


def snapshot(out) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*")}


@pytest.fixture
def official_images(official_fixture, tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for f in (official_fixture / "imgs").iterdir():
        (images / f.name).write_bytes(f.read_bytes())
    return images


# ---------------------------------------------------------------- official JSONL

def test_official_fixture_round_trip(official_fixture, tmp_path):
    out = tmp_path / "out"
    report = convert_official(official_fixture / "example.jsonl", official_fixture / "imgs", out, workers=1)
    records = [json.loads(line) for line in (official_fixture / "example.jsonl").read_text().splitlines()]
    rows = read_table(out).to_pylist()
    assert report["rows read"] == report["rows written"] == len(rows) == len(records) == 3
    for row, rec in zip(rows, records):
        assert row["id"] == rec["image_id"] and row["source"] == "example.jsonl"
        assert row["text"] == dict(rec["sentences"])["sur_text"].strip()  # surrounding whitespace trimmed
        assert [(t["kind"], t["text"]) for t in row["texts"]] == [tuple(s) for s in rec["sentences"]]
        original = (official_fixture / "imgs" / rec["image_id"].split("/")[-1]).read_bytes()
        assert row["image"] == original  # JPEG stored as crawled
        with Image.open(io.BytesIO(original)) as im:
            assert (row["width"], row["height"]) == im.size
        w, h = row["width"], row["height"]
        clipped = [[min(max(x1, 0), w), min(max(y1, 0), h), min(max(x2, 0), w), min(max(y2, 0), h)]
                   for x1, y1, x2, y2 in rec["bbox"]]
        expected = [b for b in clipped if b[2] - b[0] >= 1 and b[3] - b[1] >= 1]
        np.testing.assert_allclose(np.array(row["boxes"]).reshape(-1, 4), np.array(expected).reshape(-1, 4))
    assert_consistent(report, out)


def test_official_bad_rows_are_dropped_by_reason_and_good_rows_kept(official_fixture, official_images, tmp_path):
    ok = json.loads((official_fixture / "example.jsonl").read_text().splitlines()[0])  # 450 x 299
    good = (official_images / "baike_14361859_0.jpg").read_bytes()
    (official_images / "truncated.jpg").write_bytes(good[:300])
    (official_images / "empty.jpg").write_bytes(b"")
    (official_images / "bomb.png").write_bytes(png_declaring(20_000, 20_000))  # PIL itself refuses: 4e8 pixels
    (official_images / "huge.png").write_bytes(png_declaring(10_000, 9_000))  # over --max-pixels, PIL only warns
    (official_images / "text.jpg").write_bytes(b"<html>not found</html>")
    (official_images / "a-directory.jpg").mkdir()
    (official_images / "anim.gif").write_bytes(encoded("GIF", (20, 10), "P"))
    nan, inf = float("nan"), float("inf")
    boxes = [[nan, 0, 5, 5], [0, 0, inf, 5], [-10, -10, 5000, 5000], [3, 3, 3, 9], [1, 2, "a", 4], [1, 2, 3],
             [50, 50, 10, 10], [10, 10, 20.5, 20], [600, 10, 700, 20]]
    lines = [
        {**ok, "bbox": boxes},
        {**ok, "image_id": "../data/imgs/missing.jpg"},
        {**ok, "image_id": "truncated.jpg"},
        {**ok, "image_id": "empty.jpg"},
        {**ok, "image_id": "bomb.png"},
        {**ok, "image_id": "huge.png"},
        {**ok, "image_id": "text.jpg"},
        {**ok, "sentences": [["sur_text", " \t "]]},
        {**ok, "sentences": [["alt_text", "no sur_text at all"]]},
        b"{not json",
        b'{"image_id": "x.jpg", "sentences": [["sur_text", "bad \xff\xfe utf-8"]]}',
        b'{"image_id": "x.jpg", "sentences": [["sur_text", "lone \\ud800 surrogate"]]}',
        b"[1, 2]",
        {**ok, "sentences": "not a list"},
        {**ok, "image_id": "a-directory.jpg"},
        {**ok, "image_id": "anim.gif", "bbox": [[0, 0, 5, 5]]},
        b"   ",  # blank lines are not rows
        {**ok, "bbox": "oops"},
        {**ok, "image_id": "baike_14014334_0.jpg", "bbox": [[1, 1, 10, 10]]},
    ]
    jsonl = tmp_path / "mixed.jsonl"
    write_jsonl(jsonl, lines)
    out = tmp_path / "out"
    report = convert_official(jsonl, official_images, out, workers=1, rows_per_shard=5)
    assert report["rows read"] == 18 and report["rows written"] == 4
    assert report["dropped: missing image file"] == 1
    assert report["dropped: undecodable image"] == 2  # truncated, not an image
    assert report["dropped: zero-size image"] == 1
    assert report["dropped: image too large"] == 2  # PIL's DecompressionBombError and our header check
    assert report["dropped: empty text"] == 2
    assert report["dropped: invalid JSON"] == 1
    assert report["dropped: invalid UTF-8"] == 2
    assert report["dropped: malformed row"] == 2
    assert report["dropped: unreadable image file"] == 1
    assert report["re-encoded to PNG"] == 1 and report["rows with an invalid boxes field"] == 1
    assert (report["boxes read"], report["boxes kept"], report["boxes clipped"]) == (11, 4, 1)
    assert report["boxes dropped: NaN/inf"] == 2 and report["boxes dropped: not 4 numbers"] == 2
    assert report["boxes dropped: inverted"] == 1 and report["boxes dropped: under 1 px after clipping"] == 2
    assert_consistent(report, out)

    rows = read_table(out).to_pylist()
    assert [r["id"] for r in rows] == [ok["image_id"], "anim.gif", ok["image_id"], "baike_14014334_0.jpg"]
    assert rows[0]["boxes"] == [[0, 0, 450, 299], [10, 10, 20.5, 20]]  # the outside box clipped, the good one kept
    assert rows[0]["image"] == good
    with Image.open(io.BytesIO(rows[1]["image"])) as im:  # GIF re-encoded to PNG, same pixels and size
        assert im.format == "PNG" and im.size == (rows[1]["width"], rows[1]["height"]) == (20, 10)
    assert rows[2]["boxes"] == []


def test_jpeg_draft_decoding_still_catches_truncation(official_fixture):
    baseline = (official_fixture / "imgs" / "baike_14708276_0.jpg").read_bytes()
    with Image.open(io.BytesIO(baseline)) as im:
        progressive = io.BytesIO()
        im.save(progressive, "JPEG", progressive=True, quality=90)
    for data in (baseline, progressive.getvalue()):
        assert check_image(data, cv.MAX_PIXELS) == (data, 1280, 720, False)  # full size, not the 1/8 draft
        for cut in (len(data) // 4, len(data) // 2, len(data) - 100, len(data) - 2):
            with pytest.raises(Drop) as err:
                check_image(data[:cut], cv.MAX_PIXELS)
            assert err.value.reason == cv.UNDECODABLE


def test_jpeg_png_webp_are_stored_as_read_other_formats_as_png():
    frames = [Image.new("RGB", (16, 8), c) for c in ("red", "blue")]
    mpo = io.BytesIO()
    frames[0].save(mpo, "MPO", save_all=True, append_images=frames[1:])  # camera JPEG with a second frame
    for data in (mpo.getvalue(), encoded("JPEG", (16, 8)), encoded("PNG", (16, 8), "LA"), encoded("WEBP", (16, 8))):
        assert check_image(data, 1000) == (data, 16, 8, False)
    for data in (encoded("TIFF", (16, 8), "CMYK"), encoded("BMP", (16, 8), "1"), encoded("TIFF", (16, 8), "F")):
        stored, width, height, reencoded = check_image(data, 1000)
        assert reencoded and (width, height) == (16, 8) and Image.open(io.BytesIO(stored)).format == "PNG"
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 8\n"
    with pytest.raises(Drop, match="undecodable"):  # never handed to Ghostscript
        check_image(eps, 1000)


def test_max_pixels_option_drops_large_images_and_prints_the_report(official_fixture, tmp_path, capsys):
    out = tmp_path / "out"
    report = main(["official", "--jsonl", str(official_fixture / "example.jsonl"), "--image-root",
                   str(official_fixture / "imgs"), "--out", str(out), "--max-pixels", "200000", "--no-progress",
                   "--workers", "1"])
    assert report["dropped: image too large"] == 2 and report["rows written"] == 1  # only the 450 x 299 image
    assert "dropped: image too large" in capsys.readouterr().out
    assert report["rows/s"] > 0 and report["seconds"] > 0
    report = main(["official", "--jsonl", str(official_fixture / "example.jsonl"), "--image-root",
                   str(official_fixture / "imgs"), "--out", str(tmp_path / "none"), "--max-pixels", "1000",
                   "--no-progress", "--workers", "1"])
    assert report["rows written"] == 0 and report["shards"] == 0
    assert not list((tmp_path / "none").glob("*.parquet"))  # an empty chunk leaves no shard behind


# ---------------------------------------------------------------- pairs CSV / TSV / JSONL

@pytest.fixture
def pair_images(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"good{i}.jpg").write_bytes(jpeg(i))
    (images / "truncated.jpg").write_bytes(jpeg(0)[:200])
    (images / "empty.png").write_bytes(b"")
    (images / "pic.bmp").write_bytes(encoded("BMP"))
    return images


def test_pairs_csv_bad_rows_are_dropped_by_reason_and_good_rows_kept(pair_images, tmp_path):
    absolute = pair_images / "good2.jpg"
    csv_bytes = (
        "\ufeffimage,caption,boxes\n"
        'good0.jpg,"a caption, with a comma and\na newline ","[[1, 2, 30, 20], [-5, 0, 10, 10]]"\n'
        "good1.jpg,plain caption,\n"
        "missing.jpg,caption,\n"
        'good0.jpg,"   ",\n'
    ).encode() + b"good0.jpg,bad \xff utf-8,\n" + (
        "good0.jpg,too,many,fields\n"
        "truncated.jpg,caption,\n"
        "\n"
        f'{absolute},absolute path,"[[1, 2"\n'
        ",no image path,\n"
        'good1.jpg,nan box,"[[NaN, 1, 2, 3]]"\n'
    ).encode()
    (tmp_path / "pairs.csv").write_bytes(csv_bytes)
    out = tmp_path / "out"
    report = convert_pairs(tmp_path / "pairs.csv", pair_images, out, workers=1, rows_per_shard=4)
    assert report["rows read"] == 10 and report["rows written"] == 4
    assert report["dropped: missing image file"] == 1 and report["dropped: empty text"] == 1
    assert report["dropped: invalid UTF-8"] == 1 and report["dropped: malformed row"] == 2
    assert report["dropped: undecodable image"] == 1
    assert report["rows with an invalid boxes field"] == 1 and report["boxes dropped: NaN/inf"] == 1
    assert (report["boxes read"], report["boxes kept"], report["boxes clipped"]) == (3, 2, 1)
    assert_consistent(report, out)
    rows = read_table(out).to_pylist()
    assert [r["text"] for r in rows] == ["a caption, with a comma and\na newline", "plain caption", "absolute path",
                                         "nan box"]
    assert rows[0]["boxes"] == [[1, 2, 30, 20], [0, 0, 10, 10]] and rows[1]["boxes"] == []
    assert rows[0]["texts"] == [{"kind": "caption", "text": "a caption, with a comma and\na newline "}]
    assert rows[2]["id"] == str(absolute) and rows[2]["image"] == absolute.read_bytes()
    assert {r["source"] for r in rows} == {"pairs.csv"}


def test_pairs_jsonl_bad_rows_are_dropped_by_reason_and_good_rows_kept(pair_images, tmp_path):
    lines = [
        {"image": "good0.jpg", "caption": " hello ", "boxes": [[1, 1, 5, 5]]},
        {"image": "good0.jpg", "caption": None},
        {"image": "good0.jpg", "caption": 42},
        {"caption": "no image"},
        b"not json",
        b'{"image": "good0.jpg", "caption": "\xff"}',
        {"image": "missing.png", "caption": "x"},
        {"image": "pic.bmp", "caption": "a BMP"},
        {"image": "good1.jpg", "caption": "boxes as a string", "boxes": "[[0, 0, 3, 3]]"},
        {"image": "good1.jpg", "caption": "boxes not a list", "boxes": 5},
        {"image": "empty.png", "caption": "zero bytes"},
    ]
    write_jsonl(tmp_path / "pairs.jsonl", lines)
    out = tmp_path / "out"
    report = convert_pairs(tmp_path / "pairs.jsonl", pair_images, out, workers=1, rows_per_shard=3)
    assert report["rows read"] == 11 and report["rows written"] == 4
    assert report["dropped: empty text"] == 1 and report["dropped: malformed row"] == 2
    assert report["dropped: invalid JSON"] == 1 and report["dropped: invalid UTF-8"] == 1
    assert report["dropped: missing image file"] == 1 and report["dropped: zero-size image"] == 1
    assert report["re-encoded to PNG"] == 1 and report["rows with an invalid boxes field"] == 1
    assert_consistent(report, out)
    rows = read_table(out).to_pylist()
    assert [r["text"] for r in rows] == ["hello", "a BMP", "boxes as a string", "boxes not a list"]
    assert [r["boxes"] for r in rows] == [[[1, 1, 5, 5]], [], [[0, 0, 3, 3]], []]
    assert Image.open(io.BytesIO(rows[1]["image"])).format == "PNG"


def test_pairs_tsv_with_named_columns_and_missing_column_error(pair_images, tmp_path, capsys):
    (tmp_path / "pairs.tsv").write_text('url\ttext\ngood0.jpg\t"quoted" at the start\ngood1.jpg\tsecond\n')
    argv = ["pairs", "--input", str(tmp_path / "pairs.tsv"), "--image-root", str(pair_images), "--no-progress",
            "--workers", "1"]
    report = main(argv + ["--out", str(tmp_path / "out"), "--image-column", "url", "--text-column", "text"])
    assert report["rows written"] == 2
    assert [r["text"] for r in read_table(tmp_path / "out").to_pylist()] == ['"quoted" at the start', "second"]
    with pytest.raises(SystemExit) as exit_:
        main(argv + ["--out", str(tmp_path / "other")])  # default columns image/caption do not exist
    assert exit_.value.code == 2 and "no column ['image', 'caption']" in capsys.readouterr().err


# ---------------------------------------------------------------- restart, workers, dedup

@pytest.fixture
def pairs_input(tmp_path):
    """14 rows (a few bad) over images with duplicates: good0 == copy0 byte for byte."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        (images / f"good{i}.jpg").write_bytes(jpeg(i))
    (images / "copy0.jpg").write_bytes(jpeg(0))
    rng = random.Random(0)
    names = ["good0.jpg", "good1.jpg", "good0.jpg", "copy0.jpg", "missing.jpg", "good2.jpg", "good1.jpg",
             "good0.jpg", "good3.jpg", "copy0.jpg", "good2.jpg", "good1.jpg", "missing.jpg", "good3.jpg"]
    rows = [{"image": n, "caption": f"caption {i}", "boxes": [[rng.randint(0, 9), 0, 20, rng.randint(5, 40)]]}
            for i, n in enumerate(names)]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    return tmp_path / "pairs.jsonl", images


def test_restart_redoes_only_missing_shards_and_matches_a_fresh_run(pairs_input, tmp_path):
    jsonl, images = pairs_input
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    convert_pairs(jsonl, images, fresh, workers=1, rows_per_shard=4)
    first = convert_pairs(jsonl, images, out, workers=1, rows_per_shard=4)
    assert first["shards"] == 4 and first["shards converted"] == 4
    before = snapshot(out)
    (out / "part-00001.parquet").unlink()  # a lost shard and its sidecar
    (out / "part-00001.json").unlink()
    (out / "part-00003.json").unlink()  # a crash after the shard, before its sidecar
    (out / "part-00002.parquet.tmp").write_bytes(b"partial")  # a crash while writing
    again = convert_pairs(jsonl, images, out, workers=1, rows_per_shard=4)
    assert (again["shards converted"], again["shards reused"]) == (2, 2)
    after = snapshot(out)
    for name in ("part-00000.parquet", "part-00000.json", "part-00002.parquet", "part-00002.json"):
        assert after[name] == before[name]  # untouched: same inode, same mtime
    assert after["part-00003.parquet"][0] != before["part-00003.parquet"][0]  # redone (a new file)
    assert not list(out.glob("*.tmp"))
    assert json.loads((out / "manifest.json").read_text()) == json.loads((fresh / "manifest.json").read_text())
    assert read_table(out).equals(read_table(fresh))
    assert {k: v for k, v in again.items() if k in cv.COUNTS} == {k: v for k, v in first.items() if k in cv.COUNTS}
    assert_consistent(again, out)
    with open(out / "part-00000.parquet", "ab") as f:  # a shard whose size disagrees with its sidecar is redone
        f.write(b"junk")
    assert convert_pairs(jsonl, images, out, workers=1, rows_per_shard=4)["shards converted"] == 1
    assert verify(out) == []


def test_restart_with_other_settings_is_refused(pairs_input, tmp_path, capsys):
    jsonl, images = pairs_input
    out = tmp_path / "out"
    argv = ["pairs", "--input", str(jsonl), "--image-root", str(images), "--out", str(out), "--no-progress"]
    main(argv + ["--rows-per-shard", "4", "--workers", "1"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv + ["--rows-per-shard", "5", "--workers", "1"])
    assert exit_.value.code == 2 and "rows_per_shard: 4 -> 5" in capsys.readouterr().err
    stat = jsonl.stat()
    os.utime(jsonl, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the input changed since
    with pytest.raises(SystemExit):
        main(argv + ["--rows-per-shard", "4", "--workers", "1"])
    assert "input_mtime_ns" in capsys.readouterr().err
    os.utime(jsonl, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert main(argv + ["--rows-per-shard", "4", "--workers", "1"])["shards reused"] == 4  # workers may differ
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "part-00000.parquet").write_bytes(b"not ours")
    with pytest.raises(cv.SettingsMismatch):
        convert_pairs(jsonl, images, foreign, workers=1)


def test_one_or_two_workers_write_identical_shards(pairs_input, tmp_path):
    jsonl, images = pairs_input
    reports = [convert_pairs(jsonl, images, tmp_path / f"w{w}", workers=w, rows_per_shard=3, dedup=True)
               for w in (1, 2)]
    assert reports[0]["shards converted"] == reports[1]["shards converted"] == 5
    assert reports[1]["shards rewritten by dedup"] > 0  # the rewrite also ran in worker processes
    manifests = [json.loads((tmp_path / f"w{w}" / "manifest.json").read_text()) for w in (1, 2)]
    assert manifests[0] == manifests[1]  # same shards, byte for byte (sha256), same report
    assert read_table(tmp_path / "w1").equals(read_table(tmp_path / "w2"))


def test_dedup_keeps_first_occurrences_across_shards_and_is_idempotent(pairs_input, tmp_path):
    jsonl, images = pairs_input
    out = tmp_path / "out"
    report = convert_pairs(jsonl, images, out, workers=1, rows_per_shard=3, dedup=True)
    # rows by shard: [g0 g1 g0] [c0 miss g2] [g1 g0 g3] [c0 g2 g1] [miss g3]; c0 is g0's bytes
    assert report["rows read"] == 14 and report["dropped: missing image file"] == 2
    assert report["dropped: duplicate image"] == 8 and report["rows written"] == 4
    rows = read_table(out).to_pylist()
    assert [r["text"] for r in rows] == ["caption 0", "caption 1", "caption 5", "caption 8"]  # first occurrences
    assert len({r["image_sha256"] for r in rows}) == 4
    assert report["shards"] == 3 and not (out / "part-00003.parquet").exists()  # all duplicates: no shard left
    assert json.loads((out / "part-00003.json").read_text())["report"]["dropped: duplicate image"] == 3
    assert_consistent(report, out)
    manifest, before = (out / "manifest.json").read_text(), snapshot(out)

    again = convert_pairs(jsonl, images, out, workers=1, rows_per_shard=3, dedup=True)
    assert again["shards rewritten by dedup"] == 0 and snapshot(out) == before
    assert (out / "manifest.json").read_text() == manifest

    (out / "part-00002.parquet").unlink()  # redone with its duplicates, which the pass removes again
    (out / "part-00002.json").unlink()
    again = convert_pairs(jsonl, images, out, workers=1, rows_per_shard=3, dedup=True)
    assert again["shards converted"] == 1 and again["shards rewritten by dedup"] == 1
    assert (out / "manifest.json").read_text() == manifest
    assert_consistent(again, out)


# ---------------------------------------------------------------- a worker that dies (the fault drill)

CRASHED = "dropped: worker crashed (SIGSEGV)"
KILLED = "dropped: worker killed (SIGKILL, OOM?)"


def test_rows_that_kill_their_worker_are_dropped_and_every_other_row_converts(pairs_input, tmp_path, capsys):
    jsonl, images = pairs_input
    drill = tmp_path / "drill"
    argv = ["pairs", "--input", str(jsonl), "--image-root", str(images), "--out", str(drill), "--rows-per-shard", "3",
            "--workers", "2", "--no-progress"]
    report = main(argv + ["--fault-crash-rows", "9,2"])  # good1 in chunk 0 and good3 in chunk 2: two pool breaks
    assert report[CRASHED] == 2 and CRASHED in capsys.readouterr().out
    assert report["shards converted"] == 5 and report["shards redone in isolation"] >= 2
    assert [json.loads((drill / f"part-{n:05d}.json").read_text())["crashed rows"] for n in range(5)] == \
        [[2], [], [9], [], []]
    assert_consistent(report, drill)

    # exact: the same input with rows 2 and 9 dropped for another reason (image missing) writes the same bytes
    lines = jsonl.read_text().splitlines()
    for row in (2, 9):
        lines[row - 1] = json.dumps({**json.loads(lines[row - 1]), "image": "missing.jpg"})
    (tmp_path / "without.jsonl").write_text("\n".join(lines) + "\n")
    without = convert_pairs(tmp_path / "without.jsonl", images, tmp_path / "without", workers=1, rows_per_shard=3,
                            source=jsonl.name)
    manifests = [json.loads((out / "manifest.json").read_text()) for out in (drill, tmp_path / "without")]
    assert manifests[0]["shards"] == manifests[1]["shards"]  # every shard's sha256, rows and row groups
    assert report["rows written"] == without["rows written"] == 10
    assert report["dropped: missing image file"] + 2 == without["dropped: missing image file"] == 4
    # and in rows: the run without the drill, less those two rows (captions 1 and 8)
    convert_pairs(jsonl, images, tmp_path / "full", workers=1, rows_per_shard=3)
    full = [r for r in read_table(tmp_path / "full").to_pylist() if r["text"] not in ("caption 1", "caption 8")]
    assert read_table(drill).to_pylist() == full

    # the drill is no setting: a restart without it reuses every shard, and the crash drops stay counted
    again = main(argv)
    assert again["shards reused"] == 5 and again[CRASHED] == 2 and again["rows written"] == 10


def test_chunks_in_flight_when_a_worker_dies_are_redone_not_lost(pairs_input, tmp_path):
    jsonl, images = pairs_input
    Image.new("L", (8000, 8000), 7).save(images / "slow.png")  # 80 kB, ~0.1 s to decode
    rows = ([{"image": f"good{i}.jpg", "caption": f"good {i}"} for i in range(4)]  # chunk 0: dies on its first row
            + [{"image": "slow.png", "caption": f"slow {i}"} for i in range(4)]  # chunk 1: converting (or queued) then
            + [{"image": "good0.jpg", "caption": "after"}])  # chunk 2: waits for a worker, gets the new pool's
    write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    report = convert_pairs(tmp_path / "in.jsonl", images, out, workers=2, rows_per_shard=4, fault_crash_rows=(1,))
    assert report[CRASHED] == 1 and report["shards converted"] == 3 and report["shards redone in isolation"] == 2
    assert [r["text"] for r in read_table(out).to_pylist()] == [r["caption"] for r in rows[1:]]
    assert_consistent(report, out)


def test_a_chunk_whose_every_row_kills_its_worker_ends_with_all_of_them_dropped(pairs_input, tmp_path):
    jsonl, images = pairs_input
    out = tmp_path / "out"
    report = convert_pairs(jsonl, images, out, workers=2, rows_per_shard=3, fault_crash_rows=(7, 8, 9),
                           fault_crash_signal="SIGKILL")  # the OOM killer's signal
    assert report[KILLED] == 3 and CRASHED not in report
    assert not (out / "part-00002.parquet").exists()  # chunk 2 is rows 7-9: nothing left to write
    assert json.loads((out / "part-00002.json").read_text())["crashed rows"] == [7, 8, 9]
    assert [r["text"] for r in read_table(out).to_pylist()] == [f"caption {i}" for i in (0, 1, 2, 3, 5, 9, 10, 11, 13)]
    assert_consistent(report, out)


def test_deaths_no_row_causes_alone_stop_the_run_after_a_bound(monkeypatch):
    tries = []

    def run_alone(context, fn, *args):  # the isolation's processes, scripted
        tries.append(fn.__name__)
        if fn is cv.convert_row:
            return 0, 0  # the row the process died on decodes fine on its own
        return [(-9, 5), (-9, 0), (-9, 6)][tries.count("convert_chunk") - 1]  # (exit code, row it was on)

    monkeypatch.setattr(cv, "_run_alone", run_alone)
    with pytest.raises(cv.ConvertError, match="died 3 times .*SIGKILL.* no row kills a process on its own"):
        cv._isolate(None, cv.Chunk(0, 0, 10), None)
    assert tries == ["convert_chunk", "convert_row", "convert_chunk", "convert_chunk", "convert_row"]


def test_the_fault_drill_needs_worker_processes(pairs_input, tmp_path):
    jsonl, images = pairs_input
    with pytest.raises(cv.ConvertError, match="needs worker processes"):
        convert_pairs(jsonl, images, tmp_path / "out", workers=1, fault_crash_rows=(2,))
