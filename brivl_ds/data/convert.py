"""Convert the official BriVL JSONL format to Parquet shards.

  python -m brivl_ds.data.convert --jsonl example.jsonl --image-root imgs/ --out shards/

Official rows: {"image_id": path, "sentences": [[kind, text], ...], "bbox": [[x1, y1, x2, y2], ...]} with boxes in
original pixels. `image_id` paths are relative to where the official scripts ran: an image is looked up as
<image-root>/<image_id>, then as <image-root>/<file name> (a flat folder of images). The text tower reads the
`sur_text` sentence by default (--text-kind). Bad rows are dropped and counted by reason, never fatal; boxes are
clipped to the image, and dropped when NaN or empty after clipping.
"""
from __future__ import annotations

import argparse
import io
import json
import math
from collections import Counter
from pathlib import Path

from PIL import Image

from brivl_ds.data.shards import Row, write_shards

MAX_PIXELS = 89_478_485  # PIL's decompression-bomb limit: larger images are dropped, not decoded


def resolve_image(root: Path, image_id: str) -> Path | None:
    for candidate in (root / image_id, root / Path(image_id).name):
        if candidate.is_file():
            return candidate
    return None


def clean_boxes(boxes, width: int, height: int) -> tuple[list[list[float]], int]:
    """Clip [x1, y1, x2, y2] boxes to the image; returns (kept boxes, number dropped)."""
    kept, dropped = [], 0
    for box in boxes or []:
        try:
            x1, y1, x2, y2 = (float(v) for v in box)
        except (TypeError, ValueError):
            dropped += 1
            continue
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            dropped += 1
            continue
        x1, x2 = sorted((min(max(x1, 0.0), width), min(max(x2, 0.0), width)))
        y1, y2 = sorted((min(max(y1, 0.0), height), min(max(y2, 0.0), height)))
        if x2 - x1 < 1 or y2 - y1 < 1:
            dropped += 1
            continue
        kept.append([x1, y1, x2, y2])
    return kept, dropped


def convert_official(jsonl: Path, image_root: Path, text_kind: str = "sur_text") -> tuple[list[Row], Counter]:
    rows: list[Row] = []
    report: Counter = Counter()
    with open(jsonl, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            report["read"] += 1
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                report["dropped: invalid JSON or UTF-8"] += 1
                continue
            texts = [{"kind": str(k), "text": str(t)} for k, t in record.get("sentences", []) if isinstance(t, str)]
            text = next((t["text"] for t in texts if t["kind"] == text_kind), "").strip()
            if not text:
                report[f"dropped: no non-empty {text_kind}"] += 1
                continue
            path = resolve_image(image_root, str(record.get("image_id", "")))
            if path is None:
                report["dropped: image file missing"] += 1
                continue
            data = path.read_bytes()
            try:
                with Image.open(io.BytesIO(data)) as image:
                    width, height = image.size
                    if width * height > MAX_PIXELS or width == 0 or height == 0:
                        report["dropped: zero-size or oversized image"] += 1
                        continue
                    image.load()  # decode fully: catches truncated files
            except Exception:
                report["dropped: undecodable image"] += 1
                continue
            boxes, bad_boxes = clean_boxes(record.get("bbox"), width, height)
            report["boxes dropped (NaN/degenerate/outside)"] += bad_boxes
            rows.append(Row(id=str(record.get("image_id")), image=data, width=width, height=height, text=text,
                            boxes=boxes, texts=texts, source=jsonl.name))
            report["written"] += 1
    return rows, report


def main(argv: list[str] | None = None) -> Counter:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jsonl", type=Path, required=True)
    parser.add_argument("--image-root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--text-kind", default="sur_text")
    parser.add_argument("--rows-per-shard", type=int, default=10_000)
    args = parser.parse_args(argv)
    rows, report = convert_official(args.jsonl, args.image_root, args.text_kind)
    write_shards(rows, args.out, args.rows_per_shard)
    for reason, count in sorted(report.items()):
        print(f"{reason:<45} {count}")
    return report


if __name__ == "__main__":
    main()
