"""Zero-shot image classification: prompt templates, class names, class embeddings, readers of labelled images
(ImageFolder layout or Parquet shards), the evaluation over a model's embeddings, the confusion-matrix plot, and a
benchmark made from the built-in shapes data (labelled by background colour, or for the shapes-hard variant by the
colour and kind of the large object).

A class is the mean of its prompts' unit-norm text embeddings, normalised again (as OpenCLIP and Chinese-CLIP do);
an image's logits are its dot products with the classes. Accuracies are fractions in [0, 1].
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from brivl_ds.config import IMAGE_SUFFIXES
from brivl_ds.optional_deps import require

log = logging.getLogger(__name__)

# Modelled on Chinese-CLIP's ImageNet zero-shot prompts (OpenAI CLIP's 80 templates as translated by Wukong): the
# photo and drawing ones, leaving out the sculptures, tattoos, toys, origami and video games.
ZH_TEMPLATES = (
    "{}的照片。", "一张{}的照片。", "一张包含{}的照片。", "一张关于{}的照片。", "{}的特写照片。", "{}的近距离照片。",
    "{}的明亮照片。", "{}的深色照片。", "{}的黑白照片。", "{}的模糊照片。", "{}的低分辨率照片。", "{}的裁剪照片。",
    "质量差的{}的照片。", "高质量的{}的照片。", "一幅{}的画。", "{}的素描。", "{}的艺术作品。",
)


def load_templates(spec: str) -> list[str]:
    """`zh` (built in), `none` (the bare class name) or a file with one template per line."""
    if spec == "zh":
        return list(ZH_TEMPLATES)
    if spec == "none":
        return ["{}"]
    templates = [line.strip() for line in Path(spec).read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"{spec}: every template needs a {{}} for the class name (bad: {bad[:3]})")
    return templates


def read_classes(path: str | Path) -> list[str]:
    classes = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    duplicates = sorted({c for c in classes if classes.count(c) > 1})
    if not classes or duplicates:
        raise ValueError(f"{path}: expected distinct class names, one per line (repeated: {duplicates})")
    return classes


def class_embeddings(embed_texts, classes: list[str], templates: list[str]) -> torch.Tensor:
    """[C, D] fp32: per class, the mean of its prompts' normalised embeddings, renormalised. embed_texts(prompts)
    -> [P, D]: a model's text encoder (brivl_ds.inference.encode.embed_texts_batched bound to the model)."""
    prompts = [t.replace("{}", c) for c in classes for t in templates]
    emb = embed_texts(prompts).double()
    emb = F.normalize(emb, dim=-1).view(len(classes), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1).float()


@dataclass
class LabelledImages:
    """Images (encoded bytes or file paths), their boxes (None: the model's fallback layout) and class indices."""
    images: list
    boxes: list | None
    labels: list[int]


