"""Queue vs in-batch negatives, measured through the trainer: the WenLan paper's claim that a queue of negatives
beats in-batch negatives at small batches.

  python -m brivl_ds.bench.negatives --out runs/negatives [--modes queue batch queue+batch] [--batch-sizes 4 16]
      [--mask off on] [--seeds 1234] [--steps 400] [--ranks 2] [--captions full|label] [--set section.field=value ...]

Every run is `deepspeed --num_gpus RANKS brivl_ds/train.py --preset tiny` with one cell's settings; runs of one
batch size and seed see the same samples in the same order (the stream depends on the seed, the batch size and the
ranks only), so the modes are compared at matched steps and samples. A finished run (its eval.json) is reused, so
the study can be stopped and restarted. It writes results.json (every run's final evaluation, wall time and loss
curve), table.md (means over seeds, the spread where there are several) and curves.png (the loss per step). Wall
times are in results.json only: on a shared machine they say little, and `batch` skips the momentum forward.
It prints what it measured, with the machine, and asserts nothing.

`--captions label` measures false negatives: it trains on the built-in pictures captioned by a coarse label alone,
their background and the colour of their leftmost object (e.g. "灰色背景上有红色"), so 6,000 rows share 32 captions
and a 1,024-key queue holds about 32 copies of each query's own caption: what a crawl with boilerplate captions looks
like to the loss. Its score is zero-shot top-1 over the 32 labels on the held-out pictures, the labels themselves
as prompts; recall over the held-out full captions is printed but means little there.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from brivl_ds.bench import cores, cpu_model
from brivl_ds.data.synthetic import BACKGROUNDS, COLOURS, default_synthetic_dir

REPO = Path(__file__).resolve().parents[2]
METRICS = ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "i2t_r10", "t2i_r10", "zeroshot_acc1", "zeroshot_acc5")


def run_name(mode: str, batch: int, mask: bool, seed: int) -> str:
    return f"{mode.replace('+', '-')}_b{batch}_{'mask' if mask else 'nomask'}_s{seed}"


LABEL_CLASSES = [background + "背景上有" + colour for background in BACKGROUNDS for colour in COLOURS]
"""`--captions label`: a picture's background and the colour of its leftmost object, e.g. 灰色背景上有红色 (32)."""


def caption_label(caption: str) -> str:
    """灰色背景上有一个大的红色圆形和... -> 灰色背景上有红色 (the built-in captions list objects left to right)."""
    match = re.match(r"(.+?)背景上有一个[大小]的(.+?色)", caption)
    if match is None or match[1] not in BACKGROUNDS or match[2] not in COLOURS:
        raise ValueError(f"not a built-in `shapes` caption: {caption!r}")
    return f"{match[1]}背景上有{match[2]}"


