"""A faiss index over brivl_ds.embed's embeddings, sized to a memory budget: the corpus of the MatchSoul service.

  python -m brivl_ds.index --emb EMB_DIR --out INDEX_DIR [--modality text|image] [--memory-budget 4GiB]
                           [--kind auto|flat|hnsw|ivfpq] [--recall-sample 1000] [--recall-k 10] [--rerank 4]
                           [--threads N]

Needs the `index` extra (faiss): pip install 'brivl-ds[index]'. How the kind is chosen for the budget, what the
sizes count, how recall is measured and what INDEX_DIR holds (brivl_ds/inference/vector_index.py, printed below by
--help):
"""
from __future__ import annotations

import argparse
from pathlib import Path

from brivl_ds.inference import vector_index
from brivl_ds.inference.vector_index import KINDS, IndexSettings, build, format_size, parse_size


def main(argv: list[str] | None = None) -> dict:
    defaults = IndexSettings()
    parser = argparse.ArgumentParser(description=__doc__ + "\n" + vector_index.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--emb", type=Path, required=True, help="a folder written by brivl_ds.embed")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modality", choices=["text", "image"], help="default: the only one embedded")
    parser.add_argument("--memory-budget", type=parse_size, default=defaults.memory_budget,
                        help="e.g. 512MiB, 4GiB, 1.5GB or bytes (default: 4GiB)")
    parser.add_argument("--kind", choices=["auto", *KINDS], default=defaults.kind)
    parser.add_argument("--recall-sample", type=int, default=defaults.recall_sample)
    parser.add_argument("--recall-k", type=int, default=defaults.recall_k)
    parser.add_argument("--rerank", type=int, default=defaults.rerank, help="ANN candidates fetched = rerank x k")
    parser.add_argument("--threads", type=int, default=defaults.threads)
    args = parser.parse_args(argv)
    try:
        settings = IndexSettings(memory_budget=args.memory_budget, kind=args.kind, rerank=args.rerank,
                                 recall_sample=args.recall_sample, recall_k=args.recall_k, threads=args.threads)
        report = build(args.emb, args.out, settings, args.modality)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    print(f"{report['kind']} index ({report['factory']}) of {report['n']} {report['modality']} vectors of dimension "
          f"{report['dim']}: about {format_size(report['bytes_estimate'])} of a "
          f"{format_size(report['memory_budget'])} budget, built in {report['build_seconds']:.1f} s -> {args.out}")
    if report["recall"]:
        r = report["recall"]
        print(f"recall@{r['k']} on {r['queries']} sampled vectors: {r['ann']:.4f} ANN, {r['reranked']:.4f} after the "
              f"exact re-rank of {report['params']['rerank']} x {r['k']} candidates", flush=True)
    return report


if __name__ == "__main__":
    main()
