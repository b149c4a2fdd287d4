"""The built-in dataset: the classic variant is pinned (the quick start's measured numbers depend on its exact rows),
and generation is deterministic."""
import hashlib
import json

from brivl_ds.data.synthetic import _rows, ensure_shapes_dataset
from brivl_ds.data.tokenizer import load_tokenizer

# sha256 of 8 rows per split (seed 0, 64 px), computed with the generator of commit 31a118d. "text" covers what the
# Python RNG alone decides (ids, captions, boxes, texts, source); "image" the JPEG bytes, which also depend on
# Pillow's drawing, blur and libjpeg (constraints.txt pins Pillow 13.0.0): if only "image" fails, Pillow changed.
CLASSIC_PINS = {
    "train": {"text": "c75f698d50d06e7ec175e319fb50f09e6c0273e077b669ba3473e0802a35e68f",
              "image": "cdbf9519e5e51115de83df75064dd191a56b6373a13cf25b7ef602b3a395b0b5"},
    "eval": {"text": "fdd713cd3d3e2d7dda32fb4edc4adf3b0d419b39f9fcf3d1ba6141a47535b2e0",
             "image": "5242670903a0b9c853c10d1c8f7e896ba9eed2aad442f804af4f83e2fd023fcf"},
}
CLASSIC_VOCAB = "、一三上个十和圆大字小形方景有橙正灰白的米粉紫红绿背色菱蓝角青黄黑"


def row_digests(rows) -> dict[str, str]:
    text = json.dumps([[r.id, r.text, r.boxes, r.texts, r.source] for r in rows], ensure_ascii=False)
    return {"text": hashlib.sha256(text.encode()).hexdigest(),
            "image": hashlib.sha256(b"".join(r.image for r in rows)).hexdigest()}


def test_classic_rows_are_pinned():
    for split, pins in CLASSIC_PINS.items():
        assert row_digests(_rows(8, 0, 64, split)) == pins, split


def test_classic_dataset_spec_and_vocabulary_are_pinned(tmp_path):
    """A directory generated before the variants existed is reused as is (same DONE.json), with the same
    tokenizer."""
    paths = ensure_shapes_dataset(tmp_path, n_train=16, n_eval=8, image_size=64)
    assert (tmp_path / "DONE.json").read_text() == \
        '{"version": 2, "n_train": 16, "n_eval": 8, "image_size": 64, "seed": 0}'
    vocab = load_tokenizer(paths["tokenizer"]).get_vocab()
    assert "".join(sorted(vocab, key=vocab.get)) == "[PAD][UNK][CLS][SEP][MASK]" + CLASSIC_VOCAB


# ------------------------------------------------------------------------------------------------- shapes-hard
import collections  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402

from brivl_ds.config import TextTowerConfig, build_config  # noqa: E402
from brivl_ds.data.shards import read_table  # noqa: E402
from brivl_ds.data.synthetic import (HARD_ALPHABET, HARD_BACKGROUNDS, HARD_CLASSES, HARD_COLOURS,  # noqa: E402
                                     HARD_OBJECTS, HARD_RELATIONS, HARD_SHAPES, _hard_rows, default_synthetic_dir,
                                     make_example, make_hard_example, ring_width)

_ANY = lambda names: "|".join(map(re.escape, names))  # noqa: E731
OBJECT = re.compile(f"(大)?({_ANY(HARD_COLOURS)})({_ANY(HARD_SHAPES)})")
CAPTION = re.compile(f"({_ANY(HARD_BACKGROUNDS)})底上有((?:大?(?:{_ANY(HARD_COLOURS)})(?:{_ANY(HARD_SHAPES)})、?)+)"
                     f"(?:，(.+?)在(.+?)({_ANY(HARD_RELATIONS)}))?")


def parse_hard_caption(caption: str) -> dict:
    """A shapes-hard caption read back: background, [(big, colour, kind)] in caption order, relation or None."""
    m = CAPTION.fullmatch(caption)
    assert m, caption
    objects = [OBJECT.fullmatch(p).groups() for p in m[2].split("、")]
    return {"background": m[1], "objects": [(big == "大", colour, kind) for big, colour, kind in objects],
            "relation": (m[3], m[5], m[4]) if m[3] else None}


def hard_examples(n: int, size: int = 96, seed: str = "test"):
    rng = random.Random(seed)
    return [make_hard_example(rng, size) for _ in range(n)]


def test_hard_generation_is_deterministic(tmp_path):
    first, again = _hard_rows(12, 0, 64, "train"), _hard_rows(12, 0, 64, "train")
    assert [vars(r) for r in first] == [vars(r) for r in again]
    assert row_digests(_hard_rows(12, 1, 64, "train")) != row_digests(first)
    assert {r.text for r in first}.isdisjoint({r.text for r in _hard_rows(12, 0, 64, "eval")})
    # whole directories, shard files included, byte for byte
    for d in ("a", "b"):
        ensure_shapes_dataset(tmp_path / d, n_train=12, n_eval=6, image_size=64, variant="shapes-hard")
    manifests = [json.loads((tmp_path / d / split / "manifest.json").read_text())
                 for d in ("a", "b") for split in ("train", "eval")]
    assert manifests[:2] == manifests[2:]


