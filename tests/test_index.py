"""brivl_ds.inference.vector_index and its command brivl_ds.index: the budget rule, exact flat search, ANN with exact
re-rank and its measured recall, the payload read back from each kind of embedded source, and the real embed ->
index -> search path with the tiny model."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from brivl_ds.index import main
from brivl_ds.inference.vector_index import (IndexSettings, VectorIndex, build, choose_index, exact_search,
                                             parse_size)

TOL = 1e-5


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clustered(n: int, d: int, seed: int, clusters: int = 40) -> np.ndarray:
    """Unit vectors around `clusters` random centres, as embeddings of a corpus of related items are."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((clusters, d)))
    return unit(centres[rng.integers(clusters, size=n)] + 0.6 / np.sqrt(d) * rng.standard_normal((n, d)))


def make_emb(path, vectors: np.ndarray, modality: str = "text", ids: pa.Table | None = None,
             source: dict | None = None):
    """An embed output folder (brivl_ds.embed's layout) holding `vectors`; by default from a text file of lines
    "item i"."""
    n, d = vectors.shape
    for sub in (modality, "ids"):
        (path / sub).mkdir(parents=True)
    np.save(path / modality / "part-00000.npy", vectors.astype(np.float16))
    if source is None:
        (path / "corpus.txt").write_text("".join(f"item {i}\n" for i in range(n)), encoding="utf-8")
        source = {"kind": "texts", "path": str(path / "corpus.txt")}
    if ids is None:
        ids = pa.table({"row": pa.array(range(n), pa.int64()), "id": [str(i) for i in range(n)]})
    pq.write_table(ids, path / "ids" / "part-00000.parquet")
    (path / "embed.json").write_text(json.dumps({"modalities": [modality], "dim": d, "rows": n, "source": source}))
    return path


def stored(index_dir) -> np.ndarray:
    return np.load(index_dir / "vectors.npy").astype(np.float64)


def test_parse_size():
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("4GiB") == 4 << 30
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("1000") == 1000
    for bad in ("4 parsecs", "-1GiB", "0"):
        with pytest.raises(Exception, match="not a size"):
            parse_size(bad)


def test_budget_rule_boundaries():
    """n = 2000, d = 128, M = 32: flat 2000·128·4 = 1,024,000 bytes; HNSW-SQ8 2000·(128 + 256 + 16) = 800,000;
    IVF-PQ nlist = min(round(4·sqrt(2000)) = 179, 2000 // 39 = 51) = 51, 2000·(m + 8) + (51 + 256)·128·4 bytes."""
    def chosen(budget, kind="auto", n=2000, d=128):
        return choose_index(n, d, IndexSettings(memory_budget=budget, kind=kind))

    assert chosen(1_024_000).kind == "flat"
    assert (chosen(1_023_999).kind, chosen(1_023_999).bytes) == ("hnsw", 800_000)
    assert chosen(800_000).kind == "hnsw"
    ivf = chosen(799_999)  # the largest code, m = d, fits
    assert (ivf.kind, ivf.params["nlist"], ivf.params["m"], ivf.bytes) == ("ivfpq", 51, 128, 2000 * 136 + 307 * 512)
    assert ivf.factory == "IVF51,PQ128x8"
    assert chosen(2000 * 24 + 307 * 512).params["m"] == 16  # each m divides d
    assert chosen(2000 * 24 + 307 * 512 - 1).params["m"] == 8
    assert chosen(2000 * 9 + 307 * 512).params["m"] == 1
    with pytest.raises(ValueError, match=f"needs {2000 * 9 + 307 * 512} bytes"):
        chosen(2000 * 9 + 307 * 512 - 1)
    # where HNSW is larger than flat (d = 32: 304 bytes a vector against 128), a budget below flat goes to IVF-PQ
    assert chosen(2000 * 128 - 1, d=32).kind == "ivfpq"
    # a forced kind must fit too, and IVF-PQ needs 256 points to train 8-bit codebooks
    with pytest.raises(ValueError, match="no flat index .* needs 1024000 bytes"):
        chosen(1_023_999, kind="flat")
    assert chosen(10 << 30, kind="ivfpq").params["m"] == 128
    with pytest.raises(ValueError, match="at least 256 vectors"):
        chosen(10 << 30, kind="ivfpq", n=255)


