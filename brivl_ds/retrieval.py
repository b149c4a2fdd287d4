"""Image-text retrieval with several captions per image (the paper's AIC-ICC test set has five), from an exported
model (`python -m brivl_ds.export`).

  python -m brivl_ds.retrieval --model MODEL_DIR --data SHARDS --out result.json
  python -m brivl_ds.retrieval --model MODEL_DIR --data captions.jsonl [--image-root DIR] --out result.json

SHARDS: Parquet shards (brivl_ds.data.shards) where several rows may share an image: rows are grouped by their
`image_sha256` column when there is one, else by identical image bytes; each row's `text` is one caption.
JSONL: one image per line, {"image": "path", "captions": ["...", ...]}; relative paths are resolved against
--image-root (default: the JSONL's folder).

Metrics follow CLIP_benchmark's conventions, keys and layout, as fractions in [0, 1] (not percent, unlike
brivl_ds.eval): `image_retrieval_recall@k` (a caption queries the images; a hit if its image is in the top k) and
`text_retrieval_recall@k` (an image queries the captions; a hit if ANY of its captions is in the top k), plus
`mean_recall`, the mean of all of them (the "MR" the WenLan and Chinese-CLIP papers report). An image that cannot
be decoded is skipped and counted, with its captions; never fatal.

Output (--out):
  {"dataset": DATA, "model": "brivl-<backbone>-<text model>", "pretrained": MODEL_DIR, "task": "zeroshot_retrieval",
   "metrics": {"image_retrieval_recall@1": ..., "text_retrieval_recall@1": ..., ..., "mean_recall": ...},
   "language": "zh", "n_images": ..., "n_texts": ..., "skipped": ...}
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from brivl_ds.metrics import TIE_TOLERANCE

log = logging.getLogger(__name__)


def _hits(ranks: torch.Tensor, ks: tuple[int, ...]) -> dict[int, int]:
    return {k: int((ranks < k).sum()) for k in ks}


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5, 10), chunk: int = 256,
                      tie_tolerance: float = TIE_TOLERANCE) -> dict[str, float]:
    """Recall@K both ways for M captions of N images; `text_image[j]` is the index of caption j's image.

    Scores are dot products; a query's rank is the number of wrong candidates scoring more than `tie_tolerance`
    above its (best) true one, so ties go to the true candidate (as in brivl_ds.metrics, whose TIE_TOLERANCE
    keeps batching from deciding ties between identical captions or images). Queries are taken `chunk` at a time:
    memory is O(chunk x max(N, M)), never the whole N x M matrix. Images without captions only serve as distractors
    for the caption queries (they have nothing to find as queries themselves).
    """
    n, m = image_emb.shape[0], text_emb.shape[0]
    text_image = torch.as_tensor(text_image, dtype=torch.long)
    if text_emb.shape[1] != image_emb.shape[1] or text_image.shape != (m,):
        raise ValueError(f"image {tuple(image_emb.shape)}, text {tuple(text_emb.shape)} and text_image "
                         f"{tuple(text_image.shape)} do not fit together")
    if m and not 0 <= int(text_image.min()) <= int(text_image.max()) < n:
        raise ValueError(f"text_image indices must lie in [0, {n})")
    # float64 so that the rank comparisons are not decided by fp32 rounding of the sums
    image_emb, text_emb = image_emb.double(), text_emb.double()
    image_hits, text_hits = dict.fromkeys(ks, 0), dict.fromkeys(ks, 0)

    for start in range(0, m, chunk):  # caption queries
        scores = text_emb[start:start + chunk] @ image_emb.t()  # [c, N]
        true = scores.gather(1, text_image[start:start + chunk, None])
        for k, hits in _hits((scores > true + tie_tolerance).sum(1), ks).items():
            image_hits[k] += hits

    captioned = torch.zeros(n, dtype=torch.bool)
    captioned[text_image] = True
    queries = captioned.nonzero().squeeze(1)
    for start in range(0, len(queries), chunk):  # image queries
        rows = queries[start:start + chunk]
        scores = image_emb[rows] @ text_emb.t()  # [c, M]
        positive = text_image[None, :] == rows[:, None]
        best = scores.masked_fill(~positive, float("-inf")).amax(1, keepdim=True)
        for k, hits in _hits((scores > best + tie_tolerance).sum(1), ks).items():  # none of its own beats `best`
            text_hits[k] += hits

    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = image_hits[k] / max(m, 1)
        metrics[f"text_retrieval_recall@{k}"] = text_hits[k] / max(len(queries), 1)
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics


def embed_image_sources(model, images: list, boxes: list | None = None, batch_size: int = 64,
                        progress: bool = False, desc: str = "images") -> tuple[torch.Tensor, list[int]]:
    """Unit-norm embeddings [n_kept, D] (fp32) of images given as encoded bytes or file paths, and the indices of
    the images kept: one that cannot be read or decoded is skipped with a warning, never fatal."""
    out, kept = [], []
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            prepared = []
            for i in range(start, min(start + batch_size, len(images))):
                try:
                    data = images[i] if isinstance(images[i], bytes) else Path(images[i]).read_bytes()
                    prepared.append(model.prepare_image(data, boxes[i] if boxes else None))
                    kept.append(i)
                except Exception as err:
                    log.warning("skipping image %d: %s", i, err)
            if prepared:
                out.append(model.embed_prepared(prepared).cpu())
            bar.update(min(batch_size, len(images) - start))
    return (torch.cat(out) if out else torch.zeros(0, model.config.embed_dim)), kept


def embed_texts_batched(model, texts: list[str], batch_size: int = 256, progress: bool = False,
                        desc: str = "texts") -> torch.Tensor:
    """Unit-norm text embeddings [N, D] (fp32), `batch_size` texts per forward pass."""
    out = [model.embed_texts(texts[start:start + batch_size]).cpu()
           for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress)]
    return torch.cat(out) if out else torch.zeros(0, model.config.embed_dim)


def model_name(model) -> str:
    """The architecture, for the `model` field of CLIP_benchmark's layout (`pretrained` holds the folder)."""
    return f"brivl-{model.config.image.backbone}-{model.config.text.model_type}"


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


