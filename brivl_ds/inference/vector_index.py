"""A faiss index over brivl_ds.embed's embeddings, sized to a memory budget: the corpus of the MatchSoul service
(built by `python -m brivl_ds.index`, searched by brivl_ds.serving). faiss comes with the `index` extra.

The index for N vectors of dimension D (`choose_index`). Sizes are estimates of the index as loaded for serving
(checked against faiss's serialised sizes); the memory-mapped vectors.npy, the items and the transient training
sample are not counted.
  1. Exact IndexFlat, inner product, fp32, while N·D·4 bytes fit.
  2. Else HNSW over 8-bit scalar-quantised vectors (IndexHNSWSQ, M = 32) while N·(D + 8·M + 16) bytes fit:
     D bytes of codes, 2·M int32 level-0 links, about one upper-level link and 12 bytes of level and offset
     per vector.
  3. Else IVF-PQ (IndexIVFPQ) with nlist = round(4·sqrt(N)) lists, at most N / 39 (faiss wants 39 training points
     per centroid), and the largest m dividing D (m bytes per vector, 8-bit codes) for which
     N·(m + 8) + (nlist + 256)·D·4 bytes fit: codes, int64 ids, coarse centroids and PQ codebooks.
  4. Else an error naming the budget that the smallest IVF-PQ (m = 1) needs.
--kind forces a kind, which must still fit the budget.

Both ANN kinds fetch rerank·k candidates and re-rank them by their exact inner products with the stored fp16
vectors. Recall: a fixed random sample of the stored vectors serves as queries; recall@k of the ANN index, with
and without the re-rank, is the share of returned items whose exact score reaches the k-th best exact score (less
SCORE_TOL, so that a duplicate of a true neighbour is no miss). Queries are used as given: the model's embeddings
are unit-norm, so inner product is cosine similarity.

INDEX_DIR:
  index.faiss    the faiss index; its position i is row i of vectors.npy and items.parquet
  vectors.npy    float16 [N, D], the embeddings as embed stored them (memory-mapped at load)
  items.parquet  row (the embedded input's row), id, text (the text; for shards, the caption), image (the file, for
                 an image folder)
  index.json     kind, sizes, parameters, budget, build time, recall, source; written last, so a folder without it
                 is unfinished
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from brivl_ds.optional_deps import require

faiss = require("faiss", "index")

KINDS = ("flat", "hnsw", "ivfpq")
PQ_MIN_POINTS = 256  # 8-bit codes: each sub-quantizer's k-means needs 256 training points
SCORE_TOL = 1e-5  # fp32 summation-order noise between two computations of one inner product
CHUNK_BYTES = 64 << 20  # fp32 working set of a chunk of vectors added, searched exactly or gathered for re-ranking
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


@dataclass(frozen=True)
class IndexSettings:
    memory_budget: int = 4 << 30  # bytes
    kind: str = "auto"  # auto (the budget rule) or one of KINDS
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128  # raised to the candidate count when that is larger
    nprobe: int | None = None  # None: sqrt(nlist), at least 16, at most nlist
    rerank: int = 4  # ANN candidates fetched per query = rerank · k
    recall_sample: int = 1000  # 0: no recall measurement
    recall_k: int = 10
    seed: int = 0  # of the training and recall samples
    threads: int | None = None  # faiss's OpenMP threads (process-wide); None: faiss's default

    def __post_init__(self):
        if self.kind not in ("auto", *KINDS):
            raise ValueError(f"kind must be auto or one of {KINDS}, not {self.kind!r}")
        for name in ("memory_budget", "hnsw_m", "ef_construction", "ef_search", "rerank", "recall_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")


@dataclass(frozen=True)
class IndexChoice:
    kind: str
    bytes: int  # the docstring's estimate
    params: dict  # hnsw: M, efConstruction, efSearch, rerank; ivfpq: nlist, m, nbits, nprobe, rerank

    @property
    def factory(self) -> str:
        p = self.params
        return {"flat": "Flat", "hnsw": f"HNSW{p.get('M')},SQ8", "ivfpq": f"IVF{p.get('nlist')},PQ{p.get('m')}x8"}[
            self.kind]


@dataclass(frozen=True)
class Hit:
    id: str
    score: float  # exact inner product with the stored (fp16) vector
    text: str | None
    row: int  # the item's row in the embedded input (text line, shard row, image number)
    image: str | None = None  # the image file, when the input was an image folder


def parse_size(text: str) -> int:
    """Bytes in "512MiB", "4GiB", "1.5GB" or "1000"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)?\s*", str(text), re.IGNORECASE)
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 4GiB, 1.5GB, or bytes)")
    return round(float(match[1]) * UNITS[(match[2] or "").lower()])


