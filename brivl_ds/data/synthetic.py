"""The built-in dataset: generated pictures of coloured shapes with Chinese captions and the shapes' true boxes.

Made offline by the project itself, with real structure to learn: a caption names the background, and for each
shape (left to right) its size, colour and kind, e.g. "灰色背景上有一个大的红色圆形和一个小的蓝色三角形".
Retrieval must bind colour, size and shape per object; captions rarely repeat, so Recall@K is meaningful.
"""
from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from brivl_ds.data.shards import Row, write_shards
from brivl_ds.data.tokenizer import write_char_tokenizer

COLOURS = {"红色": (220, 40, 40), "绿色": (40, 170, 60), "蓝色": (40, 80, 220), "黄色": (240, 210, 40),
           "紫色": (150, 60, 190), "橙色": (245, 140, 30), "青色": (40, 200, 210), "粉色": (245, 150, 190)}
BACKGROUNDS = {"白色": (245, 245, 245), "灰色": (128, 128, 128), "黑色": (20, 20, 20), "米色": (225, 210, 180)}
SHAPES = ["圆形", "正方形", "三角形", "菱形", "十字形"]
SIZES = {"大": (0.30, 0.42), "小": (0.14, 0.22)}
VERSION = 2  # 2: shards carry image_sha256 and row-group sizes in the manifest


def _polygon(shape: str, x: float, y: float, s: float) -> list[tuple[float, float]] | None:
    if shape == "三角形":
        return [(x + s / 2, y), (x + s, y + s), (x, y + s)]
    if shape == "菱形":
        return [(x + s / 2, y), (x + s, y + s / 2), (x + s / 2, y + s), (x, y + s / 2)]
    if shape == "十字形":
        a, b = x + s / 3, x + 2 * s / 3
        c, d = y + s / 3, y + 2 * s / 3
        return [(a, y), (b, y), (b, c), (x + s, c), (x + s, d), (b, d), (b, y + s), (a, y + s), (a, d), (x, d),
                (x, c), (a, c)]
    return None


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    x, y, x2, _ = box
    s = x2 - x
    if shape == "圆形":
        draw.ellipse(box, fill=fill)
    elif shape == "正方形":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(_polygon(shape, x, y, s), fill=fill)


def make_example(rng: random.Random, size: int) -> tuple[Image.Image, str, list[list[float]]]:
    background = rng.choice(list(BACKGROUNDS))
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    objects: list[tuple[float, str, str, str, list[float]]] = []
    for _ in range(rng.choice([1, 2, 2, 3])):
        for _attempt in range(50):  # rejection-sample a place that overlaps no other shape
            size_word = rng.choice(list(SIZES))
            s = rng.uniform(*SIZES[size_word]) * size
            x, y = rng.uniform(0, size - s), rng.uniform(0, size - s)
            box = [x, y, x + s, y + s]
            if all(box[2] < o[4][0] or box[0] > o[4][2] or box[3] < o[4][1] or box[1] > o[4][3] for o in objects):
                colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
                _draw(draw, shape, tuple(box), COLOURS[colour])
                objects.append((x, size_word, colour, shape, box))
                break
    objects.sort(key=lambda o: o[0])
    phrases = [f"一个{o[1]}的{o[2]}{o[3]}" for o in objects]
    caption = f"{background}背景上有" + ("、".join(phrases[:-1]) + "和" + phrases[-1] if len(phrases) > 1
                                         else phrases[0])
    if rng.random() < 0.5:  # mild photographic noise so the backbone cannot key on exact pixel values
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return image, caption, [[round(v, 2) for v in o[4]] for o in objects]


def _rows(n: int, seed: int, size: int, split: str) -> list[Row]:
    rng = random.Random(f"{seed}-{split}")
    rows = []
    for i in range(n):
        image, caption, boxes = make_example(rng, size)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=92)
        rows.append(Row(id=f"shapes-{split}-{i:06d}", image=buf.getvalue(), width=size, height=size, text=caption,
                        boxes=boxes, texts=[{"kind": "sur_text", "text": caption}], source="brivl-ds-shapes"))
    return rows


def shapes_dataset_paths(out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    return {"train": out / "train", "eval": out / "eval", "tokenizer": out / "tokenizer"}


def ensure_shapes_dataset(out_dir: str | Path, n_train: int, n_eval: int, image_size: int = 128, seed: int = 0
                          ) -> dict[str, Path]:
    """Generate (once) train/ and eval/ shards plus a tokenizer/; returns their paths. Reused when present."""
    out = Path(out_dir)
    spec = {"version": VERSION, "n_train": n_train, "n_eval": n_eval, "image_size": image_size, "seed": seed}
    paths = shapes_dataset_paths(out)
    done = out / "DONE.json"
    if done.exists() and json.loads(done.read_text()) == spec:
        return paths
    train = _rows(n_train, seed, image_size, "train")
    held_out = _rows(n_eval, seed, image_size, "eval")
    write_shards(train, paths["train"], rows_per_shard=max(1, math.ceil(n_train / 4)))
    write_shards(held_out, paths["eval"])
    # The vocabulary covers every character the generator can emit, so held-out captions never hit [UNK].
    alphabet = "".join(COLOURS) + "".join(BACKGROUNDS) + "".join(SHAPES) + "".join(SIZES) + "背景上有一个的和、"
    write_char_tokenizer([alphabet] + [r.text for r in train], paths["tokenizer"])
    done.write_text(json.dumps(spec))
    return paths
