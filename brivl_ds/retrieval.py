"""Image-text retrieval with several captions per image (the paper's AIC-ICC test set has five), from an exported
model (`python -m brivl_ds.export`).

  python -m brivl_ds.retrieval --model MODEL_DIR --data SHARDS --out result.json
  python -m brivl_ds.retrieval --model MODEL_DIR --data captions.jsonl [--image-root DIR] --out result.json

SHARDS: Parquet shards (brivl_ds.data.shards) where several rows may share an image: rows are grouped by their
`image_sha256` column when there is one, else by identical image bytes; each row's `text` is one caption.
JSONL: one image per line, {"image": "path", "captions": ["...", ...]}; relative paths are resolved against
--image-root (default: the JSONL's folder).

Metrics follow CLIP_benchmark's conventions, keys and layout, as fractions in [0, 1] (the unit of every
evaluation in brivl_ds.evaluation): `image_retrieval_recall@k` (a caption queries the images; a hit if its image is
in the top k) and `text_retrieval_recall@k` (an image queries the captions; a hit if ANY of its captions is in the
top k), plus `mean_recall`, the mean of all of them (the "MR" the WenLan and Chinese-CLIP papers report). An image
that cannot be decoded is skipped and counted, with its captions; never fatal.

Output (--out):
  {"dataset": DATA, "model": "brivl-<backbone>-<text model>", "pretrained": MODEL_DIR, "task": "zeroshot_retrieval",
   "metrics": {"image_retrieval_recall@1": ..., "text_retrieval_recall@1": ..., ..., "mean_recall": ...},
   "language": "zh", "n_images": ..., "n_texts": ..., "skipped": ...}
"""
from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch

from brivl_ds.evaluation.captioned import evaluate_captioned, read_caption_jsonl, read_caption_shards
from brivl_ds.inference.encode import embed_image_sources, embed_texts_batched, model_name


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

    from brivl_ds.inference.exported import load_model

    model = load_model(args.model, args.device)
    data = (read_caption_jsonl(args.data, args.image_root) if args.data.suffix == ".jsonl"
            else read_caption_shards(args.data))
    progress = not args.no_progress
    result = evaluate_captioned(
        functools.partial(embed_image_sources, model, batch_size=args.batch_size, progress=progress),
        functools.partial(embed_texts_batched, model, batch_size=args.batch_size, progress=progress),
        data, tuple(args.ks), args.chunk)
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
