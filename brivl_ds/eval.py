"""Held-out retrieval Recall@1/5/10, as a command.

  python -m brivl_ds.eval --checkpoint runs/tiny/checkpoints [--tag step300] [--data shards] [--out eval.json]
                          [--save-embeddings emb.pt]
  python -m brivl_ds.eval --embeddings np_img.npy np_text.npy        # precomputed (e.g. official) embeddings

Scores are dot products of the embeddings (row i of each is pair i); Recall@K is the share of queries whose true
pair ranks in the top K, image-to-text and text-to-image (the official evaluation's convention).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from brivl_ds.evaluation.recall import recall_at_k


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="the checkpoints/ directory of a run")
    source.add_argument("--embeddings", type=Path, nargs=2, metavar=("IMAGE_NPY", "TEXT_NPY"))
    parser.add_argument("--tag", help="checkpoint tag (default: latest)")
    parser.add_argument("--data", help="shards to evaluate on (default: the run's eval_path)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, help="write the metrics as JSON here")
    parser.add_argument("--save-embeddings", type=Path, metavar="PT",
                        help="with --checkpoint: also save the embeddings ({'image', 'text'}, row order, fp32)")
    args = parser.parse_args(argv)

    if args.embeddings:
        image = torch.from_numpy(np.load(args.embeddings[0]))
        text = torch.from_numpy(np.load(args.embeddings[1]))
        result = recall_at_k(image, text)
    else:
        from brivl_ds.data.build import build_collator, build_eval_set
        from brivl_ds.distributed import DistInfo
        from brivl_ds.evaluation.held_out import evaluate_retrieval

        # One process, no process group: the consolidated fp32 model is evaluated directly.
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        info = DistInfo(rank=0, world=1, local_rank=0, local_world=1, device=device)
        from brivl_ds.checkpointing.trained import load_online_model

        model, tokenizer, cfg = load_online_model(args.checkpoint, args.tag)
        model.to(device)
        data = args.data or cfg.data.eval_path
        if not data:
            raise ValueError("the run has no eval_path; pass --data")
        result = evaluate_retrieval(model, build_eval_set(cfg, data), build_collator(cfg, tokenizer),
                                    args.batch_size, info, torch.float32, embeddings_out=args.save_embeddings)
    text_out = json.dumps(result, indent=1)
    print(text_out)
    if args.out:
        args.out.write_text(text_out)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