def read_image_folder(root: str | Path, classes: list[str]) -> LabelledImages:
    root = Path(root)
    index = {name: i for i, name in enumerate(classes)}
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name not in index]
    if unknown:
        raise ValueError(f"{root}: {len(unknown)} class folders are not in the classes file: {unknown[:10]}")
    data = LabelledImages([], None, [])
    for folder in folders:
        for f in sorted(folder.rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                data.images.append(f)
                data.labels.append(index[folder.name])
    if not data.images:
        raise ValueError(f"{root}: no images in <class>/ folders")
    return data


def read_labelled_shards(path: str | Path, classes: list[str], label_column: str = "label") -> LabelledImages:
    """Rows of Parquet shards; the label column holds class names or integer indices into `classes`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from brivl_ds.data.shards import read_table, shard_paths

    present = set(pq.read_schema(shard_paths(path)[0]).names)
    if label_column not in present:
        raise ValueError(f"{path}: no column {label_column!r} (columns: {sorted(present)}); see --label-column")
    table = read_table(path, columns=["image", label_column] + (["boxes"] if "boxes" in present else []))
    column = table.column(label_column)
    values = column.to_pylist()
    if pa.types.is_integer(column.type):
        bad = sorted({v for v in values if v is None or not 0 <= v < len(classes)}, key=str)
        labels = values
    elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        index = {name: i for i, name in enumerate(classes)}
        bad = sorted({v for v in values if v not in index}, key=str)
        labels = [index.get(v, -1) for v in values]
    else:
        raise ValueError(f"{path}: column {label_column!r} is {column.type}; expected class names or indices")
    if bad:
        raise ValueError(f"{path}: {label_column!r} values that are not classes of the classes file "
                         f"({len(classes)} classes): {bad[:10]}")
    return LabelledImages(table.column("image").to_pylist(),
                          table.column("boxes").to_pylist() if "boxes" in present else None, labels)


def is_shards(path: Path) -> bool:
    return path.is_file() or (path / "manifest.json").exists() or any(path.glob("*.parquet"))


def zeroshot_evaluate(embed_images, embed_texts, data: LabelledImages, classes: list[str], templates: list[str]
                      ) -> dict:
    """{"metrics": {"acc1", "acc5", "mean_per_class_recall"}, "acc5_k", "n", "skipped", "per_class", "confusion"}:
    accuracies as fractions, top-5 over k = min(5, C) classes, confusion rows the true classes.

    embed_texts(prompts) -> [P, D] and embed_images(images, boxes) -> (unit-norm embeddings [n_kept, D], indices
    of the images kept): a model's encoders (brivl_ds.inference.encode's embed_texts_batched and
    embed_image_sources, bound to the model)."""
    weights = class_embeddings(embed_texts, classes, templates)
    image_emb, kept = embed_images(data.images, data.boxes)
    labels = torch.tensor([data.labels[i] for i in kept], dtype=torch.long)
    logits = image_emb.double() @ weights.double().t()  # [n, C]
    k = min(5, len(classes))
    predicted = logits.argmax(1)
    in_top_k = (logits.topk(k, dim=1).indices == labels[:, None]).any(1)
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.long)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    counts, correct = confusion.sum(1), confusion.diagonal()
    n = len(kept)
    per_class = [{"class": c, "n": int(counts[i]), "correct": int(correct[i]),
                  "acc1": float(correct[i] / counts[i]) if counts[i] else None} for i, c in enumerate(classes)]
    present = [p["acc1"] for p in per_class if p["n"]]
    return {"metrics": {"acc1": float(correct.sum()) / max(n, 1), "acc5": float(in_top_k.sum()) / max(n, 1),
                        # over the classes that have images, as sklearn's balanced accuracy (CLIP_benchmark's)
                        "mean_per_class_recall": sum(present) / max(len(present), 1)},
            "acc5_k": k, "n": n, "skipped": len(data.images) - n, "per_class": per_class,
            "confusion": confusion.tolist()}


def label_font(classes: list[str], font: str | Path | None = None):
    """FontProperties of a font with a glyph for every character of the class names: `font` if given, else the
    default font, else any installed one; None when there is none (the plot then labels classes by index)."""
    require("matplotlib", "zeroshot")
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    needed = {ord(ch) for name in classes for ch in name if not ch.isspace()}
    if font:
        candidates = [str(font)]
    else:  # "Last Resort" maps every code point to a placeholder box: it has no real glyphs
        candidates = [font_manager.findfont(font_manager.FontProperties())] + [
            f.fname for f in font_manager.fontManager.ttflist if "Last Resort" not in f.name]
    for path in dict.fromkeys(candidates):
        try:
            charmap = FT2Font(path).get_charmap()
        except (OSError, RuntimeError, ValueError):
            continue
        if needed <= charmap.keys():
            return font_manager.FontProperties(fname=path)
    return None


def plot_confusion(confusion: np.ndarray, classes: list[str], path: str | Path, font: str | Path | None = None,
                   title: str = "") -> Path:
    """The confusion matrix as a PNG: rows true, columns predicted, coloured by the share of the row."""
    require("matplotlib", "zeroshot")
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state to disturb

    confusion = np.asarray(confusion)
    c = len(classes)
    prop = label_font(classes, font)
    side = min(max(5.0, 2.5 + 0.45 * c), 24.0)
    fig = Figure(figsize=(side + 1.2, side), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    share = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    if c <= 30:
        for (i, j), count in np.ndenumerate(confusion):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black")
    if c <= 60:  # beyond that names cannot be read anyway; matplotlib's own index ticks stay
        if prop is not None:
            ax.set_xticks(range(c), classes, rotation=45, ha="right", rotation_mode="anchor", fontproperties=prop)
            ax.set_yticks(range(c), classes, fontproperties=prop)
        else:
            ax.set_xticks(range(c))
            ax.set_yticks(range(c))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if prop is None:
        if font:
            log.warning("%s lacks glyphs of the class names: the plot labels classes by index", font)
        fig.supxlabel("classes by index, named in zeroshot.json's \"classes\"\n"
                      "(no installed font has their glyphs: --font FILE)", fontsize=8)
    fig.savefig(path)
    return Path(path)


def background_of(caption: str) -> str:
    """The background colour a built-in dataset caption starts with ("灰色背景上有..." -> "灰色"; the hard
    variant's "灰底上有..." -> "灰色")."""
    from brivl_ds.data.synthetic import BACKGROUNDS, HARD_BACKGROUNDS

    colour = caption.split("背景", 1)[0]
    if colour not in BACKGROUNDS and caption[:1] in HARD_BACKGROUNDS and caption[1:4] == "底上有":
        colour = caption[0] + "色"
    if colour not in BACKGROUNDS:
        raise ValueError(f"not a caption of the built-in dataset: {caption!r}")
    return colour


def make_shapes_benchmark(shards: str | Path, out: str | Path) -> dict[str, int]:
    """OUT/<class>/<id>.jpg and OUT/classes.txt from built-in dataset shards; images per class. Shards of the
    classic variant are labelled by background colour (4 classes); those of `shapes-hard` by their `texts` entry
    of kind "label", the colour and kind of the image's large object (88 classes, e.g. 蓝方块)."""
    import pyarrow.parquet as pq

    from brivl_ds.data.shards import read_table, shard_paths
    from brivl_ds.data.synthetic import BACKGROUNDS, HARD_CLASSES

    out = Path(out)
    has_texts = "texts" in pq.read_schema(shard_paths(shards)[0]).names
    table = read_table(shards, columns=["id", "image", "text"] + ["texts"] * has_texts)
    ids, images, captions = (table.column(c).to_pylist() for c in ("id", "image", "text"))
    texts = table.column("texts").to_pylist() if has_texts else [[] for _ in ids]
    labels = [next((t["text"] for t in row if t["kind"] == "label"), None) for row in texts]
    if all(label is None for label in labels):  # the classic variant
        classes, labels = list(BACKGROUNDS), [background_of(caption) for caption in captions]
    else:
        classes = HARD_CLASSES
        bad = sorted({str(label) for label in labels if label not in classes})
        if bad:
            raise ValueError(f"{shards}: rows whose label is not a class of the shapes-hard variant (or missing, in "
                             f"shards that mix variants): {bad[:10]}")
    counts = dict.fromkeys(classes, 0)
    for name in classes:
        (out / name).mkdir(parents=True, exist_ok=True)
    for row_id, image, label in zip(ids, images, labels):
        (out / label / f"{row_id}.jpg").write_bytes(image)  # the generator stores JPEG
        counts[label] += 1
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")
    return counts
