"""Export a trained BriVL out of its ZeRO-3 checkpoints into a self-describing folder (brivl_ds/inference/exported.py
writes it and loads it back).

  python -m brivl_ds.export --checkpoint runs/tiny/checkpoints [--tag step400] --out models/tiny [--dtype fp32|bf16]

The folder, read by `brivl_ds.load_model` with no DeepSpeed engine and no process group, holds config.json,
preprocess.json, model.safetensors, tokenizer/ and export.json (described in brivl_ds/inference/exported.py).
Checkpoints of any data-parallel and tensor-parallel size are read (checkpointing/consolidate.py).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from brivl_ds.inference.exported import DTYPES, save_exported


def export(checkpoint_dir: Path, out: Path, tag: str | None = None, dtype: str = "fp32") -> Path:
    from brivl_ds.checkpointing.files import latest_tag
    from brivl_ds.checkpointing.store import step_of
    from brivl_ds.checkpointing.trained import load_moco_model

    checkpoint_dir = Path(checkpoint_dir)
    moco, tokenizer, cfg = load_moco_model(checkpoint_dir, tag)
    tag = tag or latest_tag(checkpoint_dir)
    # The run's eval.json holds its last evaluation: it describes this checkpoint only if made at the same step.
    run_eval = checkpoint_dir.parent / "eval.json"
    evaluation = json.loads(run_eval.read_text()) if run_eval.exists() else None
    if evaluation is not None and evaluation.get("step") != step_of(tag):
        evaluation = None
    return save_exported(moco.online, tokenizer, cfg, out, dtype, provenance={
        "checkpoint": str(checkpoint_dir.resolve()), "tag": tag, "tau": float(moco.tau().detach()),
        "eval": evaluation})


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="the checkpoints/ directory of a run")
    parser.add_argument("--tag", help="checkpoint tag (default: latest)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args(argv)
    out = export(args.checkpoint, args.out, args.tag, args.dtype)
    print(f"exported {args.checkpoint} to {out}")
    return out


if __name__ == "__main__":
    main()