def format_size(n: int) -> str:
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if n >= UNITS[unit.lower()]:
            return f"{n / UNITS[unit.lower()]:.1f} {unit}"
    return f"{n} B"


def flat_bytes(n: int, d: int) -> int:
    return n * d * 4


def hnsw_bytes(n: int, d: int, m: int) -> int:
    return n * (d + 8 * m + 16)


def ivf_nlist(n: int) -> int:
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


def ivfpq_bytes(n: int, d: int, nlist: int, m: int) -> int:
    return n * (m + 8) + (nlist + 256) * d * 4


def choose_index(n: int, d: int, settings: IndexSettings) -> IndexChoice:
    """The index for n vectors of dimension d under the settings' budget and kind: the docstring's rule."""
    kind, candidates = settings.kind, []  # in order of preference
    if kind in ("auto", "flat"):
        candidates.append(IndexChoice("flat", flat_bytes(n, d), {}))
    if kind in ("auto", "hnsw"):
        candidates.append(IndexChoice("hnsw", hnsw_bytes(n, d, settings.hnsw_m), {
            "M": settings.hnsw_m, "efConstruction": settings.ef_construction, "efSearch": settings.ef_search,
            "rerank": settings.rerank}))
    if kind in ("auto", "ivfpq") and n >= PQ_MIN_POINTS:
        nlist = ivf_nlist(n)
        nprobe = settings.nprobe or min(nlist, max(16, round(math.sqrt(nlist))))
        for m in sorted((m for m in range(1, d + 1) if d % m == 0), reverse=True):
            candidates.append(IndexChoice("ivfpq", ivfpq_bytes(n, d, nlist, m), {
                "nlist": nlist, "m": m, "nbits": 8, "nprobe": nprobe, "rerank": settings.rerank}))
    for candidate in candidates:
        if candidate.bytes <= settings.memory_budget:
            return candidate
    if not candidates:
        raise ValueError(f"IVF-PQ needs at least {PQ_MIN_POINTS} vectors to train its 8-bit codebooks, not {n}")
    need = min(candidates, key=lambda c: c.bytes)
    raise ValueError(f"no {'' if kind == 'auto' else kind + ' '}index of {n} vectors of dimension {d} fits a memory "
                     f"budget of {format_size(settings.memory_budget)}: the smallest ({need.factory}) needs "
                     f"{need.bytes} bytes ({format_size(need.bytes)}); raise --memory-budget")


def _chunks(vectors: np.ndarray):
    """(first row, fp32 block) over a (memory-mapped) fp16 array, CHUNK_BYTES at a time."""
    step = max(1, CHUNK_BYTES // (4 * vectors.shape[1]))
    for start in range(0, len(vectors), step):
        yield start, np.asarray(vectors[start:start + step], dtype=np.float32)


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions) [q, k] of the k largest inner products, best first, chunk by chunk."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start, block in _chunks(vectors):
        scores, positions = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, positions + start)
    heap.finalize()
    return heap.D, heap.I


