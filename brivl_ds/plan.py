"""Will a preset fit? Per-GPU memory by part, and the largest per-GPU batch that fits, before anything launches:

    python -m brivl_ds.plan --preset 10b --gpus 128 --gpu-memory 80GiB [--tensor-parallel 8] [--batch 16]

What is counted and how (brivl_ds/memory/planner.py, printed below by --help):
"""
from __future__ import annotations

import argparse
import json
import re

from brivl_ds.config import CHINESE_ROBERTA_VOCAB, PRESETS, build_config
from brivl_ds.ds_config import load_ds_config
from brivl_ds.memory import planner as memory_planner
from brivl_ds.memory.planner import GiB, Planner, format_plan


def parse_bytes(text: str) -> int:
    """'80GiB' (2^30), '40GB' (10^9), '512MiB', or a plain number of bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*(GiB|GB|MiB|MB|)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"cannot read a memory size from {text!r} (e.g. 80GiB, 40GB)")
    scale = {"GiB": GiB, "GB": 10 ** 9, "MiB": 2 ** 20, "MB": 10 ** 6, "": 1}[match.group(2)]
    return int(float(match.group(1)) * scale)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__ + "\n" + memory_planner.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpu-memory", type=parse_bytes, required=True, help="per GPU, e.g. 80GiB")
    parser.add_argument("--tensor-parallel", type=int, default=None, help="default: the preset's")
    parser.add_argument("--batch", type=int, default=None, help="per GPU; default: the preset's data.batch_size")
    parser.add_argument("--margin", type=float, default=0.10, help="fraction of GPU memory kept free (default 0.10)")
    parser.add_argument("--vocab-size", type=int, default=CHINESE_ROBERTA_VOCAB)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override, as in train")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)

    cfg = build_config(args.preset, args.overrides)
    tp = args.tensor_parallel or cfg.parallel.tensor_parallel
    batch = args.batch or cfg.data.batch_size
    planner = Planner(cfg, load_ds_config(cfg), args.gpus, tp, args.vocab_size)
    plan = planner.plan(batch, args.gpu_memory, args.margin)
    largest = planner.largest_batch(args.gpu_memory, args.margin)
    without = planner.per_sample_without_checkpointing()
    if args.json:
        print(json.dumps({**plan.to_dict(), "largest_batch": largest,
                          "activations_per_sample_without_checkpointing": without}, indent=2))
    else:
        print(format_plan(plan, largest, without))


if __name__ == "__main__":
    main()