def label_caption_data(out: Path, shapes_dir: Path, n_train: int, n_eval: int, image_size: int) -> list[str]:
    """The `--captions label` data: the built-in training rows (generated in SHAPES_DIR when missing), each
    captioned by its label (caption_label), written once to OUT/train-label-captions, and the held-out pictures
    sorted by label into OUT/zeroshot-label/<label>/ for zero-shot; returns the overrides that train on them."""
    import dataclasses

    from brivl_ds.data.shards import Row, read_table, write_shards
    from brivl_ds.data.synthetic import ensure_shapes_dataset

    paths = ensure_shapes_dataset(shapes_dir, n_train, n_eval, image_size, seed=0)
    train, bench = out / "train-label-captions", out / "zeroshot-label"
    if not (train / "manifest.json").exists():
        fields = {f.name for f in dataclasses.fields(Row)}
        rows = [Row(**{k: v for k, v in r.items() if k in fields}) for r in read_table(paths["train"]).to_pylist()]
        for row in rows:
            row.text = caption_label(row.text)
        partial = train.with_name(train.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_shards(rows, partial, rows_per_shard=len(rows) // 4 + 1)
        partial.rename(train)
    if not (bench / "classes.txt").exists():
        partial = bench.with_name(bench.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        for row in read_table(paths["eval"], columns=["id", "image", "text"]).to_pylist():
            folder = partial / caption_label(row["text"])
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{row['id']}.jpg").write_bytes(row["image"])  # the generator stores JPEG
        (partial / "classes.txt").write_text("".join(f"{c}\n" for c in LABEL_CLASSES), encoding="utf-8")
        partial.rename(bench)
    return [f"data.train_path={train}", f"data.eval_path={paths['eval']}",
            f"model.text.tokenizer_path={paths['tokenizer']}", f"data.zeroshot_path={bench}",
            f"data.zeroshot_classes={bench / 'classes.txt'}", "data.zeroshot_templates=none"]


def train(out: Path, ranks: int, settings: dict[str, object], extra: list[str]) -> float:
    """One training run through the launcher; returns its wall time in seconds."""
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    sets += [arg for assignment in extra for arg in ("--set", assignment)]
    command = ["deepspeed", "--num_gpus", str(ranks), str(REPO / "brivl_ds" / "train.py"), "--preset", "tiny",
               *sets, "--set", f"train.output_dir={out}", "--set", "train.progress_bar=false"]
    start = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return time.perf_counter() - start


def read_run(out: Path) -> dict:
    evaluation = json.loads((out / "eval.json").read_text())
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [r for r in curve if "loss" in r]
    return {"eval": evaluation, "loss": [r["loss"] for r in curve],
            "neg_lse": [r.get("neg_lse") for r in curve], "dup_share": [r.get("dup_share") for r in curve]}


def summarise(runs: list[dict]) -> list[dict]:
    """Mean (and min-max spread) of each metric over the seeds of a (mode, batch, mask) cell."""
    cells: dict[tuple, list[dict]] = {}
    for run in runs:
        cells.setdefault((run["mode"], run["batch"], run["mask"]), []).append(run)
    rows = []
    for (mode, batch, mask), members in sorted(cells.items(), key=lambda c: (c[0][1], c[0][2], c[0][0])):
        row = {"mode": mode, "batch": batch, "mask": mask, "seeds": len(members)}
        for metric in METRICS:
            values = [m["eval"][metric] for m in members if metric in m["eval"]]
            if values:
                row[metric] = (statistics.mean(values), min(values), max(values))
        rows.append(row)
    return rows


def table(rows: list[dict], ranks: int) -> str:
    present = [m for m in METRICS if any(m in r for r in rows)]
    head = ["negatives", "global batch", "masking", "seeds", *present]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["mode"], str(r["batch"] * ranks), "on" if r["mask"] else "off", str(r["seeds"])]
        for metric in present:
            if metric not in r:
                cells.append("not measured")
                continue
            mean, low, high = r[metric]
            cells.append(f"{100 * mean:.1f}" + (f" ({100 * low:.1f}-{100 * high:.1f})" if r["seeds"] > 1 else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, ranks: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in runs})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for run in (r for r in runs if r["batch"] == batch):
            loss = run["loss"]
            window = 20  # a running mean: single steps of a 16-sample batch are noisy
            smooth = [statistics.mean(loss[max(0, i - window + 1): i + 1]) for i in range(len(loss))]
            ax.plot(range(1, len(loss) + 1), smooth, label=f"{run['mode']}, mask {'on' if run['mask'] else 'off'}, "
                    f"seed {run['seed']}")
        ax.set_title(f"global batch {batch * ranks}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (L_I2T + L_T2I), running mean of 20")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modes", nargs="+", default=["queue", "batch", "queue+batch"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[4, 16], help="per rank")
    parser.add_argument("--mask", nargs="+", choices=["off", "on"], default=["off"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1234])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--captions", choices=["full", "label"], default="full",
                        help="label: the built-in pictures captioned by background and leftmost colour only, 32 "
                        "captions (duplicate-heavy; scored by zero-shot)")
    parser.add_argument("--set", action="append", default=[], dest="extra",
                        help="more overrides for every run, e.g. data.synthetic_variant=shapes-hard")
    args = parser.parse_args(argv)
    if args.captions == "label" and any(e.startswith(("data.synthetic", "data.train_path")) for e in args.extra):
        parser.error("--captions label trains on its own data set (made from the classic built-in data); "
                     "leave data.synthetic_* and data.train_path unset")
    args.out.mkdir(parents=True, exist_ok=True)
    data, data_sets = "built-in shapes data", []
    if args.captions == "label":
        data = ("the built-in pictures captioned by their background and leftmost object's colour alone (32 "
                "captions), zero-shot with those captions as class names")
        from brivl_ds.config import get_preset

        tiny = get_preset("tiny")
        data_sets = label_caption_data(args.out, REPO / default_synthetic_dir("shapes"), tiny.data.synthetic_train,
                                       tiny.data.synthetic_eval, tiny.model.image.image_size)
    runs = []
    for batch, mask, seed, mode in itertools.product(args.batch_sizes, args.mask, args.seeds, args.modes):
        name, masked = run_name(mode, batch, mask == "on", seed), mask == "on"
        out = args.out / name
        timing = out / "wall_seconds.txt"
        if not (out / "eval.json").exists():
            settings = {"moco.negatives": mode, "data.batch_size": batch, "moco.mask_false_negatives": masked,
                        "train.seed": seed, "train.max_steps": args.steps, "train.resume": "none"}
            print(f"training {name} ...", flush=True)
            out.mkdir(parents=True, exist_ok=True)
            timing.write_text(f"{train(out, args.ranks, settings, data_sets + args.extra):.1f}")
        seconds = float(timing.read_text()) if timing.exists() else None  # a run made elsewhere may have none
        runs.append({"name": name, "mode": mode, "batch": batch, "mask": masked, "seed": seed, "seconds": seconds,
                     **read_run(out)})
        print(f"{name}: " + ", ".join(f"{m} {100 * runs[-1]['eval'][m]:.1f}" for m in METRICS
                                      if m in runs[-1]["eval"]), flush=True)
    machine = f"{cpu_model()}, {cores()}; {args.ranks} ranks (deepspeed launcher, ZeRO-3, fp32)"
    rows = summarise(runs)
    command = "python -m brivl_ds.bench.negatives " + " ".join(sys.argv[1:] if argv is None else argv)
    md = (f"{table(rows, args.ranks)}\n\nHeld-out recall and zero-shot top-1 and top-5 in percent after "
          f"{args.steps} steps (`tiny`, {'; '.join([data, *args.extra])}); measured on {machine} by `{command}`.\n")
    (args.out / "table.md").write_text(md)
    (args.out / "results.json").write_text(json.dumps({"machine": machine, "command": command, "runs": runs},
                                                      indent=1))
    plot(runs, args.out / "curves.png", args.ranks)
    print(md)
    print(f"wrote {args.out / 'table.md'}, {args.out / 'results.json'} and {args.out / 'curves.png'}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
