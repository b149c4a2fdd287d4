"""Serve an exported BriVL over HTTP (FastAPI + uvicorn): embeddings, matching and MatchSoul search.

  python -m brivl_ds.serve --model MODEL_DIR [--index TEXT_INDEX_DIR] [--index IMAGE_INDEX_DIR] [--port 8000]

MODEL_DIR comes from `python -m brivl_ds.export`, index folders from `python -m brivl_ds.index` (one per modality:
a text index answers image queries, an image index text queries). The endpoints are described in
brivl_ds/serving/app.py; `--no-batching` runs each request alone (the benchmark's baseline). One process serves
one model on one device; run one per GPU behind a load balancer to scale out. Needs the `serve` extra (FastAPI,
uvicorn, prometheus-client, faiss): pip install 'brivl-ds[serve]'.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from brivl_ds.optional_deps import require
from brivl_ds.serving.batcher import BatchingConfig
from brivl_ds.serving.inputs import InputLimits


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    limits, batching = InputLimits(), BatchingConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a folder written by brivl_ds.export")
    parser.add_argument("--index", type=Path, action="append", default=[], help="a folder written by brivl_ds.index")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="compute dtype (default: exported)")
    parser.add_argument("--no-batching", action="store_true", help="run each request alone")
    parser.add_argument("--max-batch", type=int, default=batching.max_batch, help="items per model call")
    parser.add_argument("--batch-window-ms", type=float, default=batching.window_s * 1e3,
                        help="how long a request waits for others to share its batch")
    parser.add_argument("--max-waiting", type=int, default=batching.max_waiting,
                        help="items waiting for the model beyond which requests get a 503")
    parser.add_argument("--max-items", type=int, default=limits.max_items, help="inputs per request")
    parser.add_argument("--max-image-bytes", type=int, default=limits.max_image_bytes)
    parser.add_argument("--max-pixels", type=int, default=limits.max_pixels)
    parser.add_argument("--max-text-chars", type=int, default=limits.max_text_chars)
    parser.add_argument("--max-body-bytes", type=int, default=limits.max_body_bytes)
    parser.add_argument("--max-k", type=int, default=limits.max_k)
    parser.add_argument("--log-level", default="warning")
    return parser.parse_args(argv)


def build_app(args: argparse.Namespace):
    from brivl_ds.inference.exported import DTYPES, load_model
    from brivl_ds.inference.vector_index import VectorIndex
    from brivl_ds.serving.app import ServeConfig, create_app

    model = load_model(args.model, args.device, DTYPES[args.dtype] if args.dtype else None)
    indexes = {}
    for folder in args.index:
        index = VectorIndex.load(folder)
        if index.dim != model.config.embed_dim:
            raise SystemExit(f"{folder}: an index of dimension {index.dim}, but the model embeds in "
                             f"{model.config.embed_dim}: it was built with another model")
        if index.modality in indexes:
            raise SystemExit(f"{folder}: a second {index.modality} index (one per modality)")
        indexes[index.modality] = index
    config = ServeConfig(
        batching=BatchingConfig(enabled=not args.no_batching, max_batch=args.max_batch,
                                window_s=args.batch_window_ms / 1e3, max_waiting=args.max_waiting),
        limits=InputLimits(max_items=args.max_items, max_image_bytes=args.max_image_bytes, max_pixels=args.max_pixels,
                           max_text_chars=args.max_text_chars, max_body_bytes=args.max_body_bytes, max_k=args.max_k),
        model_name=args.model.resolve().name)
    return create_app(model, indexes, config)


def main(argv: list[str] | None = None) -> None:
    uvicorn = require("uvicorn", "serve")
    args = parse_args(argv)
    app = build_app(args)
    print(f"serving {args.model} on http://{args.host}:{args.port} (batching "
          f"{'off' if args.no_batching else f'up to {args.max_batch} items, {args.batch_window_ms:g} ms window'})",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
