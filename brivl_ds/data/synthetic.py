"""The built-in dataset: generated pictures of coloured shapes with Chinese captions and the shapes' true boxes.

Made offline by the project itself, with real structure to learn: a caption names the background, and for each
shape (left to right) its size, colour and kind, e.g. "灰色背景上有一个大的红色圆形和一个小的蓝色三角形".
Retrieval must bind colour, size and shape per object. Captions do repeat, mostly single-object ones (4 x 2 x 8 x 5
= 320 values): 30% of the 6,000 training rows share their caption with another row, 5.8% of the 500 held-out
rows (each such pair is a false negative for the loss and a tie for Recall@1).

`variant="shapes-hard"` (`--set data.synthetic_variant=shapes-hard`) is a harder variant, generated into a directory
of its own: 2 to 5 objects in 11 colours and 8 kinds, exactly one of them large, listed left to right, and the
vertical relation of the most clearly stacked pair, e.g. "米底上有红圆环、大蓝方块、黄星形，红圆环在蓝方块上方"
(at most 34 characters, 36 tokens with [CLS] and [SEP]). Its zero-shot label (a `texts` entry of kind "label") is
the large object's colour and kind, e.g. "蓝方块": 88 classes. The classic variant's rows are unchanged by it.
"""
from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass
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


# ------------------------------------------------------------------------------------------ the "shapes-hard" variant
VARIANTS = ("shapes", "shapes-hard")
HARD_VERSION = 1  # bump when the hard generator changes: its directories are then generated anew
# One character per colour (captions stay within 40 tokens with 5 objects); white and black are object colours
# too, never on a background of their own colour.
HARD_COLOURS = {"红": (220, 40, 40), "绿": (40, 170, 60), "蓝": (40, 80, 220), "黄": (240, 210, 40),
                "紫": (150, 60, 190), "橙": (245, 140, 30), "青": (40, 200, 210), "粉": (245, 150, 190),
                "棕": (130, 80, 40), "白": (250, 250, 250), "黑": (15, 15, 15)}
HARD_BACKGROUNDS = {"白": (245, 245, 245), "灰": (128, 128, 128), "黑": (20, 20, 20), "米": (225, 210, 180)}
HARD_SHAPES = ["圆形", "方块", "三角", "菱形", "十字", "星形", "圆环", "半圆"]
HARD_CLASSES = [c + k for c in HARD_COLOURS for k in HARD_SHAPES]
"""The zero-shot classes of the hard variant: colour + kind of an image's large object (88)."""
HARD_OBJECTS = (2, 5)  # objects per image, drawn uniformly (a placement that finds no room after 100 tries is dropped)
HARD_BIG, HARD_SMALL = (0.32, 0.40), (0.12, 0.20)  # sides as a share of the image: the large one is >= 1.6x any other
HARD_GAP = 0.02  # a share of the image: the least gap between two objects' cells, and a relation's vertical gap
HARD_MIN_DX = 0.04  # a share of the image: centres at least this far apart, so left-to-right order is clear
HARD_RELATIONS = ("上方", "下方")
HARD_ALPHABET = "".join(HARD_BACKGROUNDS) + "底上有、，大在" + "".join(HARD_COLOURS) + "".join(HARD_SHAPES) + \
    "".join(HARD_RELATIONS)


@dataclass
class HardObject:
    colour: str
    kind: str
    big: bool
    cell: list[float]  # the square it is drawn in, [x1, y1, x2, y2] in pixels
    box: list[float]  # the drawn shape's own extent (a half disc or a star is not square)

    @property
    def name(self) -> str:  # how captions refer to it (unique within an image)
        return self.colour + self.kind

    @property
    def phrase(self) -> str:
        return ("大" if self.big else "") + self.name


@dataclass
class HardExample:
    image: object  # PIL.Image
    caption: str
    label: str
    background: str
    objects: list[HardObject]  # left to right by centre, as the caption lists them
    relation: tuple[int, str, int] | None  # (i, "上方" | "下方", j): objects[i] is above / below objects[j]


def _star(x: float, y: float, s: float) -> list[tuple[float, float]]:
    r, cx, cy = s / 2, x + s / 2, y + s / 2
    return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(math.radians(-90 + 36 * k)),
             cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(math.radians(-90 + 36 * k))) for k in range(10)]


def ring_width(side: float) -> int:
    """The band of a 圆环 in pixels: at least 3, so that it keeps its colour through the blur."""
    return max(3, round(0.25 * side))


def _draw_hard(draw: ImageDraw.ImageDraw, kind: str, cell: list[float], fill) -> list[float]:
    """Draw one object in its square cell; returns the drawn extent [x1, y1, x2, y2]."""
    x, y, x2, y2 = cell
    s = x2 - x
    if kind == "圆形":
        draw.ellipse(cell, fill=fill)
    elif kind == "方块":
        draw.rectangle(cell, fill=fill)
    elif kind == "圆环":
        draw.ellipse(cell, outline=fill, width=ring_width(s))
    elif kind == "半圆":  # the upper half of a disc, centred in the cell: flat side down
        draw.pieslice([x, y + s / 4, x2, y + 5 * s / 4], 180, 360, fill=fill)
        return [x, y + s / 4, x2, y + 3 * s / 4]
    else:
        points = _star(x, y, s) if kind == "星形" else _polygon({"三角": "三角形", "菱形": "菱形", "十字": "十字形"}[kind],
                                                               x, y, s)
        draw.polygon(points, fill=fill)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        return [min(xs), min(ys), max(xs), max(ys)]
    return list(cell)


