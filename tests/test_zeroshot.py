"""Zero-shot classification: the CLI's numbers equal a float64 reference computed here (prompt averaging, top-1,
top-k, per-class, confusion), the JSON layout and the picture; bad input is skipped or refused clearly."""
import json
import shutil
import warnings

import numpy as np
import pytest

from brivl_ds.data.shards import read_table
from brivl_ds.data.synthetic import BACKGROUNDS, COLOURS
from brivl_ds.zeroshot import ZH_TEMPLATES, class_embeddings, load_templates, main, make_shapes_benchmark

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # small batches (conftest.py)


@pytest.fixture(scope="module")
def eval_rows(shapes_data):
    return read_table(shapes_data["eval"], columns=["id", "image", "text"]).to_pylist()


@pytest.fixture(scope="module")
def shapes_bench(shapes_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_zeroshot")
    counts = make_shapes_benchmark(shapes_data["eval"], out)
    assert sum(counts.values()) == 48
    return out


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from brivl_ds import load_model

    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def image_emb(model, eval_rows):
    """Each eval image embedded on its own (fallback box layout), float64, by id."""
    return {r["id"]: model.embed_images([r["image"]])[0].double().numpy() for r in eval_rows}


def reference_classes(model, classes, templates) -> np.ndarray:
    rows = []
    for c in classes:
        emb = model.embed_texts([t.replace("{}", c) for t in templates]).double().numpy()
        mean = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).mean(0)
        rows.append(mean / np.linalg.norm(mean))
    return np.stack(rows)


def reference_scores(image_emb, eval_rows, labels, weights, k):
    """top-1 hits, top-k hits, confusion [C, C] by loops over the images."""
    c = len(weights)
    confusion = np.zeros((c, c), dtype=int)
    top1 = topk = 0
    for r in eval_rows:
        logits = weights @ image_emb[r["id"]]
        order = np.argsort(-logits, kind="stable")
        assert logits[order[0]] - logits[order[1]] > 1e-9  # no near-tie that fp32 rounding could flip
        label = labels[r["id"]]
        confusion[label, order[0]] += 1
        top1 += order[0] == label
        topk += label in order[:k]
    return top1, topk, confusion


def test_make_shapes_labels_images_by_their_captions_background(shapes_bench, eval_rows):
    assert (shapes_bench / "classes.txt").read_text(encoding="utf-8").split() == list(BACKGROUNDS)
    files = {p.stem: p for p in shapes_bench.glob("*/*.jpg")}
    assert len(files) == len(eval_rows)
    for r in eval_rows:
        folder = files[r["id"]].parent.name
        assert r["text"].startswith(folder + "背景上有")
        assert files[r["id"]].read_bytes() == r["image"]
    assert len({p.parent.name for p in files.values()}) > 1


