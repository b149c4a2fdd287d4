"""Data-loading benchmark: samples/s per CPU core for decode + augment + collate, PairTransform vs a straightforward
PIL + torchvision-transforms loop at the same output size, and the converter's rows/s.

  python -m brivl_ds.bench.data [--size 380 600] [--n 200] [--source-px 1024] [--stages] [--quick]

Inputs are generated photo-like JPEGs (smooth colour fields, shapes, a texture and sensor-like noise at JPEG quality
90; flat colours would decode unrealistically fast), kept in memory. Timing runs in this one process with
torch.set_num_threads(1), so the numbers are per core; each figure is the best of --repeats passes, which is the
most stable statistic on a shared machine. It prints what it measured and asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, ImageDraw, ImageFilter, features
from torchvision import transforms as T

from brivl_ds.bench import cores, cpu_model
from brivl_ds.config import AugmentConfig, base
from brivl_ds.data import transforms as ours
from brivl_ds.data.transforms import PairTransform
from brivl_ds.models.brivl import IMAGENET_MEAN, IMAGENET_STD

MAX_BOXES = 36


# ------------------------------------------------------------------------------------------------------------ inputs
def photo_like(rng: np.random.Generator, long_side: int) -> tuple[bytes, list[list[float]]]:
    """One JPEG with natural-image-like statistics and the boxes of the shapes drawn on it."""
    short = int(rng.integers(long_side * 5 // 8, long_side + 1))
    w, h = (long_side, short) if rng.random() < 0.7 else (short, long_side)
    field = rng.normal(128, 50, (4, 6, 3)).clip(0, 255).astype(np.uint8)  # sky/ground-like smooth gradients
    image = Image.fromarray(field).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    boxes = []
    for _ in range(int(rng.integers(3, 9))):
        x1, y1 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        x2, y2 = min(w, x1 + int(rng.integers(30, w // 2))), min(h, y1 + int(rng.integers(30, h // 2)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x1, y1, x2 - 1, y2 - 1], fill=colour)
        boxes.append([float(x1), float(y1), float(x2), float(y2)])
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pixels += (12 * np.sin(xx / rng.uniform(3, 9) + 0.7 * np.sin(yy / rng.uniform(5, 20))))[..., None]  # texture
    pixels += rng.normal(0, 8, pixels.shape).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue(), boxes


def make_inputs(n: int, long_side: int, seed: int = 0) -> list[tuple[bytes, list[list[float]]]]:
    rng = np.random.default_rng(seed)
    return [photo_like(rng, long_side) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------- pipelines
def baseline_transform(aug: AugmentConfig, size: int) -> T.Compose:
    """What one would write first with torchvision.transforms (v1) on PIL images."""
    j = aug.color_jitter
    return T.Compose([
        T.RandomResizedCrop(size, scale=(aug.crop_scale_min, 1.0)),
        T.RandomHorizontalFlip(aug.hflip_prob),
        T.ColorJitter(j, j, j),
        T.RandomGrayscale(aug.grayscale_prob),
        T.RandomApply([T.GaussianBlur(ours.BLUR_KERNEL, ours.BLUR_SIGMA)], p=aug.blur_prob),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def run_baseline(inputs, transform: T.Compose, batch: int) -> None:
    for i in range(0, len(inputs), batch):
        torch.stack([transform(Image.open(io.BytesIO(data)).convert("RGB")) for data, _ in inputs[i:i + batch]])


def run_ours(inputs, transform: PairTransform, batch: int) -> None:
    for i in range(0, len(inputs), batch):
        samples = [transform(data, boxes, seed) for seed, (data, boxes) in enumerate(inputs[i:i + batch], i)]
        collate(samples)


def collate(samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.stack(parts) for parts in zip(*samples))


def best_rate(fn, n: int, repeats: int) -> float:
    """Samples/s of the fastest of `repeats` passes (one untimed warm-up pass first)."""
    fn()
    best = min(_timed(fn) for _ in range(repeats))
    return n / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------------------ stages
class Stopwatch:
    """Adds the time since the previous lap to spent[name]."""

    def __init__(self, spent: Counter):
        self.spent, self.last = spent, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.spent[name] += now - self.last
        self.last = now


def timed_sample(t: PairTransform, data: bytes, boxes, seed: int, spent: Counter):
    """PairTransform.__call__ step by step with a stopwatch (a test checks it returns the same sample)."""
    watch = Stopwatch(spent)
    encoded = Image.open(io.BytesIO(data))
    width, height = encoded.size
    p = t.params(seed, width, height)
    watch.lap("header + random draws")
    pixels, scale = ours.decode_for_crop(encoded, p.crop, t.size)
    watch.lap("decode (JPEG at reduced scale when the crop allows)")
    crop = ours.crop_in_decoded(p.crop, scale, *pixels.shape[1:])
    image = ours.image_geometry(pixels, crop, p.flip, t.size)
    watch.lap("crop + resize + flip (torch uint8 kernel)")
    image = ours.adjust_color(image, p)
    watch.lap("jitter + grayscale (one colour matrix)")
    if p.blur_sigma is not None:
        image = ours.gaussian_blur(image, p.blur_sigma)
    watch.lap(f"blur (p={t.aug.blur_prob}, 8-bit fixed point)")
    boxes = ours.as_boxes(boxes)
    taken = tuple(v * scale for v in crop)
    out = ours.transform_boxes(boxes, width, height, taken, p.flip, t.size, t.train)
    if t.grid > 0 and len(boxes) == 0:
        out = ours.grid_boxes(t.size, t.size, t.grid)
    seq, mask = ours.box_sequence(out, t.size, t.max_boxes)
    watch.lap("boxes (tv_tensors geometry + official layout)")
    return image, seq, mask


def our_stages(inputs, transform: PairTransform, batch: int) -> dict[str, float]:
    """ms per sample in each step of PairTransform, and of collating."""
    spent: Counter = Counter()
    for i in range(0, len(inputs), batch):
        samples = [timed_sample(transform, data, boxes, seed, spent)
                   for seed, (data, boxes) in enumerate(inputs[i:i + batch], i)]
        watch = Stopwatch(spent)
        collate(samples)
        watch.lap("collate (torch.stack, uint8)")
    return {k: v * 1e3 / len(inputs) for k, v in spent.items()}


def baseline_stages(inputs, transform: T.Compose, batch: int) -> dict[str, float]:
    """ms per sample in each step of the baseline loop, timed one call at a time."""
    names = ["decode + convert('RGB')"] + [type(t).__name__ for t in transform.transforms] + ["torch.stack"]
    spent = dict.fromkeys(names, 0.0)
    for i in range(0, len(inputs), batch):
        tensors = []
        for data, _ in inputs[i:i + batch]:
            start = time.perf_counter()
            x = Image.open(io.BytesIO(data)).convert("RGB")
            spent[names[0]] += time.perf_counter() - start
            for name, t in zip(names[1:], transform.transforms):
                start = time.perf_counter()
                x = t(x)
                spent[name] += time.perf_counter() - start
            tensors.append(x)
        start = time.perf_counter()
        torch.stack(tensors)
        spent["torch.stack"] += time.perf_counter() - start
    return {k: v * 1e3 / len(inputs) for k, v in spent.items()}


# --------------------------------------------------------------------------------------------------------- converter
def converter_rates(inputs, workers: list[int], rows: int) -> dict[int, float] | str:
    """Rows/s of convert.main(["pairs", ...]) on the same JPEGs for each worker count (the converter's own
    "seconds": worker start-up included, interpreter start not), or why it could not run. Shards of
    rows / (4 x most workers) rows so every worker gets work; `rows` lines cycle over the images, enough rows that
    starting the worker processes does not dominate. One worker runs in this process; more run in a fresh
    interpreter, because spawned workers re-import the __main__ module, which here is this benchmark (torch)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        root.mkdir()
        for i, (data, _) in enumerate(inputs):
            (root / f"{i:06d}.jpg").write_bytes(data)
        lines = [json.dumps({"image": f"{i % len(inputs):06d}.jpg", "caption": f"photo {i}",
                             "boxes": inputs[i % len(inputs)][1]}) + "\n" for i in range(rows)]
        jsonl = Path(tmp) / "pairs.jsonl"
        jsonl.write_text("".join(lines))
        shard_rows = max(1, rows // (4 * max(workers)))
        rates = {}
        for n in workers:
            argv = ["pairs", "--input", str(jsonl), "--image-root", str(root), "--out", str(Path(tmp) / f"out{n}"),
                    "--workers", str(n), "--rows-per-shard", str(shard_rows), "--no-progress"]
            try:
                report = _convert(argv) if n == 1 else _convert_in_fresh_python(argv)
                rates[n] = rows / report["seconds"]
            except (Exception, SystemExit) as err:  # e.g. the pairs CLI is not there: report, do not die
                return f"not measured: convert.main({argv[:1]}...) failed with {type(err).__name__}: {err}"
        return rates


def _convert(argv: list[str]) -> dict:
    from brivl_ds.data import convert

    with contextlib.redirect_stdout(io.StringIO()):  # its own report table: we print rows/s only
        return convert.main(argv)


def _convert_in_fresh_python(argv: list[str]) -> dict:
    code = ("import contextlib, io, json, sys\nfrom brivl_ds.data.convert import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    report = main(sys.argv[1:])\n"
            "print(json.dumps(report, default=str))")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------------ report
def machine() -> str:
    turbo = "yes" if features.check_feature("libjpeg_turbo") else "no"
    return (f"{cpu_model()}, {cores()}; torch {torch.__version__}, torchvision "
            f"{torchvision.__version__}, Pillow {PIL.__version__} (libjpeg-turbo: {turbo}); "
            f"torch threads {torch.get_num_threads()}, single process")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m brivl_ds.bench.data", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, nargs="+", default=None, help="output sizes (default 380 600)")
    parser.add_argument("--n", type=int, default=None, help="images (default 200; 8 with --quick)")
    parser.add_argument("--source-px", type=int, default=None, help="long side of the JPEGs (default 1024)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None, help="timed passes, best kept (default 3)")
    parser.add_argument("--stages", action="store_true", help="also print ms per sample for each stage")
    parser.add_argument("--convert-rows", type=int, default=2000, help="rows for the converter rate (default 2000)")
    parser.add_argument("--quick", action="store_true", help="tiny run (small images, one pass) to check it runs")
    args = parser.parse_args(argv)
    quick = args.quick
    args.size = args.size or ([64] if quick else [380, 600])
    args.n = args.n or (8 if quick else 200)
    args.source_px = args.source_px or (160 if quick else 1024)
    args.repeats = args.repeats or (1 if quick else 3)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    aug = base().data.augment
    inputs = make_inputs(args.n, args.source_px)
    batch = min(args.batch, args.n)
    kb = np.mean([len(d) for d, _ in inputs]) / 1e3
    print(f"machine: {machine()}")
    print(f"data: {args.n} photo-like JPEGs, {args.source_px} px long side, quality 90, mean {kb:.0f} KB; batch "
          f"{batch}; train augmentation of the base preset ({aug})")
    print(f"{'size':>5} | {'ours samples/s/core':>19} | {'torchvision samples/s/core':>26} | {'speedup':>7}")
    report: dict = {"sizes": {}}
    for size in args.size:
        transform, baseline = PairTransform(aug, size, MAX_BOXES, 0, train=True), baseline_transform(aug, size)
        rate = best_rate(lambda: run_ours(inputs, transform, batch), args.n, args.repeats)
        base_rate = best_rate(lambda: run_baseline(inputs, baseline, batch), args.n, args.repeats)
        report["sizes"][size] = {"ours": rate, "baseline": base_rate}
        print(f"{size:>5} | {rate:>19.1f} | {base_rate:>26.1f} | {rate / base_rate:>6.2f}x")
        if args.stages:
            print_stages(size, our_stages(inputs, transform, batch), baseline_stages(inputs, baseline, batch))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = [1] if args.quick else sorted({1, cores})  # quick: no worker processes to spawn
    convert_rows = args.n if args.quick else args.convert_rows
    rates = converter_rates(inputs, workers, convert_rows)
    report["converter"] = rates
    if isinstance(rates, str):
        print(f"converter (pairs): {rates}")
    else:
        print(f"converter (pairs, {convert_rows} rows cycling over the same JPEGs; worker start-up included): " + "; ".join(
            f"{n} worker{'s' * (n > 1)}: {r:.1f} rows/s ({r / n:.1f} per core)" for n, r in rates.items()))
    return report


def print_stages(size: int, mine: dict[str, float], theirs: dict[str, float]) -> None:
    print(f"  stages at {size} px, ms per sample:")
    for name, ms in mine.items():
        print(f"    ours     {name:<52} {ms:6.2f}")
    print(f"    ours     {'total':<52} {sum(mine.values()):6.2f}")
    for name, ms in theirs.items():
        print(f"    baseline {name:<52} {ms:6.2f}")
    print(f"    baseline {'total':<52} {sum(theirs.values()):6.2f}")


if __name__ == "__main__":
    main()
