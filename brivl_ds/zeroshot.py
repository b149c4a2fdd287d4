"""Zero-shot image classification with an exported model (`python -m brivl_ds.export`), and a benchmark made from
the built-in shapes data to try it on.

  python -m brivl_ds.zeroshot [run] --model MODEL_DIR --data DATA --classes classes.txt [--templates zh|none|FILE]
                                    [--label-column label] [--out zeroshot_results]
  python -m brivl_ds.zeroshot make-shapes --shards SHARDS --out DIR

DATA is an image folder in the ImageFolder layout (DATA/<class name>/<image files>; every folder must be a name
from classes.txt), or Parquet shards with a label column holding class names or integer indices into classes.txt
(one class name per line; the order defines the indices).

A class is the mean of its prompts' unit-norm text embeddings, normalised again (as OpenCLIP and Chinese-CLIP do);
an image's logits are its dot products with the classes (brivl_ds/evaluation/zeroshot.py). `--templates zh` uses
the built-in Chinese prompts (ZH_TEMPLATES), `none` the bare class name, FILE one template per line with `{}` where
the class name goes.

Output in --out: zeroshot.json, in CLIP_benchmark's layout with fractions in [0, 1]
  {"dataset", "model", "pretrained" (the model folder), "task": "zeroshot_classification", "language": "zh",
   "metrics": {"acc1", "acc5", "mean_per_class_recall"}, "acc5_k" (top-k is capped at the number of classes),
   "n", "skipped", "classes", "templates", "per_class": [{"class", "n", "correct", "acc1"}],
   "confusion": [[count]] (row: true class, column: predicted)}
and confusion.png, the confusion matrix (colour: share of the true class's images; numbers: counts). Undecodable
images are skipped and counted, never fatal.

make-shapes writes DIR/<class>/<id>.jpg and DIR/classes.txt from shards of the built-in dataset: the classic
variant's images labelled by their caption's leading "<colour>背景" (白色, 灰色, 黑色, 米色), shapes-hard's by the
large object's colour and kind (88 classes).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np
import torch

from brivl_ds.evaluation.zeroshot import (is_shards, load_templates, make_shapes_benchmark, plot_confusion,
                                          read_classes, read_image_folder, read_labelled_shards, zeroshot_evaluate)
from brivl_ds.inference.encode import embed_image_sources, embed_texts_batched, model_name


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m brivl_ds.zeroshot [run]", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a folder written by brivl_ds.export")
    parser.add_argument("--data", type=Path, required=True, help="an ImageFolder directory or Parquet shards")
    parser.add_argument("--classes", type=Path, required=True, help="class names, one per line")
    parser.add_argument("--templates", default="zh", help="zh (built in), none, or a file of templates with {}")
    parser.add_argument("--label-column", default="label", help="the shards' label column")
    parser.add_argument("--out", type=Path, default=Path("zeroshot_results"))
    parser.add_argument("--font", type=Path, help="a font file with the class names' glyphs, for the plot")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from brivl_ds.inference.exported import load_model

    classes, templates = read_classes(args.classes), load_templates(args.templates)
    data = (read_labelled_shards(args.data, classes, args.label_column) if is_shards(args.data)
            else read_image_folder(args.data, classes))
    model = load_model(args.model, args.device)
    progress = not args.no_progress
    result = zeroshot_evaluate(
        functools.partial(embed_image_sources, model, batch_size=args.batch_size, progress=progress),
        functools.partial(embed_texts_batched, model, progress=progress, desc="class prompts"),
        data, classes, templates)
    record = {"dataset": str(args.data), "model": model_name(model), "pretrained": str(args.model.resolve()),
              "task": "zeroshot_classification", "metrics": result.pop("metrics"), "language": "zh",
              "acc5_k": result.pop("acc5_k"), "n": result.pop("n"), "skipped": result.pop("skipped"),
              "classes": classes, "templates": templates, **result}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zeroshot.json").write_text(json.dumps(record, indent=1, ensure_ascii=False), encoding="utf-8")
    m = record["metrics"]
    plot_confusion(np.array(record["confusion"]), classes, args.out / "confusion.png", args.font,
                   f"zero-shot top-1 {m['acc1']:.1%}, n = {record['n']}")
    print(f"top-1 {m['acc1']:.4f}  top-{record['acc5_k']} {m['acc5']:.4f}  mean per-class "
          f"{m['mean_per_class_recall']:.4f}  ({record['n']} images, {record['skipped']} skipped) -> "
          f"{args.out / 'zeroshot.json'}, {args.out / 'confusion.png'}")
    return record


def make_shapes(argv: list[str]) -> dict[str, int]:
    parser = argparse.ArgumentParser(prog="python -m brivl_ds.zeroshot make-shapes",
                                     description="A zero-shot benchmark (ImageFolder layout + classes.txt) from "
                                                 "the built-in dataset's shards (by background colour; shapes-hard: "
                                                 "by the large object's colour and kind).")
    parser.add_argument("--shards", type=Path, required=True, help="shards of the built-in dataset")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    counts = make_shapes_benchmark(args.shards, args.out)
    print(f"{sum(counts.values())} images in {args.out} ({counts}); classes in {args.out / 'classes.txt'}")
    return counts


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["make-shapes"]:
        return make_shapes(argv[1:])
    return run(argv[1:] if argv[:1] == ["run"] else argv)  # `run` may be left out, as the issue writes it


if __name__ == "__main__":
    main()