def evaluate_captioned(model, data: CaptionedImages, ks: tuple[int, ...] = (1, 5, 10), batch_size: int = 64,
                       chunk: int = 256, progress: bool = False) -> dict:
    """Embed the images (skipping undecodable ones, and their captions) and captions; the metrics and counts."""
    image_emb, kept = embed_image_sources(model, data.images, data.boxes, batch_size, progress)
    texts, text_image = [], []
    for new, old in enumerate(kept):
        texts += data.captions[old]
        text_image += [new] * len(data.captions[old])
    text_emb = embed_texts_batched(model, texts, batch_size, progress)
    return {"metrics": retrieval_metrics(image_emb, text_emb, torch.tensor(text_image, dtype=torch.long), ks, chunk),
            "n_images": len(kept), "n_texts": len(texts), "skipped": len(data.images) - len(kept)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a folder written by brivl_ds.export")
    parser.add_argument("--data", type=Path, required=True, help="Parquet shards, or a .jsonl of images and captions")
    parser.add_argument("--image-root", type=Path, help="base folder of the JSONL's image paths")
    parser.add_argument("--out", type=Path, required=True, help="the result JSON")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=256, help="queries scored at a time")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from brivl_ds.export import load_model

    model = load_model(args.model, args.device)
    data = (read_caption_jsonl(args.data, args.image_root) if args.data.suffix == ".jsonl"
            else read_caption_shards(args.data))
    result = evaluate_captioned(model, data, tuple(args.ks), args.batch_size, args.chunk, not args.no_progress)
    record = {"dataset": str(args.data), "model": model_name(model), "pretrained": str(args.model.resolve()),
              "task": "zeroshot_retrieval", "metrics": result.pop("metrics"), "language": "zh", **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, ensure_ascii=False))
    print(json.dumps(record["metrics"], indent=1))
    print(f"{record['n_images']} images, {record['n_texts']} captions, {record['skipped']} images skipped "
          f"-> {args.out}")
    return record


if __name__ == "__main__":
    main()
