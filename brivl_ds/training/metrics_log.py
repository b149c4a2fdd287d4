"""What a run records, in one place: metrics.jsonl (every step), TensorBoard (every `log_every` steps), eval.json.

metrics.jsonl holds one record per optimizer step, {"step", "epoch", "loss", ...}; a step with an evaluation also
carries its results, "eval": {...} (eval.json's keys: the recalls, the zero-shot accuracy when configured).
After a resume, the steps logged past the checkpoint are about to be logged again: TensorBoard drops its events
from that step on (`purge_step`) and metrics.jsonl is cut back, so each step appears once in both.
Only rank 0 writes; on other ranks every call is a no-op.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from brivl_ds.moco.loss import STAT_KEYS
from brivl_ds.moco.staleness import STALENESS_KEYS

TENSORBOARD_TRAIN_KEYS = ("loss", "loss_i2t", "loss_t2i", "tau", "lr", "grad_norm", "samples_per_s", "step_time",
                          "queue_fill", "skipped_rows", "skipped_steps", *STAT_KEYS)


class MetricsLog:
    def __init__(self, out_dir: Path, enabled: bool, log_every: int, resumed_at_step: int | None = None):
        self.out_dir, self.enabled, self.log_every = Path(out_dir), enabled, log_every
        self.jsonl = self.out_dir / "metrics.jsonl"
        self.writer = None
        if enabled:
            resumed = resumed_at_step is not None
            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"),
                                        purge_step=resumed_at_step + 1 if resumed else None)
            if resumed:
                drop_metrics_after(self.jsonl, resumed_at_step)

    def train_step(self, step: int, epoch: int, stats: dict, force_tensorboard: bool = False) -> None:
        """One optimizer step's record; TensorBoard gets every `log_every`-th step, the first, and forced ones
        (skipped steps, so a NaN shows where it happened)."""
        if not self.enabled:
            return
        record = {"step": step, "epoch": epoch, **stats}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(_finite_or_null(record)) + "\n")
        if step % self.log_every == 0 or step == 1 or force_tensorboard:
            for key in TENSORBOARD_TRAIN_KEYS:
                self.writer.add_scalar(f"train/{key}", record[key], step)
        for key in STALENESS_KEYS:  # at the probe's steps (train.staleness_every)
            if key in record:
                self.writer.add_scalar(f"staleness/{key}", record[key], step)

    def evaluation(self, step: int, result: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in result.items():
            self.writer.add_scalar(f"eval/{key}", value, step)
        (self.out_dir / "eval.json").write_text(json.dumps({"step": step, **result}, indent=1))
        add_to_step_record(self.jsonl, step, {"eval": _finite_or_null(result)})

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def _finite_or_null(record: dict) -> dict:
    """Non-finite floats (a skipped step's loss) as null: strict JSON has no NaN."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def _last_line(f) -> tuple[int, bytes]:
    """(offset, bytes) of the last line of a binary file, read from its end."""
    end = f.seek(0, os.SEEK_END)
    chunk = 1 << 16
    while True:
        start = max(0, end - chunk)
        f.seek(start)
        tail = f.read(end - start)
        cut = tail.rstrip(b"\n").rfind(b"\n")
        if cut >= 0 or start == 0:
            return start + cut + 1, tail[cut + 1:]
        chunk *= 2


def add_to_step_record(path: Path, step: int, extra: dict) -> None:
    """Merge `extra` into metrics.jsonl's record of `step`: its last record, since an evaluation follows the step it
    evaluates (that record is rewritten atomically, the file copied up to it); a record of its own when the last is
    another step's (a run resumed at its last step whose metrics.jsonl had lost it)."""
    path = Path(path)
    offset, last = 0, b""
    if path.exists():
        with open(path, "rb") as f:
            offset, last = _last_line(f)
    try:
        record = json.loads(last)
    except ValueError:
        record = None
    if not (isinstance(record, dict) and record.get("step") == step):
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, **extra}) + "\n")
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        remaining = offset
        while remaining:
            block = src.read(min(remaining, 1 << 20))
            dst.write(block)
            remaining -= len(block)
        dst.write((json.dumps({**record, **extra}) + "\n").encode())
    tmp.replace(path)


def drop_metrics_after(path: Path, step: int) -> None:
    """Keep the metrics.jsonl records of steps <= `step` (the resumed checkpoint's), rewritten atomically."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError):  # a record torn by the crash we are resuming from
            print(f"{path}: dropped an unreadable record: {line[:80]!r}", flush=True)
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
