"""Why the quick start's loss rises late: plot runs trained with `--set train.staleness_every=N`.

  python -m brivl_ds.bench.staleness RUN_DIR [RUN_DIR ...] --out staleness.png [--labels shipped constant-LR]

Three panels per run: the training loss (running mean of 20 steps) with the probe's loss against the real queue
and against the queue's samples re-encoded by the current momentum encoder; the key drift (1 - cos between a key
as enqueued and as re-encoded now) with the learning rate; and the positive cosine with the negatives'
log-sum-exp. Also prints the curves' values at the probe steps, so the README's numbers can be checked. Reads
metrics.jsonl only; measures nothing itself.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def read(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def running_mean(values: list[float], window: int = 20) -> list[float]:
    return [statistics.mean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    labels = args.labels or [run.name for run in args.runs]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(args.runs), 3, figsize=(16, 3.6 * len(args.runs)), squeeze=False)
    for row, run, label in zip(axes, args.runs, labels):
        records = read(run)
        steps = [r["step"] for r in records]
        probes = [r for r in records if "stale_loss" in r]
        loss_ax, drift_ax, parts_ax = row
        loss_ax.plot(steps, running_mean([r["loss"] for r in records]), label="training loss (mean of 20 steps)")
        loss_ax.plot([r["step"] for r in probes], [r["stale_loss"] for r in probes], "o-",
                     label="probe: against the queue")
        loss_ax.plot([r["step"] for r in probes], [r["fresh_loss"] for r in probes], "s-",
                     label="probe: against the queue re-encoded now")
        loss_ax.set_title(f"{label}: loss")
        loss_ax.legend(fontsize=7)
        drift_ax.plot([r["step"] for r in probes], [r["key_drift"] for r in probes], "o-", label="key drift")
        drift_ax.set_title(f"{label}: key drift (1 - cos) and LR")
        lr_ax = drift_ax.twinx()
        lr_ax.plot(steps, [r["lr"] for r in records], color="grey", label="lr")
        drift_ax.legend(loc="upper left", fontsize=7)
        lr_ax.legend(loc="upper right", fontsize=7)
        parts_ax.plot(steps, running_mean([r["neg_lse"] for r in records]), label="neg_lse")
        cos_ax = parts_ax.twinx()
        cos_ax.plot(steps, running_mean([r["pos_cos"] for r in records]), color="green", label="pos_cos")
        cos_ax.plot(steps, running_mean([r["hardest_neg_cos"] for r in records]), color="red",
                    label="hardest_neg_cos")
        parts_ax.set_title(f"{label}: parts of the loss (means of 20 steps)")
        parts_ax.legend(loc="upper left", fontsize=7)
        cos_ax.legend(loc="lower right", fontsize=7)
        for ax in row:
            ax.set_xlabel("step")
        print(f"{label}: step, loss (mean of the 20 steps to it), probe against the queue, against it re-encoded, "
              "key drift")
        means = dict(zip(steps, running_mean([r["loss"] for r in records])))
        for r in probes:
            print(f"  {r['step']:4d}  {means[r['step']]:6.2f}  {r['stale_loss']:6.2f}  {r['fresh_loss']:6.2f}  "
                  f"{r['key_drift']:.4f}")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
