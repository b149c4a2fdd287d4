"""Retrieval with several captions per image: the chunked metrics equal a brute-force loop over queries (the
any-caption rule, ties to the true candidate), and the CLI writes CLIP_benchmark's layout."""
import json

import numpy as np
import pytest
import torch

from brivl_ds.evaluation.captioned import read_caption_shards
from brivl_ds.evaluation.recall import TIE_TOLERANCE, retrieval_metrics
from brivl_ds.retrieval import main

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # small batches (conftest.py)


def brute_force(image: np.ndarray, text: np.ndarray, text_image: list[int], ks, tol=TIE_TOLERANCE
                ) -> dict[str, float]:
    """One query at a time: count the wrong candidates that score more than `tol` above the best true one."""
    def rank(scores, true):
        best = max(scores[j] for j in true)
        return sum(1 for j in range(len(scores)) if j not in true and scores[j] > best + tol)

    captions = {i: [j for j, owner in enumerate(text_image) if owner == i] for i in range(len(image))}
    t2i = [rank([float(t @ v) for v in image], [text_image[j]]) for j, t in enumerate(text)]
    i2t = [rank([float(image[i] @ t) for t in text], captions[i]) for i in range(len(image)) if captions[i]]
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = np.mean([r < k for r in t2i])
        out[f"text_retrieval_recall@{k}"] = np.mean([r < k for r in i2t])
    out["mean_recall"] = np.mean(list(out.values()))
    return out


@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
def test_chunked_metrics_equal_brute_force_with_uneven_captions_and_ties(chunk):
    g = torch.Generator().manual_seed(0)
    per_image = [1, 3, 0, 2, 5, 1, 2, 4, 1, 3, 2]  # image 2 has none: only a distractor
    text_image = [i for i, n in enumerate(per_image) for _ in range(n)]
    image = torch.nn.functional.normalize(torch.randn(len(per_image), 8, generator=g), dim=-1)
    image[5] = image[3]  # a duplicate image: text queries of 3 and 5 tie, and the tie goes to the true one
    text = torch.nn.functional.normalize(image[text_image] + 0.9 * torch.randn(len(text_image), 8, generator=g), -1)
    text[4] = text[0]  # a caption of image 1 equal to image 0's caption
    ks = (1, 2, 5, 10)
    result = retrieval_metrics(image, text, torch.tensor(text_image), ks, chunk=chunk)
    expected = brute_force(image.double().numpy(), text.double().numpy(), text_image, ks)
    assert list(result) == list(expected)
    assert result == pytest.approx(expected)
    assert 0 < result["image_retrieval_recall@1"] < 1 and 0 < result["text_retrieval_recall@1"] < 1


def test_scores_within_the_tie_tolerance_count_for_the_true_candidate():
    """Batching moves fp32 scores by about 1e-7: such a near-tie goes to the true candidate, as an exact tie does,
    in both metrics; a gap of 10x the tolerance does not."""
    from brivl_ds.evaluation.recall import recall_at_k

    for gap, hit in ((TIE_TOLERANCE / 4, 1.0), (10 * TIE_TOLERANCE, 0.0)):
        image = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        # for image 0, caption 1 (image 1's) scores `gap` above its own caption 0; image 1 finds its caption
        text = torch.tensor([[0.6, 0.0], [0.6 + gap, 1.0]], dtype=torch.float64)
        metrics = retrieval_metrics(image, text, torch.tensor([0, 1]), ks=(1,))
        assert metrics["text_retrieval_recall@1"] == (1 + hit) / 2  # image 1 finds its caption in either case
        assert recall_at_k(image, text, ks=(1,))["i2t_r1"] == (1 + hit) / 2


def test_one_caption_per_image_agrees_with_the_paired_recall():
    """brivl_ds.evaluation.recall.recall_at_k (fractions too; i2t = text retrieval, t2i = image retrieval) is the
    special case."""
    from brivl_ds.evaluation.recall import recall_at_k

    g = torch.Generator().manual_seed(1)
    image = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=-1)
    text = torch.nn.functional.normalize(image + 0.7 * torch.randn(40, 8, generator=g), dim=-1)
    result, paired = retrieval_metrics(image, text, torch.arange(40), chunk=9), recall_at_k(image, text)
    for k in (1, 5, 10):
        assert result[f"text_retrieval_recall@{k}"] == pytest.approx(paired[f"i2t_r{k}"])
        assert result[f"image_retrieval_recall@{k}"] == pytest.approx(paired[f"t2i_r{k}"])


def test_an_image_is_found_by_any_of_its_captions():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.8, 0.6]])  # captions 0 and 1 are image 0's, 2 is image 1's
    result = retrieval_metrics(image, text, torch.tensor([0, 0, 1]), ks=(1,))
    # image 0 scores its caption 1 highest (1.0), then image 1's caption (0.8), then its caption 0 (0.0): a hit;
    # image 1 scores image 0's caption 0 (1.0) above its own (0.6): a miss. Only caption 1 finds its image first.
    assert result == pytest.approx({"image_retrieval_recall@1": 1 / 3, "text_retrieval_recall@1": 1 / 2,
                                    "mean_recall": 5 / 12})
    with pytest.raises(ValueError, match="text_image"):
        retrieval_metrics(image, text, torch.tensor([0, 0, 2]))


