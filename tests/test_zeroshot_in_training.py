"""The trainer's zero-shot metric, its parts in one process: the config (off for a user's shards, on for the built-in
dataset, whose benchmark is made once next to it), the encoding the trainer runs (equal to the zero-shot command's
on an exported model), and where the result goes (metrics.jsonl's step record, eval.json, TensorBoard, the printed
line). Through the launcher, on 2 ZeRO-3 ranks, with evaluations mid-run and at the end: tests/test_quickstart.py."""
import functools
import json
import shutil

import pytest
import torch

from brivl_ds.config import build_config
from brivl_ds.data.synthetic import BACKGROUNDS
from brivl_ds.distributed import DistInfo
from brivl_ds.evaluation.recall import format_recall

ONE_PROCESS = DistInfo(rank=0, world=1, local_rank=0, local_world=1, device=torch.device("cpu"))


def test_zero_shot_is_off_for_shards_and_on_for_the_builtin_dataset(tmp_path, monkeypatch):
    from brivl_ds.training import setup

    shards = build_config("tiny", ["data.train_path=/data/shards", "model.text.tokenizer_path=/tok"])
    assert setup.with_builtin_data(shards, ONE_PROCESS).data.zeroshot_path is None
    with pytest.raises(ValueError, match="data.zeroshot_path needs data.zeroshot_classes"):
        build_config("tiny", [*[f"data.{k}" for k in ("train_path=/s", "zeroshot_path=/z")],
                              "model.text.tokenizer_path=/tok"]).validate()

    builtin = build_config("tiny", [f"data.synthetic_dir={tmp_path}", "data.synthetic_train=4",
                                    "data.synthetic_eval=6", "model.image.image_size=32"])
    data = setup.with_builtin_data(builtin, ONE_PROCESS).data
    bench = tmp_path / "zeroshot"
    assert (data.zeroshot_path, data.zeroshot_classes) == (str(bench), str(bench / "classes.txt"))
    assert data.zeroshot_templates == "zh" and data.eval_path == str(tmp_path / "eval")
    assert (bench / "classes.txt").read_text(encoding="utf-8").split() == list(BACKGROUNDS)
    assert len(list(bench.glob("*/*.jpg"))) == 6  # every held-out picture, in its background's folder
    assert (bench / "DONE.json").read_text() == (tmp_path / "DONE.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DONE.json", "eval", "tokenizer", "train", "zeroshot"]

    def refuse(*args):
        raise AssertionError("the benchmark is made once")

    monkeypatch.setattr(setup, "make_shapes_benchmark", refuse)
    assert setup.with_builtin_data(builtin, ONE_PROCESS).data.zeroshot_path == str(bench)  # reused
    builtin.data.zeroshot_path, builtin.data.zeroshot_classes = "/mine", "/mine.txt"  # a set of one's own wins
    assert setup.with_builtin_data(builtin, ONE_PROCESS).data.zeroshot_path == "/mine"


def decisions_margin(model, zeroshot, k: int) -> float:
    """The smallest score gap that decides a picture's top-1 (and top-k) class, the zero-shot command's way."""
    from brivl_ds.evaluation.zeroshot import class_embeddings
    from brivl_ds.inference.encode import embed_image_sources, embed_texts_batched

    weights = class_embeddings(functools.partial(embed_texts_batched, model), zeroshot.classes, zeroshot.templates)
    scores = (embed_image_sources(model, zeroshot.data.images)[0].double() @ weights.double().t()).sort(1, True)[0]
    gaps = [scores[:, 0] - scores[:, 1]] + ([scores[:, k - 1] - scores[:, k]] if k < len(zeroshot.classes) else [])
    return float(torch.cat(gaps).min())