def test_image_folder_cli_equals_a_float64_reference(shapes_bench, eval_rows, image_emb, model, tiny_model_dir,
                                                     tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(shapes_bench, data)
    (data / "classes.txt").unlink()
    (data / "白色" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (data / "白色" / "notes.txt").write_text("not an image, not counted")
    templates = ["{}", "一张{}的图", "背景是{}"]
    (tmp_path / "templates.txt").write_text("\n".join(templates) + "\n\n", encoding="utf-8")
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["--model", str(tiny_model_dir), "--data", str(data), "--classes", str(shapes_bench / "classes.txt"),
              "--templates", str(tmp_path / "templates.txt"), "--out", str(out), "--batch-size", "5",
              "--no-progress"])
    assert not [w for w in caught if "Glyph" in str(w.message)]  # CJK names without a CJK font: index labels

    classes = list(BACKGROUNDS)
    labels = {r["id"]: classes.index(r["text"].split("背景")[0]) for r in eval_rows}
    weights = reference_classes(model, classes, templates)
    np.testing.assert_allclose(class_embeddings(model, classes, templates).double().numpy(), weights, atol=1e-6)
    top1, top4, confusion = reference_scores(image_emb, eval_rows, labels, weights, k=4)
    report = json.loads((out / "zeroshot.json").read_text(encoding="utf-8"))
    assert report["task"] == "zeroshot_classification" and report["language"] == "zh"
    assert report["dataset"] == str(data) and report["pretrained"] == str(tiny_model_dir.resolve())
    assert report["model"].startswith("brivl-")
    assert report["classes"] == classes and report["templates"] == templates
    assert (report["n"], report["skipped"], report["acc5_k"]) == (48, 1, 4)
    assert report["confusion"] == confusion.tolist()
    metrics = report["metrics"]
    assert set(metrics) == {"acc1", "acc5", "mean_per_class_recall"}
    assert metrics["acc1"] == pytest.approx(top1 / 48) and metrics["acc5"] == pytest.approx(top4 / 48) == 1.0
    counts, correct = confusion.sum(1), confusion.diagonal()
    assert report["per_class"] == [{"class": c, "n": int(counts[i]), "correct": int(correct[i]),
                                    "acc1": pytest.approx(correct[i] / counts[i])} for i, c in enumerate(classes)]
    assert metrics["mean_per_class_recall"] == pytest.approx(np.mean(correct / counts))

    with Image.open(out / "confusion.png") as png:
        png.load()
        width, height = png.size
    assert png.format == "PNG" and 400 <= height <= width <= 1500


def test_shards_with_index_labels_top5_over_eight_classes(shapes_data, eval_rows, image_emb, model, tiny_model_dir,
                                                         tmp_path):
    """First shape's colour as the label (8 classes, so top-5 is not trivially 1), built-in Chinese templates."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    classes = list(COLOURS)
    first = {r["id"]: min((r["text"].index(c), i) for i, c in enumerate(classes) if c in r["text"])[1]
             for r in eval_rows}
    pq.write_table(pa.table({"image": [r["image"] for r in eval_rows],
                             "colour": pa.array([first[r["id"]] for r in eval_rows], pa.int16())}),
                   tmp_path / "labelled.parquet")
    (tmp_path / "classes.txt").write_text("\n".join(classes), encoding="utf-8")
    main(["run", "--model", str(tiny_model_dir), "--data", str(tmp_path / "labelled.parquet"), "--classes",
          str(tmp_path / "classes.txt"), "--label-column", "colour", "--out", str(tmp_path / "out"),
          "--no-progress"])

    top1, top5, confusion = reference_scores(image_emb, eval_rows, first,
                                             reference_classes(model, classes, ZH_TEMPLATES), k=5)
    report = json.loads((tmp_path / "out" / "zeroshot.json").read_text(encoding="utf-8"))
    assert (report["n"], report["skipped"], report["acc5_k"]) == (48, 0, 5)
    assert report["templates"] == list(ZH_TEMPLATES)
    assert report["confusion"] == confusion.tolist()
    assert report["metrics"]["acc1"] == pytest.approx(top1 / 48)
    assert report["metrics"]["acc5"] == pytest.approx(top5 / 48) and top5 < 48
    counts, correct = confusion.sum(1), confusion.diagonal()
    assert [p["n"] for p in report["per_class"]] == counts.tolist()
    present = counts > 0  # classes without images do not count, as in sklearn's balanced accuracy
    assert report["metrics"]["mean_per_class_recall"] == pytest.approx(np.mean(correct[present] / counts[present]))


def test_unknown_class_folder_and_unknown_shard_label_are_refused_clearly(shapes_bench, eval_rows, tiny_model_dir,
                                                                          tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "two.txt").write_text("白色\n灰色\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not in the classes file.*黑色"):
        main(["--model", str(tiny_model_dir), "--data", str(shapes_bench), "--classes", str(tmp_path / "two.txt")])
    pq.write_table(pa.table({"image": [eval_rows[0]["image"]] * 2, "label": ["白色", "紫色"]}), tmp_path / "s.parquet")
    with pytest.raises(ValueError, match="紫色"):
        main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "s.parquet"), "--classes",
              str(tmp_path / "two.txt")])


def test_templates(tmp_path):
    assert load_templates("none") == ["{}"]
    assert load_templates("zh") == list(ZH_TEMPLATES) and all("{}" in t for t in ZH_TEMPLATES)
    (tmp_path / "t.txt").write_text("一张{}的照片\n没有类名\n", encoding="utf-8")
    with pytest.raises(ValueError, match="没有类名"):
        load_templates(str(tmp_path / "t.txt"))


def test_plot_font_has_real_glyphs_for_the_class_names():
    from brivl_ds.zeroshot import label_font

    assert label_font(["cat", "dog"]) is not None
    cjk = label_font(list(BACKGROUNDS))  # None without a CJK font: the plot then labels classes by index
    assert cjk is None or "LastResort" not in cjk.get_file()  # its "glyphs" are placeholder boxes for everything