def test_hard_captions_describe_the_drawn_objects():
    """Parsed back, a caption lists exactly the generator's objects, left to right, one of them large (and clearly
    the largest), with the true relation; the pixels at each object show its colour."""
    examples = hard_examples(400)
    for e in examples:
        parsed = parse_hard_caption(e.caption)
        assert parsed["background"] == e.background
        assert parsed["objects"] == [(o.big, o.colour, o.kind) for o in e.objects]
        assert HARD_OBJECTS[0] <= len(e.objects) <= HARD_OBJECTS[1]
        centres = [(o.cell[0] + o.cell[2]) / 2 for o in e.objects]
        assert all(b - a >= 0.04 * 96 for a, b in zip(centres, centres[1:]))  # left to right, clearly
        (big,) = [o for o in e.objects if o.big]
        side = lambda o: o.cell[2] - o.cell[0]  # noqa: E731
        assert all(side(big) >= 1.6 * side(o) for o in e.objects if o is not big)
        assert e.label == big.colour + big.kind
        assert len({o.colour + o.kind for o in e.objects}) == len(e.objects)  # references are unambiguous
        assert all(o.colour != e.background for o in e.objects)  # never invisible
        if parsed["relation"] is None:
            assert e.relation is None
        else:
            a, relation, b = parsed["relation"]
            i, rel, j = e.relation
            assert (a, relation, b) == (e.objects[i].colour + e.objects[i].kind, rel,
                                        e.objects[j].colour + e.objects[j].kind)
            upper, lower = (e.objects[i], e.objects[j]) if rel == "上方" else (e.objects[j], e.objects[i])
            assert upper.box[3] + 0.02 * 96 <= lower.box[1]  # wholly above, by a visible gap
        for o in e.objects:
            x1, y1, x2, y2 = o.box
            w, h = x2 - x1, y2 - y1
            # a point inside the shape's filled part: the middle of the ring's band (PIL draws it from pixel
            # int(x1) on), the half disc's lower middle, the triangle's centroid, else the centre
            point = {"圆环": (int(x1) + ring_width(w) // 2, (y1 + y2) / 2), "半圆": ((x1 + x2) / 2, y2 - 0.3 * h),
                     "三角": ((x1 + x2) / 2, y1 + 2 * h / 3)}.get(o.kind, ((x1 + x2) / 2, (y1 + y2) / 2))
            pixel = e.image.getpixel(tuple(round(v) for v in point))
            assert max(abs(p - q) for p, q in zip(pixel, HARD_COLOURS[o.colour])) <= 60, (e.caption, o, pixel)
    kinds = collections.Counter(o.kind for e in examples for o in e.objects)
    assert set(kinds) == set(HARD_SHAPES)
    assert 0.8 < sum(e.relation is not None for e in examples) / len(examples) < 0.97  # measured: 0.90


def test_hard_captions_fit_the_tiny_presets_max_length(tmp_path):
    """Every caption fits model.text.max_length = 40 after tokenisation (the longest possible: 5 objects and a
    relation, 34 characters = 36 tokens), and the vocabulary written with the data covers every character."""
    from brivl_ds.data.tokenizer import load_tokenizer

    paths = ensure_shapes_dataset(tmp_path, n_train=8, n_eval=4, image_size=64, variant="shapes-hard")
    tokenizer = load_tokenizer(paths["tokenizer"])
    vocab = tokenizer.get_vocab()
    assert set(HARD_ALPHABET) <= set(vocab)
    captions = [e.caption for e in hard_examples(3000, size=64, seed="lengths")]
    lengths = [len(tokenizer(c)["input_ids"]) for c in captions]
    assert all(n == len(c) + 2 for n, c in zip(lengths, captions))  # one token per character, no [UNK] merging
    assert not any(tokenizer.unk_token_id in tokenizer(c)["input_ids"] for c in captions)
    longest = 4 + HARD_OBJECTS[1] * (1 + 2) + 1 + (HARD_OBJECTS[1] - 1) + 1 + 3 + 1 + 3 + 2  # by the grammar
    assert build_config("tiny").model.text.max_length == TextTowerConfig().max_length == 40
    assert max(lengths) == longest + 2 == 36
    assert 25 < sum(lengths) / len(lengths) < 31  # measured: 29.0 tokens on average


def duplicated_share(captions: list[str]) -> float:
    """The share of captions that some other caption of the list equals (each copy counted)."""
    counts = collections.Counter(captions)
    return sum(n for n in counts.values() if n > 1) / len(captions)


def test_hard_captions_rarely_repeat_unlike_the_classic_ones():
    """Duplicated captions are false negatives for a contrastive loss and ties for recall. Of 2,000 classic rows,
    21.6% share their caption with another row (1,736 distinct captions: single-object captions have only
    4 x 2 x 8 x 5 = 320 values); the hard variant's shortest caption (2 objects, no relation) already has
    4 backgrounds x ~80 x ~79 ordered kinds x 2 sizes ~ 50,000 values, so a repeat in 2,000 rows is rare (measured:
    none in 2,000; 6 rows, 3 pairs, in 5,000). Bound: 0.5% (10 rows)."""
    hard = duplicated_share([e.caption for e in hard_examples(2000, size=64, seed="0-train-shapes-hard")])
    rng = random.Random("0-train")
    classic = duplicated_share([make_example(rng, 64)[1] for _ in range(2000)])
    assert hard <= 0.005
    assert classic == pytest.approx(0.2155, abs=0.002)  # the classic generator's (pinned) captions


def test_a_directory_of_the_other_variant_is_generated_anew_not_reused(tmp_path):
    ensure_shapes_dataset(tmp_path, n_train=8, n_eval=4, image_size=64)
    ensure_shapes_dataset(tmp_path, n_train=8, n_eval=4, image_size=64, variant="shapes-hard")
    assert json.loads((tmp_path / "DONE.json").read_text())["variant"] == "shapes-hard"
    assert {r["source"] for r in read_table(tmp_path / "eval", columns=["source"]).to_pylist()} == \
        {"brivl-ds-shapes-hard"}
    ensure_shapes_dataset(tmp_path, n_train=8, n_eval=4, image_size=64)
    assert "variant" not in json.loads((tmp_path / "DONE.json").read_text())
    assert read_table(tmp_path / "eval", columns=["text"]).column("text").to_pylist() == \
        [r.text for r in _rows(4, 0, 64, "eval")]
    with pytest.raises(ValueError, match="shapes, shapes-hard"):
        ensure_shapes_dataset(tmp_path, n_train=8, n_eval=4, variant="shapes-harder")


def test_the_trainer_finds_each_variant_in_its_own_directory(tmp_path, monkeypatch):
    import torch

    from brivl_ds.distributed import DistInfo
    from brivl_ds.training.setup import with_builtin_data

    assert (default_synthetic_dir("shapes"), default_synthetic_dir("shapes-hard")) == \
        ("runs/data/shapes", "runs/data/shapes-hard")
    monkeypatch.chdir(tmp_path)
    small = ["data.synthetic_train=8", "data.synthetic_eval=4", "model.image.image_size=64"]
    main, other = (DistInfo(rank, 2, rank, 2, torch.device("cpu")) for rank in (0, 1))
    cfg = with_builtin_data(build_config("tiny", small + ["data.synthetic_variant=shapes-hard"]), main)
    assert cfg.data.synthetic_dir == "runs/data/shapes-hard"
    assert cfg.data.train_path == "runs/data/shapes-hard/train"
    assert cfg.model.text.tokenizer_path == "runs/data/shapes-hard/tokenizer"
    assert json.loads((tmp_path / "runs/data/shapes-hard/DONE.json").read_text())["variant"] == "shapes-hard"
    assert with_builtin_data(build_config("tiny", small), main).data.eval_path == "runs/data/shapes/eval"
    for info in (main, other):  # refused on every rank, before rank 0 would generate anything
        with pytest.raises(ValueError, match="synthetic_variant='hard'"):
            with_builtin_data(build_config("tiny", small + ["data.synthetic_variant=hard"]), info)


def test_hard_benchmark_has_88_classes_named_by_the_large_object(tmp_path):
    from brivl_ds.evaluation.zeroshot import background_of, make_shapes_benchmark

    paths = ensure_shapes_dataset(tmp_path / "data", n_train=4, n_eval=60, image_size=64, variant="shapes-hard")
    counts = make_shapes_benchmark(paths["eval"], tmp_path / "bench")
    classes = (tmp_path / "bench" / "classes.txt").read_text(encoding="utf-8").split()
    assert classes == HARD_CLASSES == list(counts) and len(classes) == 88 == len(set(classes))
    assert sum(counts.values()) == 60 and sum(n > 0 for n in counts.values()) > 20
    rows = read_table(paths["eval"], columns=["id", "image", "text"]).to_pylist()
    files = {p.stem: p for p in (tmp_path / "bench").glob("*/*.jpg")}
    assert len(files) == 60
    for r in rows:
        label = files[r["id"]].parent.name
        big = [c + k for is_big, c, k in parse_hard_caption(r["text"])["objects"] if is_big]
        assert big == [label]  # the class is the caption's large object
        assert files[r["id"]].read_bytes() == r["image"]
        assert background_of(r["text"]) == r["text"][0] + "色"
    # every class name fits the zh templates as a short noun phrase of the captions' own words
    assert all(len(c) == 3 and c[0] in HARD_COLOURS and c[1:] in HARD_SHAPES for c in classes)
