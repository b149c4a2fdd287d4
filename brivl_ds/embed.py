"""Embeddings at scale from an exported model (`python -m brivl_ds.export`).

  python -m brivl_ds.embed --model MODEL_DIR --shards DATA --out EMB_DIR     # Parquet shards: images and texts
  python -m brivl_ds.embed --model MODEL_DIR --images DIR --out EMB_DIR      # every image file under DIR
  python -m brivl_ds.embed --model MODEL_DIR --texts FILE --out EMB_DIR      # one text per line

Output, in shards of --rows-per-shard input rows (shard k holds input rows [k R, (k + 1) R)):
  EMB_DIR/image/part-00000.npy   float16 [n, D], unit-norm rows (and/or text/part-00000.npy)
  EMB_DIR/ids/part-00000.parquet the row of each embedding: `row` (input row number) and `id`
  EMB_DIR/embed.json             model, modality, dimension, rows embedded and skipped, and the source (its kind
                                 and absolute path: brivl_ds.index reads the corpus payload back from it)

Resumable: a shard is written under temporary names and committed by renaming its ids file last, so a restart
skips the shards that are finished and redoes the rest. Under a launcher (`deepspeed --num_gpus 8 --module
brivl_ds.embed ...`, or torchrun) rank r of W takes shards r, r + W, ... from the environment; no process group is
needed. An image that cannot be decoded is skipped and counted, never fatal; images without boxes (the --images
mode, or shard rows without any) get the model's fallback layout (the whole image, or its grid).

embed.json is written once every shard is committed, by whichever rank finds them all committed after its own
(the last to finish). Its per-shard counts of skipped images are read back from the committed shards (input rows
minus embedded rows), so they cover every rank's shards and those a restart reused.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from brivl_ds.config import IMAGE_SUFFIXES
from brivl_ds.inference.encode import decoded_batches


def read_inputs(args) -> tuple[list[str], list, list, list]:
    """(ids, images or None, texts or None, boxes or None) of every input row, in row order."""
    if args.shards:
        from brivl_ds.data.shards import read_table

        table = read_table(args.shards, columns=["id", "image", "text", "boxes"])
        return (table.column("id").to_pylist(), table.column("image").to_pylist(), table.column("text").to_pylist(),
                table.column("boxes").to_pylist())
    if args.images:
        root = Path(args.images)
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        return [str(p.relative_to(root)) for p in files], files, None, None
    lines = Path(args.texts).read_text(encoding="utf-8").splitlines()
    return [str(i) for i in range(len(lines))], None, lines, None


def shard_done(out: Path, k: int) -> bool:
    return (out / "ids" / f"part-{k:05d}.parquet").exists()


def skipped_per_shard(out: Path, n_rows: int, rows_per_shard: int) -> dict[str, int] | None:
    """Images skipped in each shard (its input rows minus the rows it embedded), or None while a shard is
    unfinished."""
    counts = {}
    for k in range(-(-n_rows // rows_per_shard)):
        if not shard_done(out, k):
            return None
        embedded = pq.read_metadata(out / "ids" / f"part-{k:05d}.parquet").num_rows
        counts[f"part-{k:05d}"] = min(rows_per_shard, n_rows - k * rows_per_shard) - embedded
    return counts


def _save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


def embed_shard(model, rows: range, ids, images, texts, boxes, batch_size: int) -> tuple[dict, list[int], int]:
    """Embeddings of `rows` ({"image": [n, D], "text": [n, D]} float16), the rows kept, the images skipped."""
    keep, image_out, text_out, skipped = [], [], [], 0
    if images is None:  # texts only: every row is kept
        batches = ((rows[s:s + batch_size], rows[s:s + batch_size], None) for s in range(0, len(rows), batch_size))
    else:  # a bad image is skipped and counted, not fatal
        batches = decoded_batches(model, images, boxes, rows, batch_size, name=lambda r: f"row {r} ({ids[r]})")
    for batch, good, prepared in batches:
        good = list(good)
        if images is not None:
            skipped += len(batch) - len(good)
            if good:
                image_out.append(model.embed_prepared(prepared))
        if texts is not None and good:
            text_out.append(model.embed_texts([texts[r] for r in good]))
        keep += good
    arrays = {}
    dim = model.config.embed_dim
    if images is not None:
        arrays["image"] = (torch.cat(image_out) if image_out else torch.zeros(0, dim)).half().cpu().numpy()
    if texts is not None:
        arrays["text"] = (torch.cat(text_out) if text_out else torch.zeros(0, dim)).half().cpu().numpy()
    return arrays, keep, skipped


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a folder written by brivl_ds.export")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", help="Parquet shards (a directory, a manifest.json or a file)")
    source.add_argument("--images", help="a directory of image files (searched recursively)")
    source.add_argument("--texts", help="a UTF-8 text file, one text per line")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rows-per-shard", type=int, default=100_000)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="compute dtype (default: exported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    args = parser.parse_args(argv)

    from brivl_ds.inference.exported import DTYPES, load_model

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.device == "cuda":  # one GPU per launcher rank
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    model = load_model(args.model, args.device, DTYPES[args.dtype] if args.dtype else None)
    ids, images, texts, boxes = read_inputs(args)
    modalities = [m for m, v in (("image", images), ("text", texts)) if v is not None]
    for sub in (*modalities, "ids"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    shards = range(-(-len(ids) // args.rows_per_shard))
    mine = [k for k in shards if k % world == rank]
    todo = [k for k in mine if not shard_done(args.out, k)]
    if len(todo) < len(mine):
        print(f"rank {rank}: {len(mine) - len(todo)} of its {len(mine)} shards are finished already", flush=True)
    kind = next(k for k in ("shards", "images", "texts") if getattr(args, k))
    report = {"model": str(args.model.resolve()), "modalities": modalities, "dim": model.config.embed_dim,
              "dtype": "float16", "rows": len(ids), "shards": len(shards), "skipped": {},
              "source": {"kind": kind, "path": str(Path(getattr(args, kind)).resolve())}}
    skipped_here = 0
    for k in tqdm(todo, desc=f"embed (rank {rank})", disable=args.no_progress):
        rows = range(k * args.rows_per_shard, min((k + 1) * args.rows_per_shard, len(ids)))
        arrays, keep, skipped = embed_shard(model, rows, ids, images, texts, boxes, args.batch_size)
        for modality, array in arrays.items():
            _save(args.out / modality / f"part-{k:05d}.npy", array)
        table = pa.table({"row": pa.array(keep, pa.int64()), "id": pa.array([ids[r] for r in keep], pa.string())})
        tmp = args.out / "ids" / f"part-{k:05d}.tmp.parquet"
        pq.write_table(table, tmp)
        tmp.replace(args.out / "ids" / f"part-{k:05d}.parquet")  # the commit: this shard is finished
        skipped_here += skipped
    print(f"rank {rank}: embedded {len(todo)} shards into {args.out} ({skipped_here} images skipped)", flush=True)
    report["skipped"] = skipped_per_shard(args.out, len(ids), args.rows_per_shard)
    if report["skipped"] is not None:  # every shard is committed: this rank finished last
        tmp = args.out / f"embed.json.{rank}.tmp"
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(args.out / "embed.json")  # atomic: two ranks finishing together write the same report
        print(f"rank {rank}: every shard is finished: {args.out / 'embed.json'} "
              f"({sum(report['skipped'].values())} images skipped in all)", flush=True)
    return report


def load_embeddings(emb_dir: str | Path, modality: str) -> tuple[np.ndarray, pa.Table]:
    """Every shard's embeddings of `modality` (float16 [N, D]) and their ids, in shard order."""
    emb_dir = Path(emb_dir)
    parts = sorted((emb_dir / "ids").glob("part-?????.parquet"))
    arrays = [np.load(emb_dir / modality / (p.stem + ".npy")) for p in parts]
    return np.concatenate(arrays), pa.concat_tables([pq.read_table(p) for p in parts])


if __name__ == "__main__":
    main()
