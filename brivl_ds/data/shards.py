"""The Parquet shard format: one row per image-text pair, boxes in original pixels. Written and read with pyarrow.

A dataset is a directory of shards plus `manifest.json`, which lists every shard with its row count, its row-group
sizes (the unit the streaming reader plans and reads by, so planning an epoch opens no file) and its sha256.
Row groups are cut by encoded-image bytes (default 32 MiB, at most 1024 rows): small enough that a DataLoader worker
holds only a few in memory, large enough for efficient sequential reads from network storage.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.binary()),  # encoded bytes as crawled (JPEG/PNG/WebP)
    ("image_sha256", pa.string()),  # hex digest of `image`: provenance and exact-duplicate removal
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("text", pa.string()),  # the caption the text tower reads (official: sur_text)
    ("texts", pa.list_(pa.struct([("kind", pa.string()), ("text", pa.string())]))),  # every caption with its kind
    ("boxes", pa.list_(pa.list_(pa.float32(), 4))),  # [x1, y1, x2, y2] in original pixels
    ("source", pa.string()),
])
FORMAT = "brivl-ds/v2"
MANIFEST = "manifest.json"
ROW_GROUP_BYTES = 32 << 20
ROW_GROUP_ROWS = 1024


@dataclass
class Row:
    id: str
    image: bytes
    width: int
    height: int
    text: str
    boxes: list[list[float]] = field(default_factory=list)
    texts: list[dict] = field(default_factory=list)
    source: str = ""
    image_sha256: str = ""

    def __post_init__(self):
        if not self.image_sha256:
            self.image_sha256 = hashlib.sha256(self.image).hexdigest()


@dataclass
class ShardInfo:
    path: Path
    rows: int
    row_groups: list[int]  # rows per row group, in file order


class ShardWriter:
    """Writes one shard, cutting a row group whenever the buffered images reach `row_group_bytes` (or
    `row_group_rows` rows). The file appears atomically on close(): a shard is either complete or absent."""

    def __init__(self, path: str | Path, row_group_bytes: int = ROW_GROUP_BYTES, row_group_rows: int = ROW_GROUP_ROWS):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.row_group_bytes, self.row_group_rows = row_group_bytes, row_group_rows
        # Encoded images neither compress nor repeat: skip the codec and the dictionary attempt for that column.
        other = [name for name in SCHEMA.names if name != "image"]
        self.writer = pq.ParquetWriter(self.tmp, SCHEMA, compression={"image": "NONE", **dict.fromkeys(other, "SNAPPY")},
                                       use_dictionary=other)
        self.buffer: list[dict] = []
        self.buffered_bytes = 0
        self.row_groups: list[int] = []

    def add(self, row: Row) -> None:
        self.buffer.append(vars(row))
        self.buffered_bytes += len(row.image)
        if self.buffered_bytes >= self.row_group_bytes or len(self.buffer) >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=SCHEMA), row_group_size=len(self.buffer))
            self.row_groups.append(len(self.buffer))
        self.buffer, self.buffered_bytes = [], 0

    def close(self) -> dict:
        """Finish the file; returns its manifest entry."""
        self._flush()
        self.writer.close()
        os.replace(self.tmp, self.path)
        return {"path": self.path.name, "rows": sum(self.row_groups), "row_groups": self.row_groups,
                "bytes": self.path.stat().st_size, "sha256": sha256_file(self.path)}


def write_shards(rows: list[Row], out_dir: str | Path, rows_per_shard: int = 10_000, prefix: str = "shard",
                 row_group_bytes: int = ROW_GROUP_BYTES, row_group_rows: int = ROW_GROUP_ROWS) -> Path:
    """Write rows to <out_dir>/<prefix>-00000.parquet ... and the manifest."""
    entries = []
    for n, start in enumerate(range(0, max(len(rows), 1), rows_per_shard)):
        writer = ShardWriter(Path(out_dir) / f"{prefix}-{n:05d}.parquet", row_group_bytes, row_group_rows)
        for row in rows[start:start + rows_per_shard]:
            writer.add(row)
        entries.append(writer.close())
    return write_manifest(out_dir, entries)


def write_manifest(out_dir: str | Path, entries: list[dict], **extra) -> Path:
    manifest = Path(out_dir) / MANIFEST
    body = {"format": FORMAT, "rows": sum(e["rows"] for e in entries), "shards": entries, **extra}
    tmp = manifest.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(body, indent=1, ensure_ascii=False))
    os.replace(tmp, manifest)
    return manifest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest_of(path: str | Path) -> Path | None:
    p = Path(path)
    if p.is_dir() and (p / MANIFEST).exists():
        return p / MANIFEST
    return p if p.name == MANIFEST else None


def shard_index(path: str | Path) -> list[ShardInfo]:
    """Shards named by a manifest, a directory (its manifest, else every *.parquet) or a single file, with their
    row-group sizes (from the manifest; from the Parquet footers when there is none)."""
    manifest = _manifest_of(path)
    if manifest is not None:
        body = json.loads(manifest.read_text())
        infos = []
        for e in body["shards"]:
            groups = e.get("row_groups") or _footer_row_groups(manifest.parent / e["path"])
            infos.append(ShardInfo(manifest.parent / e["path"], e["rows"], groups))
        return infos
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no *.parquet shards in {p}")
    elif p.exists():
        files = [p]
    else:
        raise FileNotFoundError(f"no such shard, directory or manifest: {p}")
    infos = []
    for f in files:
        groups = _footer_row_groups(f)
        infos.append(ShardInfo(f, sum(groups), groups))
    return infos


def _footer_row_groups(path: Path) -> list[int]:
    meta = pq.ParquetFile(path).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def shard_paths(path: str | Path) -> list[Path]:
    return [info.path for info in shard_index(path)]


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Every shard in one table (held-out sets and tests; training streams instead)."""
    tables = [pq.read_table(f, columns=columns) for f in shard_paths(path)]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def verify(path: str | Path) -> list[str]:
    """Shards whose size or checksum differ from the manifest (empty list = all good)."""
    manifest = _manifest_of(path)
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST} at {path}")
    bad = []
    for e in json.loads(manifest.read_text())["shards"]:
        f = manifest.parent / e["path"]
        if not f.exists() or ("sha256" in e and sha256_file(f) != e["sha256"]):
            bad.append(e["path"])
    return bad