def test_shard_rows_are_grouped_by_image(shapes_data, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from brivl_ds.data.shards import read_table

    rows = read_table(shapes_data["eval"]).to_pylist()[:3]
    order = [0, 1, 0, 2, 1, 0]  # rows sharing an image need not be adjacent
    table = pa.table({"image": [rows[i]["image"] for i in order], "text": [f"caption {n}" for n in range(6)],
                      "image_sha256": [rows[i]["image_sha256"] for i in order]})
    pq.write_table(table, tmp_path / "with_sha.parquet")
    pq.write_table(table.drop_columns(["image_sha256"]), tmp_path / "bytes_only.parquet")
    for name in ("with_sha", "bytes_only"):
        data = read_caption_shards(tmp_path / f"{name}.parquet")
        assert data.images == [rows[i]["image"] for i in (0, 1, 2)] and data.boxes is None
        assert data.captions == [["caption 0", "caption 2", "caption 5"], ["caption 1", "caption 4"], ["caption 3"]]


def test_cli_on_jsonl_writes_clip_benchmark_layout(shapes_data, tiny_model_dir, tmp_path):
    from brivl_ds import load_model
    from brivl_ds.data.shards import read_table

    rows = read_table(shapes_data["eval"], columns=["id", "image", "text"]).to_pylist()[:12]
    (tmp_path / "imgs").mkdir()
    lines, good = [], []
    for n, r in enumerate(rows):
        (tmp_path / "imgs" / f"{r['id']}.jpg").write_bytes(r["image"])
        background, shapes = r["text"].split("背景上有")
        captions = [r["text"], f"{background}背景", shapes][: 2 + n % 2]  # two or three captions
        lines.append({"image": f"imgs/{r['id']}.jpg", "captions": captions})
        good.append((r["image"], captions))
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not an image")
    lines.insert(5, {"image": "imgs/broken.jpg", "captions": ["坏的", "图片"]})
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(l, ensure_ascii=False) for l in lines) + "\n",
                                            encoding="utf-8")
    out = tmp_path / "result.json"
    main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "captions.jsonl"), "--out", str(out),
          "--batch-size", "5", "--chunk", "7", "--no-progress"])

    record = json.loads(out.read_text(encoding="utf-8"))
    assert list(record) == ["dataset", "model", "pretrained", "task", "metrics", "language", "n_images", "n_texts",
                            "skipped"]
    assert record["task"] == "zeroshot_retrieval" and record["language"] == "zh"
    assert record["pretrained"] == str(tiny_model_dir.resolve()) and record["model"].startswith("brivl-")
    assert (record["n_images"], record["n_texts"], record["skipped"]) == (12, sum(len(c) for _, c in good), 1)
    # The reference embeds one image (and one image's captions) at a time, the command in batches of 5: on some
    # CPUs the two differ by ~1e-7. Several images share the caption "<colour>背景", so their scores tie exactly
    # and only the tie tolerance keeps batching out of the result. The reference's embeddings are moved by a
    # further 3e-7 on purpose: the metrics must not notice.
    model = load_model(tiny_model_dir)
    image = torch.cat([model.embed_images([data]) for data, _ in good]).double()
    text = torch.cat([model.embed_texts(captions) for _, captions in good]).double()
    assert len({c for _, captions in good for c in captions}) < record["n_texts"]  # the fixture has exact ties
    g = torch.Generator().manual_seed(0)
    image, text = (torch.nn.functional.normalize(x + 3e-7 * torch.randn(x.shape, generator=g, dtype=x.dtype), dim=1)
                   for x in (image, text))
    text_image = [i for i, (_, captions) in enumerate(good) for _ in captions]
    expected = brute_force(image.numpy(), text.numpy(), text_image, (1, 5, 10))
    assert record["metrics"] == pytest.approx(expected)
    assert expected != brute_force(image.numpy(), text.numpy(), text_image, (1, 5, 10), tol=0)  # ties decide


def test_cli_on_shards_as_the_readme_runs_it(shapes_data, tiny_model_dir, tmp_path):
    """`python -m brivl_ds.retrieval --model M --data SHARDS` (the README's form): one caption per held-out image,
    each image with its boxes, against the brute-force reference."""
    from brivl_ds import load_model
    from brivl_ds.data.shards import read_table

    record = main(["--model", str(tiny_model_dir), "--data", str(shapes_data["eval"]), "--out",
                   str(tmp_path / "r.json"), "--no-progress"])
    rows = read_table(shapes_data["eval"], columns=["image", "text", "boxes"]).to_pylist()
    assert (record["n_images"], record["n_texts"], record["skipped"]) == (48, 48, 0)
    model = load_model(tiny_model_dir)
    image = model.embed_images([r["image"] for r in rows], [r["boxes"] for r in rows]).double().numpy()
    text = model.embed_texts([r["text"] for r in rows]).double().numpy()
    assert record["metrics"] == pytest.approx(brute_force(image, text, list(range(48)), (1, 5, 10)))