def test_the_trainers_encoding_equals_the_zero_shot_commands(tiny_model_dir, shapes_data, tmp_path, one_cpu_thread):
    """evaluate_zeroshot on the exported towers, in one process, batches of 5 and 7 (the launched test covers 2
    ZeRO-3 ranks): the same accuracy as the zero-shot command's evaluation on the same folder, an undecodable file
    skipped there as here. This random model gives the pictures different classes (unlike the 6-step launched one),
    so a picture paired with another's label would show; no decision is closer than 1e-5 (batching moves fp32
    scores by about 1e-7), so the accuracies are equal."""
    from brivl_ds import load_model
    from brivl_ds.data.build import build_transform
    from brivl_ds.evaluation.held_out import evaluate_zeroshot, read_zeroshot_set
    from brivl_ds.evaluation.zeroshot import make_shapes_benchmark, zeroshot_evaluate
    from brivl_ds.inference.encode import embed_image_sources, embed_texts_batched

    make_shapes_benchmark(shapes_data["eval"], tmp_path / "bench")
    (tmp_path / "bench" / "白色" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    model = load_model(tiny_model_dir)
    cfg = build_config("tiny", ["model.image.image_size=64"])
    templates = tmp_path / "templates.txt"
    templates.write_text("{}\n一张{}的图\n", encoding="utf-8")
    zeroshot = read_zeroshot_set(tmp_path / "bench", tmp_path / "bench" / "classes.txt", str(templates))
    ours = evaluate_zeroshot(model.towers, zeroshot, build_transform(cfg, train=False), model.tokenizer,
                             cfg.model.text.max_length, 5, ONE_PROCESS, torch.float32)
    theirs = zeroshot_evaluate(functools.partial(embed_image_sources, model, batch_size=64),
                               functools.partial(embed_texts_batched, model), zeroshot.data, zeroshot.classes,
                               zeroshot.templates)
    assert theirs["n"] == 48 and theirs["skipped"] == 1 and decisions_margin(model, zeroshot, 1) > 1e-5
    assert sum(any(column) for column in zip(*theirs["confusion"])) > 1  # more than one class predicted
    assert ours == {"zeroshot_acc1": theirs["metrics"]["acc1"], "zeroshot_n": 48.0}  # 4 classes: no top-5

    eight = tmp_path / "eight.txt"  # more than 5 classes: top-5 is reported too
    eight.write_text("".join(f"{c}\n" for c in [*BACKGROUNDS, "红色", "蓝色", "绿色", "黄色"]), encoding="utf-8")
    shutil.rmtree(tmp_path / "bench" / "白色")
    zeroshot = read_zeroshot_set(tmp_path / "bench", eight, "none")
    ours = evaluate_zeroshot(model.towers, zeroshot, build_transform(cfg, train=False), model.tokenizer,
                             cfg.model.text.max_length, 7, ONE_PROCESS, torch.float32)
    theirs = zeroshot_evaluate(functools.partial(embed_image_sources, model), functools.partial(
        embed_texts_batched, model), zeroshot.data, zeroshot.classes, zeroshot.templates)
    assert set(ours) == {"zeroshot_acc1", "zeroshot_acc5", "zeroshot_n"} and decisions_margin(model, zeroshot, 5) > 1e-5
    assert (ours["zeroshot_acc1"], ours["zeroshot_acc5"]) == (theirs["metrics"]["acc1"], theirs["metrics"]["acc5"])


def test_an_evaluation_joins_its_steps_record_eval_json_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from brivl_ds.training.metrics_log import MetricsLog, drop_metrics_after

    stats = {"loss": 1.0, "loss_i2t": 1.0, "loss_t2i": 1.0, "tau": 0.07, "lr": 1e-3, "grad_norm": 1.0,
             "samples_per_s": 1.0, "step_time": 1.0, "queue_fill": 0.5, "skipped_rows": 0, "skipped_steps": 0,
             "pos_cos": 0.5, "neg_lse": 3.0, "dup_share": 0.0, "hardest_neg_cos": 0.4}
    log = MetricsLog(tmp_path, True, log_every=10)
    result = {"n": 8.0, "i2t_r1": 0.25, "zeroshot_acc1": 0.375, "zeroshot_n": 8.0}
    for step in (1, 2, 3):
        log.train_step(step, 0, {**stats, "loss": float(step)})
        if step in (2, 3):
            log.evaluation(step, {**result, "zeroshot_acc1": step / 8})
    log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and [r["loss"] for r in records] == [1.0, 2.0, 3.0]
    assert "eval" not in records[0]
    assert records[1]["eval"] == {**result, "zeroshot_acc1": 0.25} and records[2]["eval"]["zeroshot_acc1"] == 0.375
    assert json.loads((tmp_path / "eval.json").read_text()) == {"step": 3, **result}
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/zeroshot_acc1")] == [(2, 0.25), (3, 0.375)]
    assert [e.step for e in events.Scalars("eval/i2t_r1")] == [2, 3]

    drop_metrics_after(tmp_path / "metrics.jsonl", 2)  # a resume from step 2 keeps step 2's evaluation, once
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["eval"]["zeroshot_acc1"] if "eval" in r else None) for r in records] == \
        [(1, None), (2, 0.25)]
    resumed = MetricsLog(tmp_path, True, log_every=10, resumed_at_step=2)  # resumed at its last step: evaluates it
    resumed.evaluation(2, {"zeroshot_acc1": 0.5, "zeroshot_n": 8.0})
    resumed.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1]) == \
        {"step": 2, "epoch": 0, **stats, "loss": 2.0, "eval": {"zeroshot_acc1": 0.5, "zeroshot_n": 8.0}}


def test_printed_line_adds_the_zero_shot_accuracy_in_percent():
    recall = {"n": 48.0, "chance_r1": 1 / 48, "i2t_r1": 0.0625, "t2i_r1": 0.125}
    assert format_recall({**recall, "zeroshot_acc1": 0.3541, "zeroshot_n": 48.0}, 6) == (
        "eval @ step 6 on 48 held-out pairs: R@1 image->text 6.2, text->image 12.5 (chance R@1 2.08); "
        "zero-shot top-1 35.4% (48 images)")
    assert format_recall({"zeroshot_acc1": 0.5, "zeroshot_acc5": 0.875, "zeroshot_n": 8.0}, 3) == \
        "eval @ step 3: zero-shot top-1 50.0%, top-5 87.5% (8 images)"
