"""The negatives study's report (brivl_ds/bench/negatives.py): cells averaged over seeds with their spread, every
metric in percent, a missing metric said to be missing, and the loss plot written. The runs it reports come from
the trainer (the README's table); here their records are given, so that the report's arithmetic can be checked."""
from pathlib import Path

import pytest

from brivl_ds.bench.negatives import plot, run_name, summarise, table


def record(mode, batch, seed, r1, zeroshot=None):
    evaluation = {"i2t_r1": r1, "t2i_r1": r1 / 2, "i2t_r5": 0.5, "t2i_r5": 0.25}
    if zeroshot is not None:
        evaluation["zeroshot_acc1"] = zeroshot
    return {"name": run_name(mode, batch, False, seed), "mode": mode, "batch": batch, "mask": False, "seed": seed,
            "seconds": 1.0, "eval": evaluation, "loss": [3.0, 2.0, 1.0], "neg_lse": [], "dup_share": []}


def test_cells_average_their_seeds_and_show_the_spread(tmp_path):
    runs = [record("queue", 4, 1, 0.10, 0.5), record("queue", 4, 2, 0.20, 0.7), record("batch", 4, 1, 0.04)]
    rows = summarise(runs)
    queue = next(r for r in rows if r["mode"] == "queue")
    assert queue["seeds"] == 2 and queue["i2t_r1"] == pytest.approx((0.15, 0.10, 0.20))
    text = table(rows, ranks=2)
    lines = text.splitlines()
    assert lines[0].startswith("| negatives | global batch | masking | seeds | i2t_r1")
    assert "| queue | 8 | off | 2 | 15.0 (10.0-20.0) | 7.5 (5.0-10.0) |" in text
    batch_line = next(line for line in lines if line.startswith("| batch"))
    assert batch_line.endswith("| not measured |")  # no zero-shot metric in that run
    assert run_name("queue+batch", 16, True, 7) == "queue-batch_b16_mask_s7"
    plot(runs, tmp_path / "curves.png", ranks=2)
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_label_caption_data_keeps_every_row_and_captions_it_by_its_label(tmp_path):
    """`--captions label`: the same pictures, ids and boxes as the built-in training rows, each captioned by its
    background and leftmost object's colour, so that captions repeat; the held-out pictures sorted into one folder
    per label; the overrides point at what the trainer needs."""
    from brivl_ds.bench.negatives import LABEL_CLASSES, caption_label, label_caption_data
    from brivl_ds.config import build_config
    from brivl_ds.data.shards import read_table

    assert caption_label("灰色背景上有一个大的红色圆形和一个小的蓝色三角形") == "灰色背景上有红色"
    assert caption_label("米色背景上有一个小的青色十字形") == "米色背景上有青色"
    with pytest.raises(ValueError, match="not a built-in"):
        caption_label("灰底上有红圆环")  # a shapes-hard caption
    overrides = label_caption_data(tmp_path / "study", tmp_path / "shapes", n_train=60, n_eval=12, image_size=64)
    settings = dict(o.split("=", 1) for o in overrides)
    source = read_table(tmp_path / "shapes" / "train").to_pylist()
    derived = read_table(settings["data.train_path"]).to_pylist()
    assert [r["id"] for r in derived] == [r["id"] for r in source]
    for new, old in zip(derived, source):
        background, first = old["text"].split("背景上有一个", 1)
        colour = first[2:4]  # "大的红色圆形..." -> "红色"
        assert new["text"] == f"{background}背景上有{colour}" != old["text"] and new["text"] in LABEL_CLASSES
        assert new["image"] == old["image"] and new["boxes"] == old["boxes"]
    assert len({r["text"] for r in derived}) < len(derived)  # 60 rows over at most 32 labels: captions repeat
    cfg = build_config("tiny", overrides)  # every override is a real setting
    assert cfg.data.zeroshot_templates == "none"
    for key in ("data.eval_path", "model.text.tokenizer_path"):
        assert Path(settings[key]).exists(), key
    bench = Path(settings["data.zeroshot_path"])
    assert Path(settings["data.zeroshot_classes"]).read_text().split() == LABEL_CLASSES
    held_out = read_table(tmp_path / "shapes" / "eval").to_pylist()
    filed = {p.stem: p.parent.name for p in bench.glob("*/*.jpg")}
    assert filed == {r["id"]: caption_label(r["text"]) for r in held_out}
    # made once: a second call reuses the shards (a rewrite would change their modification time)
    stamp = (Path(settings["data.train_path"]) / "manifest.json").stat().st_mtime_ns
    assert label_caption_data(tmp_path / "study", tmp_path / "shapes", 60, 12, 64) == overrides
    assert (Path(settings["data.train_path"]) / "manifest.json").stat().st_mtime_ns == stamp