def test_flat_search_equals_brute_force(tmp_path, monkeypatch):
    monkeypatch.setattr("brivl_ds.inference.vector_index.CHUNK_BYTES", 4 * 64 * 700)  # 700 vectors at a time
    rng = np.random.default_rng(1)
    emb = make_emb(tmp_path / "emb", unit(rng.standard_normal((3000, 64))))
    report = build(emb, tmp_path / "index")
    assert report["kind"] == "flat" and report["recall"] is None
    index = VectorIndex.load(tmp_path / "index")
    assert (index.modality, index.dim, len(index)) == ("text", 64, 3000)
    queries = unit(rng.standard_normal((20, 64))).astype(np.float32)
    scores = queries.astype(np.float64) @ stored(tmp_path / "index").T
    expected = np.argsort(-scores, axis=1)[:, :10]
    for q, hits in enumerate(index.search(queries, 10)):
        assert [h.row for h in hits] == expected[q].tolist()
        np.testing.assert_allclose([h.score for h in hits], scores[q, expected[q]], atol=TOL)
        assert [(h.id, h.text) for h in hits] == [(str(r), f"item {r}") for r in expected[q]]
    # the chunked exact search that recall is measured against
    exact_scores, positions = exact_search(np.load(tmp_path / "index" / "vectors.npy", mmap_mode="r"), queries, 10)
    np.testing.assert_array_equal(positions, expected)
    np.testing.assert_allclose(exact_scores, np.take_along_axis(scores, expected, 1), atol=TOL)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_ann_reranks_exactly_and_measures_recall(tmp_path, monkeypatch, kind):
    """n = 2000, d = 128: a budget of exactly 800,000 bytes picks HNSW; 2000·(8 + 8) + 307·512 picks IVF-PQ, m = 8."""
    monkeypatch.setattr("brivl_ds.inference.vector_index.CHUNK_BYTES", 4 * 128 * 300)  # chunked adds, exact search and gathers
    n, d, sample = 2000, 128, 300
    emb = make_emb(tmp_path / "emb", clustered(n, d, seed=2))
    budget = {"hnsw": 800_000, "ivfpq": 2000 * 16 + 307 * 512}[kind]
    threads = faiss.omp_get_max_threads()
    try:  # one thread: faiss's OpenMP k-means crawls on two shared cores
        report = main(["--emb", str(emb), "--out", str(tmp_path / "index"), "--memory-budget", str(budget),
                       "--recall-sample", str(sample), "--threads", "1"])
    finally:
        faiss.omp_set_num_threads(threads)  # process-wide
    assert report["kind"] == kind and report["bytes_estimate"] <= budget
    raw = faiss.read_index(str(tmp_path / "index" / "index.faiss"))
    assert isinstance(raw, {"hnsw": faiss.IndexHNSWSQ, "ivfpq": faiss.IndexIVFPQ}[kind])
    assert raw.metric_type == faiss.METRIC_INNER_PRODUCT and raw.ntotal == n
    # the size estimate is the index's real size, within 5 %
    assert abs((tmp_path / "index" / "index.faiss").stat().st_size / report["bytes_estimate"] - 1) < 0.05
    vectors = stored(tmp_path / "index")
    index = VectorIndex.load(tmp_path / "index")

    # re-ranked scores are the exact inner products of the returned items, best first
    queries = clustered(50, d, seed=3).astype(np.float32)
    for q, hits in enumerate(index.search(queries, 10)):
        assert len(hits) == 10
        rows = [h.row for h in hits]
        np.testing.assert_allclose([h.score for h in hits], vectors[rows] @ queries[q].astype(np.float64), atol=TOL)
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
        assert [h.text for h in hits] == [f"item {r}" for r in rows]

    # index.json's recall@10 recomputed: its documented sample, exact search in float64, the raw ANN index's own
    # top 10 (no re-rank) and the re-ranked search
    rows = np.sort(np.random.default_rng(0).choice(n, sample, replace=False))
    queries = vectors[rows].astype(np.float32)
    exact = queries.astype(np.float64) @ vectors.T
    kth = np.sort(exact, axis=1)[:, -10][:, None]
    params = report["params"]
    search = (faiss.SearchParametersHNSW(efSearch=params["efSearch"]) if kind == "hnsw"
              else faiss.SearchParametersIVF(nprobe=params["nprobe"]))
    ann = raw.search(queries, 10, params=search)[1]
    ann_recall = (np.take_along_axis(exact, ann, 1) >= kth - TOL).mean()
    reranked = np.array([[h.row for h in hits] for hits in index.search(queries, 10)])
    reranked_recall = (np.take_along_axis(exact, reranked, 1) >= kth - TOL).mean()
    recall = report["recall"]
    assert (recall["k"], recall["queries"]) == (10, sample)
    assert recall["ann"] == pytest.approx(ann_recall, abs=1e-3)
    assert recall["reranked"] == pytest.approx(reranked_recall, abs=1e-3)
    assert recall["reranked"] >= 0.9 and recall["reranked"] >= recall["ann"]
    if kind == "ivfpq":  # 8-byte codes of 128 dimensions rank coarsely: the re-rank is what recovers the top 10
        assert recall["ann"] < 0.8
    assert json.loads((tmp_path / "index" / "index.json").read_text())["recall"] == recall