def _apart(a: list[float], b: list[float], gap: float) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def make_hard_example(rng: random.Random, size: int) -> HardExample:
    background = rng.choice(list(HARD_BACKGROUNDS))
    image = Image.new("RGB", (size, size), HARD_BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    colours = [c for c in HARD_COLOURS if c != background]
    objects: list[HardObject] = []
    for n in range(rng.randint(*HARD_OBJECTS)):
        big = n == 0  # the large object first: it needs the most room
        for _attempt in range(100):
            s = rng.uniform(*(HARD_BIG if big else HARD_SMALL)) * size
            x, y = rng.uniform(0, size - s), rng.uniform(0, size - s)
            cell = [x, y, x + s, y + s]
            if all(_apart(cell, o.cell, HARD_GAP * size) and abs(x + s / 2 - (o.cell[0] + o.cell[2]) / 2)
                   >= HARD_MIN_DX * size for o in objects):
                break
        else:
            continue
        taken = {o.name for o in objects}
        colour, kind = rng.choice([(c, k) for c in colours for k in HARD_SHAPES if c + k not in taken])
        box = _draw_hard(draw, kind, cell, HARD_COLOURS[colour])
        objects.append(HardObject(colour, kind, big, cell, box))
    label = objects[0].name
    objects.sort(key=lambda o: o.cell[0] + o.cell[2])  # left to right by centre
    caption = f"{background}底上有" + "、".join(o.phrase for o in objects)
    # The relation: of the pairs one of which lies wholly above the other, the one with the widest vertical gap;
    # said of the left one of the pair ("<left>在<right>上方/下方").
    gaps = [(max(b.box[1] - a.box[3], a.box[1] - b.box[3]), i, j)
            for i, a in enumerate(objects) for j, b in enumerate(objects) if i < j]
    gap, i, j = max(gaps, default=(0.0, 0, 0))  # (one object only if no other found room)
    relation = None
    if gap >= HARD_GAP * size:
        relation = (i, HARD_RELATIONS[0] if objects[i].box[3] < objects[j].box[1] else HARD_RELATIONS[1], j)
        caption += f"，{objects[i].name}在{objects[j].name}{relation[1]}"
    if rng.random() < 0.5:  # mild photographic noise, as in the classic variant
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return HardExample(image, caption, label, background, objects, relation)


def _hard_rows(n: int, seed: int, size: int, split: str) -> list[Row]:
    rng = random.Random(f"{seed}-{split}-shapes-hard")
    rows = []
    for i in range(n):
        example = make_hard_example(rng, size)
        buf = io.BytesIO()
        example.image.save(buf, format="JPEG", quality=92)
        rows.append(Row(id=f"shapes-hard-{split}-{i:06d}", image=buf.getvalue(), width=size, height=size,
                        text=example.caption, boxes=[[round(v, 2) for v in o.box] for o in example.objects],
                        texts=[{"kind": "sur_text", "text": example.caption},
                               {"kind": "label", "text": example.label}], source="brivl-ds-shapes-hard"))
    return rows


# ------------------------------------------------------------------------------------------------------- both
def shapes_dataset_paths(out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    return {"train": out / "train", "eval": out / "eval", "tokenizer": out / "tokenizer"}


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"data.synthetic_variant={variant!r}: choose one of {', '.join(VARIANTS)}")
    return variant


def default_synthetic_dir(variant: str) -> str:
    """Where a variant is generated unless data.synthetic_dir says otherwise: runs/data/<variant>."""
    return f"runs/data/{check_variant(variant)}"


def ensure_shapes_dataset(out_dir: str | Path, n_train: int, n_eval: int, image_size: int = 128, seed: int = 0,
                          variant: str = "shapes") -> dict[str, Path]:
    """Generate (once) train/ and eval/ shards plus a tokenizer/; returns their paths. Reused when present with
    the same spec (DONE.json); a directory of another spec or variant is generated anew."""
    out = Path(out_dir)
    spec = {"version": VERSION, "n_train": n_train, "n_eval": n_eval, "image_size": image_size, "seed": seed}
    if check_variant(variant) != "shapes":  # the classic spec stays as it was: existing directories are reused
        spec |= {"variant": variant, "variant_version": HARD_VERSION}
    paths = shapes_dataset_paths(out)
    done = out / "DONE.json"
    if done.exists() and json.loads(done.read_text()) == spec:
        return paths
    done.unlink(missing_ok=True)  # an interrupted regeneration must not leave the old spec claiming new shards
    make_rows = _rows if variant == "shapes" else _hard_rows
    train = make_rows(n_train, seed, image_size, "train")
    held_out = make_rows(n_eval, seed, image_size, "eval")
    write_shards(train, paths["train"], rows_per_shard=max(1, math.ceil(n_train / 4)))
    write_shards(held_out, paths["eval"])
    # The vocabulary covers every character the generator can emit, so held-out captions never hit [UNK].
    if variant == "shapes":
        alphabet = "".join(COLOURS) + "".join(BACKGROUNDS) + "".join(SHAPES) + "".join(SIZES) + "背景上有一个的和、"
    else:
        alphabet = HARD_ALPHABET
    write_char_tokenizer([alphabet] + [r.text for r in train], paths["tokenizer"])
    done.write_text(json.dumps(spec))
    return paths
