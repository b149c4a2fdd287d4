"""Zero-shot classification: the CLI's numbers equal a float64 reference computed here (prompt averaging, top-1,
top-k, per-class, confusion), the JSON layout and the picture; bad input is skipped or refused clearly."""
import functools
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from brivl_ds.data.shards import read_table
from brivl_ds.data.synthetic import BACKGROUNDS, COLOURS
from brivl_ds.evaluation.zeroshot import ZH_TEMPLATES, class_embeddings, load_templates, make_shapes_benchmark
from brivl_ds.inference.encode import embed_texts_batched
from brivl_ds.zeroshot import main

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


def box_font(path: Path, chars) -> Path:
    """A TrueType font whose only glyphs (filled squares) are `chars`: a font with the class names' glyphs on any
    machine, CJK font installed or not."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    def square():
        pen = TTGlyphPen(None)
        pen.moveTo((100, 0))
        for point in ((100, 700), (900, 700), (900, 0)):
            pen.lineTo(point)
        pen.closePath()
        return pen.glyph()

    glyphs = {ord(c): f"uni{ord(c):04X}" for c in sorted(set(chars))}
    names = [".notdef", *glyphs.values()]
    fb = FontBuilder(1000, isTTF=True)
    fb.setupGlyphOrder(names)
    fb.setupCharacterMap(glyphs)
    fb.setupGlyf({n: square() for n in names})
    fb.setupHorizontalMetrics({n: (1000, 100) for n in names})
    fb.setupHorizontalHeader(ascent=800, descent=-200)
    fb.setupNameTable({"familyName": "Test Boxes", "styleName": "Regular"})
    fb.setupOS2()
    fb.setupPost()
    fb.save(str(path))
    return path


@pytest.fixture
def installed_fonts(monkeypatch):
    """installed_fonts(*extra): pretend that only matplotlib's bundled fonts (DejaVu, STIX, Computer Modern, Last
    Resort: none with CJK glyphs, Last Resort with placeholder boxes for all) plus `extra` files are installed, with
    DejaVu Sans the default, whatever this machine has. Returns the DejaVu Sans path."""
    import matplotlib
    from matplotlib import font_manager

    bundled = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    dejavu = str(bundled / "DejaVuSans.ttf")
    real = font_manager.fontManager.ttflist

    def install(*extra: Path) -> str:
        fonts = [f for f in real if Path(f.fname).parent == bundled]
        assert any("Last Resort" in f.name for f in fonts)  # the exclusion below is exercised
        monkeypatch.setattr(font_manager.fontManager, "ttflist",
                            fonts + [font_manager.FontEntry(fname=str(f), name=f.stem) for f in extra])
        monkeypatch.setattr(font_manager, "findfont", lambda *a, **k: dejavu)
        return dejavu

    return install


@pytest.fixture
def saved_figures(monkeypatch):
    """The Figures savefig was called on, to read their tick labels and captions after drawing."""
    from matplotlib.figure import Figure

    figures, savefig = [], Figure.savefig

    def recording(self, *args, **kwargs):
        figures.append(self)
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    return figures


def tick_labels(fig) -> tuple[list[str], list[str], set[str]]:
    """x tick texts, y tick texts, and the font files of the x tick labels."""
    ax = fig.axes[0]
    return ([t.get_text() for t in ax.get_xticklabels()], [t.get_text() for t in ax.get_yticklabels()],
            {t.get_fontproperties().get_file() for t in ax.get_xticklabels()})


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
        # no near-tie that another batch composition or CPU could flip (fp32 embeddings move by ~1e-7; the
        # smallest gaps here are 2e-5)
        assert logits[order[0]] - logits[order[1]] > 1e-5
        assert k >= c or logits[order[k - 1]] - logits[order[k]] > 1e-5
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
                                                     tmp_path, installed_fonts, saved_figures):
    from PIL import Image

    cjk = box_font(tmp_path / "boxes.ttf", "".join(BACKGROUNDS))  # an installed font with the class names
    installed_fonts(cjk)

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
    assert not [w for w in caught if "Glyph" in str(w.message)]  # no tofu: every label has its glyphs
    assert tick_labels(saved_figures[-1]) == (list(BACKGROUNDS), list(BACKGROUNDS), {str(cjk)})

    classes = list(BACKGROUNDS)
    labels = {r["id"]: classes.index(r["text"].split("背景")[0]) for r in eval_rows}
    weights = reference_classes(model, classes, templates)
    np.testing.assert_allclose(class_embeddings(functools.partial(embed_texts_batched, model), classes, templates).double().numpy(), weights, atol=1e-6)
    top1, top4, confusion = reference_scores(image_emb, eval_rows, labels, weights, k=4)
    # premise: top-3 misses some images, so the top-5 capped at the 4 classes (acc5 = 1 by definition) would show a
    # cap at fewer classes; top-k below the class count is checked over 8 classes in the next test
    assert top4 == 48 and reference_scores(image_emb, eval_rows, labels, weights, k=3)[1] < 48
    report = json.loads((out / "zeroshot.json").read_text(encoding="utf-8"))
    assert report["task"] == "zeroshot_classification" and report["language"] == "zh"
    assert report["dataset"] == str(data) and report["pretrained"] == str(tiny_model_dir.resolve())
    assert report["model"].startswith("brivl-")
    assert report["classes"] == classes and report["templates"] == templates
    assert (report["n"], report["skipped"], report["acc5_k"]) == (48, 1, 4)
    assert report["confusion"] == confusion.tolist()
    metrics = report["metrics"]
    assert set(metrics) == {"acc1", "acc5", "mean_per_class_recall"}
    assert metrics["acc1"] == pytest.approx(top1 / 48) and metrics["acc5"] == 1.0  # top-4 of 4 classes
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


def test_label_font_finds_a_font_with_every_glyph_and_never_last_resort(tmp_path, installed_fonts):
    from brivl_ds.evaluation.zeroshot import label_font

    dejavu = installed_fonts()
    assert label_font(["cat", "dög"]).get_file() == dejavu  # the default font when it has the glyphs
    # no CJK font: Last Resort's placeholder boxes "cover" every code point, and do not count
    assert label_font(list(BACKGROUNDS)) is None
    cjk = box_font(tmp_path / "boxes.ttf", "".join(BACKGROUNDS))
    installed_fonts(cjk)
    assert label_font(list(BACKGROUNDS)).get_file() == str(cjk)  # found among the installed fonts
    assert label_font(list(BACKGROUNDS) + ["α"]) is None  # every character, not most
    assert label_font(list(BACKGROUNDS), font=dejavu) is None  # --font FILE is checked too


@pytest.mark.parametrize("has_cjk_font", [False, True])
def test_confusion_plot_names_classes_only_with_a_font_that_has_their_glyphs(has_cjk_font, tmp_path,
                                                                             installed_fonts, saved_figures):
    from PIL import Image

    from brivl_ds.evaluation.zeroshot import plot_confusion

    classes = list(BACKGROUNDS)
    cjk = box_font(tmp_path / "boxes.ttf", "".join(classes))
    installed_fonts(*[cjk] * has_cjk_font)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_confusion(np.arange(16).reshape(4, 4), classes, tmp_path / "c.png", title="t")
    assert not [w for w in caught if "Glyph" in str(w.message)]  # never boxes in place of names
    (fig,) = saved_figures
    captions = [t.get_text() for t in fig.texts]
    if has_cjk_font:
        assert tick_labels(fig) == (classes, classes, {str(cjk)}) and captions == []
    else:  # matplotlib's index ticks, and a caption saying where the names are
        indices = [str(i) for i in range(4)]
        assert tick_labels(fig)[:2] == (indices, indices)
        assert len(captions) == 1 and captions[0].startswith("classes by index, named in zeroshot.json")
    with Image.open(tmp_path / "c.png") as png:
        assert png.format == "PNG"