class VectorIndex:
    """A built index folder, searched by the service. Search is thread-safe: faiss reads are, and per-call search
    parameters are passed with each call rather than set on the shared index."""

    def __init__(self, index: faiss.Index, vectors: np.ndarray, items: pa.Table, info: dict):
        self.index, self.vectors, self.info = index, vectors, info
        self.kind, self.params = info["kind"], info["params"]
        self._items = {name: items.column(name).combine_chunks() for name in items.column_names}

    @classmethod
    def load(cls, index_dir: str | Path, nprobe: int | None = None, ef_search: int | None = None,
             rerank: int | None = None) -> "VectorIndex":
        """Overrides replace index.json's search parameters (for the kinds that have them)."""
        index_dir = Path(index_dir)
        if not (index_dir / "index.json").exists():
            raise FileNotFoundError(f"{index_dir} holds no finished index (no index.json)")
        info = json.loads((index_dir / "index.json").read_text())
        for key, value in (("nprobe", nprobe), ("efSearch", ef_search), ("rerank", rerank)):
            if value is not None and key in info["params"]:
                if value < 1:
                    raise ValueError(f"{key} must be positive, not {value}")
                info["params"][key] = value
        return cls(faiss.read_index(str(index_dir / "index.faiss")), np.load(index_dir / "vectors.npy", mmap_mode="r"),
                   pq.read_table(index_dir / "items.parquet"), info)

    @property
    def modality(self) -> str:
        return self.info["modality"]

    @property
    def dim(self) -> int:
        return self.info["dim"]

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """The k best items of each query (float32 [q, D]), best first; IVF-PQ may find fewer when its probed lists
        hold fewer than k items."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be a [q, {self.dim}] array (this index's dimension), "
                             f"not of shape {queries.shape}")
        if not np.isfinite(queries).all():
            raise ValueError("queries contain NaN or infinite values")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(self):
            raise ValueError(f"k must be an integer from 1 to {len(self)} (the index's size), not {k!r}")
        scores, positions = self.search_positions(np.ascontiguousarray(queries), int(k))
        return [[self._hit(int(p), float(s)) for p, s in zip(ps, ss) if p >= 0] for ps, ss in zip(positions, scores)]

    def search_positions(self, queries: np.ndarray, k: int, rerank: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions) [q, k] of validated queries; position -1 where nothing was found. The scores are
        exact unless rerank is False on an ANN index (then they are the index's approximate ones)."""
        if self.kind == "flat":
            return self.index.search(queries, k)
        fetch = min(len(self), self.params["rerank"] * k) if rerank else k
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(self.params["efSearch"], fetch))
        else:
            params = faiss.SearchParametersIVF(nprobe=self.params["nprobe"])
        scores, positions = self.index.search(queries, fetch, params=params)
        if not rerank:
            return scores, positions
        exact = self.exact_scores(queries, positions)
        best = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(exact, best, 1), np.take_along_axis(positions, best, 1)

    def exact_scores(self, queries: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Inner products [q, c] of each query with its stored candidate vectors; -inf where the position is -1."""
        scores = np.empty(positions.shape, np.float32)
        step = max(1, CHUNK_BYTES // (4 * self.dim * max(1, positions.shape[1])))
        for start in range(0, len(positions), step):  # queries a chunk at a time: [q, c, D] gathered may be large
            batch = slice(start, start + step)
            candidates = np.asarray(self.vectors[np.maximum(positions[batch], 0)], dtype=np.float32)
            scores[batch] = np.matmul(candidates, queries[batch, :, None])[..., 0]
        return np.where(positions >= 0, scores, -np.inf)

    def _hit(self, position: int, score: float) -> Hit:
        item = {name: column[position].as_py() for name, column in self._items.items()}
        return Hit(id=item["id"], score=score, text=item["text"], row=item["row"], image=item["image"])


def measure_recall(index: VectorIndex, sample: int, k: int, seed: int) -> dict:
    """recall@k of the ANN index, without ("ann") and with ("reranked") the exact re-rank, on `sample` stored
    vectors as queries (the docstring's definition)."""
    n = len(index)
    k = min(k, n)
    rows = np.sort(np.random.default_rng(seed).choice(n, min(sample, n), replace=False))
    queries = np.asarray(index.vectors[rows], dtype=np.float32)
    kth = exact_search(index.vectors, queries, k)[0][:, -1:]  # one pass over the vectors for all queries
    recall = {"k": k, "queries": len(rows), "seed": seed}
    for name, rerank in (("ann", False), ("reranked", True)):
        positions = index.search_positions(queries, k, rerank)[1]
        recall[name] = float((index.exact_scores(queries, positions) >= kth - SCORE_TOL).mean())
    return recall


def _modality(info: dict, modality: str | None, emb_dir: Path) -> str:
    available = info["modalities"]
    if modality is None:
        if len(available) != 1:
            raise ValueError(f"{emb_dir} holds {' and '.join(available)} embeddings: choose one with --modality")
        return available[0]
    if modality not in available:
        raise ValueError(f"{emb_dir} holds no {modality} embeddings, only {' and '.join(available)}")
    return modality


def _items(ids: pa.Table, source: dict | None) -> pa.Table:
    """row and id of every vector, with the payload read back from the embedded source: the text (of a text file,
    or the caption in shards) or the image file (of an image folder)."""
    rows, n = ids.column("row"), ids.num_rows
    text, image = pa.nulls(n, pa.string()), pa.nulls(n, pa.string())
    if source is None:  # embed.json from before it recorded its source
        print("embed.json names no source: the items carry ids only", flush=True)
    elif not Path(source["path"]).exists():
        raise FileNotFoundError(f"the embeddings' source {source['path']} is gone; the index reads its payload")
    elif source["kind"] == "texts":
        lines = pa.array(Path(source["path"]).read_text(encoding="utf-8").splitlines(), pa.string())
        if n and pc.max(rows).as_py() >= len(lines):
            raise ValueError(f"{source['path']} has fewer lines than when it was embedded")
        text = lines.take(rows)
    elif source["kind"] == "shards":
        from brivl_ds.data.shards import read_table

        table = read_table(source["path"], columns=["id", "text"])
        if n and (pc.max(rows).as_py() >= table.num_rows
                  or not table.column("id").take(rows).equals(ids.column("id"))):
            raise ValueError(f"the shards at {source['path']} changed since they were embedded (ids differ)")
        text = table.column("text").take(rows)
    else:
        image = pa.array([str(Path(source["path"]) / i) for i in ids.column("id").to_pylist()], pa.string())
    return pa.table({"row": rows, "id": ids.column("id"), "text": text, "image": image})


def _faiss_index(chosen: IndexChoice, vectors: np.ndarray, seed: int) -> faiss.Index:
    n, d = vectors.shape
    index = faiss.index_factory(d, chosen.factory, faiss.METRIC_INNER_PRODUCT)
    if chosen.kind == "hnsw":
        index.hnsw.efConstruction = chosen.params["efConstruction"]
    if chosen.kind == "ivfpq":
        index.do_polysemous_training = False  # the factory's default; for Hamming filtering, unused here, and slow
    if not index.is_trained:
        # SQ ranges, or coarse centroids and PQ codebooks, from a sample: 64 points per list, and at least the
        # 256 · 256 that faiss's PQ training uses
        size = min(n, max(1 << 16, 64 * chosen.params.get("nlist", 0)))
        rows = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
        index.train(np.asarray(vectors[rows], dtype=np.float32))
    for _, block in _chunks(vectors):
        index.add(block)
    return index


def build(emb_dir: str | Path, out: str | Path, settings: IndexSettings = IndexSettings(),
          modality: str | None = None) -> dict:
    """Builds INDEX_DIR `out` from an embed output folder; returns index.json's contents."""
    emb_dir, out = Path(emb_dir), Path(out)
    if not (emb_dir / "embed.json").exists():
        raise FileNotFoundError(f"{emb_dir} is not an embed output folder (no embed.json)")
    info = json.loads((emb_dir / "embed.json").read_text())
    modality = _modality(info, modality, emb_dir)
    parts = sorted((emb_dir / "ids").glob("part-?????.parquet"))
    arrays = [np.load(emb_dir / modality / (p.stem + ".npy"), mmap_mode="r") for p in parts]
    ids = pa.concat_tables([pq.read_table(p, columns=["row", "id"]) for p in parts]) if parts else None
    if ids is None or ids.num_rows == 0:
        raise ValueError(f"{emb_dir} holds no embeddings")
    n, d = ids.num_rows, info["dim"]
    if sum(len(a) for a in arrays) != n or any(a.shape[1:] != (d,) for a in arrays):
        raise ValueError(f"{emb_dir}: the {modality} shards do not match their ids or the dimension {d}")
    chosen = choose_index(n, d, settings)  # before writing anything: a budget that fits nothing leaves no folder
    if settings.threads:
        faiss.omp_set_num_threads(settings.threads)

    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").unlink(missing_ok=True)  # unfinished until rewritten
    vectors = np.lib.format.open_memmap(out / "vectors.npy", "w+", np.float16, (n, d))
    offset = 0
    for array in arrays:  # shard by shard: the embeddings need not fit in memory
        vectors[offset:offset + len(array)] = array
        offset += len(array)
    vectors.flush()
    vectors = np.load(out / "vectors.npy", mmap_mode="r")
    items = _items(ids, info.get("source"))
    pq.write_table(items, out / "items.parquet")
    index = _faiss_index(chosen, vectors, settings.seed)
    faiss.write_index(index, str(out / "index.faiss"))
    report = {"kind": chosen.kind, "factory": chosen.factory, "metric": "inner_product", "modality": modality,
              "n": n, "dim": d, "params": chosen.params, "bytes_estimate": chosen.bytes,
              "memory_budget": settings.memory_budget, "build_seconds": round(time.monotonic() - start, 3),
              "recall": None, "embeddings": str(emb_dir.resolve()), "source": info.get("source"),
              "model": info.get("model"), "faiss": faiss.__version__}
    if chosen.kind != "flat" and settings.recall_sample > 0:  # the flat index is the exact search
        report["recall"] = measure_recall(VectorIndex(index, vectors, items, report), settings.recall_sample,
                                          settings.recall_k, settings.seed)
    (out / "index.json").write_text(json.dumps(report, indent=1))
    return report
