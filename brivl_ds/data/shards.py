"""The Parquet shard format: one row per image-text pair, boxes in original pixels. Written and read with pyarrow."""
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
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("text", pa.string()),  # the caption the text tower reads (official: sur_text)
    ("texts", pa.list_(pa.struct([("kind", pa.string()), ("text", pa.string())]))),  # every caption with its kind
    ("boxes", pa.list_(pa.list_(pa.float32(), 4))),  # [x1, y1, x2, y2] in original pixels
    ("source", pa.string()),
])

ROW_GROUP_SIZE = 1024
MANIFEST = "manifest.json"


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


def write_shards(rows: list[Row], out_dir: str | Path, rows_per_shard: int = 10_000, prefix: str = "shard") -> Path:
    """Write rows to <out_dir>/<prefix>-00000.parquet ... and a manifest with row counts and checksums."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for n, start in enumerate(range(0, max(len(rows), 1), rows_per_shard)):
        chunk = rows[start:start + rows_per_shard]
        table = pa.Table.from_pylist([vars(r) for r in chunk], schema=SCHEMA)
        path = out / f"{prefix}-{n:05d}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE)
        os.replace(tmp, path)  # a shard is either complete or absent
        entries.append({"path": path.name, "rows": len(chunk), "sha256": _sha256(path)})
    manifest = out / MANIFEST
    manifest.write_text(json.dumps({"schema": "brivl-ds/v1", "shards": entries}, indent=1))
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_paths(path: str | Path) -> list[Path]:
    """Shards named by a manifest, a directory (its manifest, else every *.parquet) or a single file."""
    p = Path(path)
    if p.is_dir() and (p / MANIFEST).exists():
        p = p / MANIFEST
    if p.name == MANIFEST:
        return [p.parent / e["path"] for e in json.loads(p.read_text())["shards"]]
    if p.is_dir():
        files = sorted(p.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no *.parquet shards in {p}")
        return files
    if not p.exists():
        raise FileNotFoundError(f"no such shard, directory or manifest: {p}")
    return [p]


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    tables = [pq.read_table(f, columns=columns) for f in shard_paths(path)]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()
