"""Image-text retrieval with several captions per image (the paper's AIC-ICC test set has five): the readers of
such data and the evaluation over a model's embeddings (the metrics: recall.retrieval_metrics).

SHARDS: Parquet shards (brivl_ds.data.shards) where several rows may share an image: rows are grouped by their
`image_sha256` column when there is one, else by identical image bytes; each row's `text` is one caption.
JSONL: one image per line, {"image": "path", "captions": ["...", ...]}; relative paths are resolved against
`image_root` (default: the JSONL's folder).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from brivl_ds.evaluation.recall import retrieval_metrics


@dataclass
class CaptionedImages:
    """Images (encoded bytes or file paths), their boxes (None: the model's fallback layout) and captions."""
    images: list
    boxes: list | None
    captions: list[list[str]]


def read_caption_shards(path: str | Path) -> CaptionedImages:
    """Shard rows grouped by image (`image_sha256`, else the image bytes), in order of first appearance."""
    import pyarrow.parquet as pq

    from brivl_ds.data.shards import read_table, shard_paths

    present = set(pq.read_schema(shard_paths(path)[0]).names)
    table = read_table(path, columns=["image", "text"] + [c for c in ("image_sha256", "boxes") if c in present])
    images, texts = table.column("image").to_pylist(), table.column("text").to_pylist()
    digests = (table.column("image_sha256").to_pylist() if "image_sha256" in present
               else [hashlib.sha256(image).hexdigest() for image in images])
    row_boxes = table.column("boxes").to_pylist() if "boxes" in present else None
    group: dict[str, int] = {}
    data = CaptionedImages([], [] if row_boxes else None, [])
    for r, digest in enumerate(digests):
        if digest not in group:
            group[digest] = len(data.images)
            data.images.append(images[r])
            data.captions.append([])
            if row_boxes:
                data.boxes.append(row_boxes[r])
        data.captions[group[digest]].append(texts[r])
    return data


def read_caption_jsonl(path: str | Path, image_root: str | Path | None = None) -> CaptionedImages:
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    data = CaptionedImages([], None, [])
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record.get("image"), str) or not isinstance(record.get("captions"), list):
            raise ValueError(f"{path}:{n}: expected {{\"image\": path, \"captions\": [...]}}")
        data.images.append(root / record["image"])
        data.captions.append(record["captions"])
    return data


def evaluate_captioned(embed_images, embed_texts, data: CaptionedImages, ks: tuple[int, ...] = (1, 5, 10),
                       chunk: int = 256) -> dict:
    """Embed the images (skipping undecodable ones, and their captions) and captions; the metrics and counts.

    embed_images(images, boxes) -> (unit-norm embeddings [n_kept, D], indices of the images kept) and
    embed_texts(texts) -> [M, D]: a model's encoders (brivl_ds.inference.encode's embed_image_sources and
    embed_texts_batched, bound to the model and batch size)."""
    image_emb, kept = embed_images(data.images, data.boxes)
    texts, text_image = [], []
    for new, old in enumerate(kept):
        texts += data.captions[old]
        text_image += [new] * len(data.captions[old])
    text_emb = embed_texts(texts)
    return {"metrics": retrieval_metrics(image_emb, text_emb, torch.tensor(text_image, dtype=torch.long), ks, chunk),
            "n_images": len(kept), "n_texts": len(texts), "skipped": len(data.images) - len(kept)}