def test_payload_from_shards_and_image_folders(tmp_path, shapes_data):
    from brivl_ds.data.shards import read_table

    table = read_table(shapes_data["eval"], columns=["id", "text"])
    keep = [0, 2, 3, 5, 8, 13, 21, 34]  # as if the other rows' images had been skipped
    ids = pa.table({"row": pa.array(keep, pa.int64()), "id": table.column("id").take(keep)})
    vectors = unit(np.random.default_rng(4).standard_normal((len(keep), 32)))
    source = {"kind": "shards", "path": str(shapes_data["eval"])}
    build(make_emb(tmp_path / "shards", vectors, "image", ids, source), tmp_path / "shards_index")
    hits = VectorIndex.load(tmp_path / "shards_index").search(vectors[:3].astype(np.float32), 1)
    captions = table.column("text").to_pylist()
    assert [(h[0].row, h[0].id, h[0].text, h[0].image) for h in hits] == [
        (r, table.column("id")[r].as_py(), captions[r], None) for r in keep[:3]]

    changed = ids.set_column(1, "id", pa.array(["renamed"] * len(keep)))  # the shards are no longer those embedded
    with pytest.raises(ValueError, match="changed since"):
        build(make_emb(tmp_path / "changed", vectors, "image", changed, source), tmp_path / "changed_index")

    folder = {"kind": "images", "path": str(tmp_path / "pictures")}
    (tmp_path / "pictures").mkdir()
    ids = pa.table({"row": pa.array([0, 1], pa.int64()), "id": ["a/cat.jpg", "dog.png"]})
    build(make_emb(tmp_path / "images", vectors[:2], "image", ids, folder), tmp_path / "images_index")
    hits = VectorIndex.load(tmp_path / "images_index").search(vectors[1:2].astype(np.float32), 2)[0]
    assert [(h.id, h.image, h.text) for h in hits] == [("dog.png", str(tmp_path / "pictures" / "dog.png"), None),
                                                       ("a/cat.jpg", str(tmp_path / "pictures" / "a/cat.jpg"), None)]


def test_embed_index_search_with_the_tiny_model(tmp_path, tiny_model_dir, shapes_data):
    """The real path: embed a text file with the exported model, index it, and find each sentence by itself."""
    import brivl_ds
    from brivl_ds.data.shards import read_table
    from brivl_ds.embed import main as embed

    lines = list(dict.fromkeys(read_table(shapes_data["eval"], columns=["text"]).column("text").to_pylist()))
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    embed(["--model", str(tiny_model_dir), "--texts", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "emb"),
           "--device", "cpu", "--no-progress"])
    assert json.loads((tmp_path / "emb" / "embed.json").read_text())["source"] == {
        "kind": "texts", "path": str((tmp_path / "corpus.txt").resolve())}
    model = brivl_ds.load_model(tiny_model_dir)
    queries = model.embed_texts(lines[:8]).float().numpy()
    for kind in ("flat", "hnsw"):
        main(["--emb", str(tmp_path / "emb"), "--out", str(tmp_path / kind), "--kind", kind])
        index = VectorIndex.load(tmp_path / kind)
        assert (index.dim, len(index)) == (model.config.embed_dim, len(lines))
        for i, hits in enumerate(index.search(queries, 3)):
            assert (hits[0].id, hits[0].row, hits[0].text) == (str(i), i, lines[i])
            assert hits[0].score == pytest.approx(1.0, abs=2e-3)  # unit-norm, stored in float16


def test_bad_input(tmp_path):
    emb = make_emb(tmp_path / "emb", unit(np.random.default_rng(5).standard_normal((300, 16))))
    build(emb, tmp_path / "index")
    index = VectorIndex.load(tmp_path / "index")
    good = np.zeros((1, 16), np.float32)
    with pytest.raises(ValueError, match=r"\[q, 16\] array"):
        index.search(np.zeros((1, 15), np.float32), 5)
    with pytest.raises(ValueError, match=r"\[q, 16\] array"):
        index.search(np.zeros(16, np.float32), 5)
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((1, 16), np.nan, np.float32), 5)
    for k in (0, 301, 2.0, True):
        with pytest.raises(ValueError, match="k must be an integer from 1 to 300"):
            index.search(good, k)
    assert len(index.search(good, 300)[0]) == 300

    with pytest.raises(ValueError, match="holds no image embeddings, only text"):
        build(emb, tmp_path / "image_index", modality="image")
    with pytest.raises(SystemExit):  # the CLI says the same through argparse
        main(["--emb", str(emb), "--out", str(tmp_path / "image_index"), "--modality", "image"])
    both = json.loads((emb / "embed.json").read_text()) | {"modalities": ["image", "text"]}
    (emb / "embed.json").write_text(json.dumps(both))
    with pytest.raises(ValueError, match="choose one with --modality"):
        build(emb, tmp_path / "ambiguous")
    with pytest.raises(FileNotFoundError, match="no embed.json"):
        build(tmp_path / "index", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no finished index"):
        VectorIndex.load(tmp_path / "emb")
    with pytest.raises(SystemExit):
        main(["--emb", str(emb), "--out", str(tmp_path / "x"), "--memory-budget", "lots"])
    assert not (tmp_path / "image_index").exists() and not (tmp_path / "x").exists()
