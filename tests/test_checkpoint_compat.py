"""Checkpoints written before the checkpointing package (commit 451fbdc) still resume and export.

tests/fixtures/checkpoint-451fbdc/ holds what that commit's code wrote (its make.py, run from that checkout): step 2
of a 2-rank ZeRO-3 run (the tiny preset's layer types at tiny widths, on the committed data), the metrics.jsonl of
the same run continued to step 3, and the hashes of its export of step 2. Today's code must resume from the old
checkpoint and give step 3 as the old run did (bit for bit on the CPU that wrote it, within cross-CPU rounding
elsewhere), and export step 2 to the same tensors.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO, deepspeed_train

FIXTURE = REPO / "tests" / "fixtures" / "checkpoint-451fbdc"
# The old run's step 3 was computed on one CPU; this machine's float kernels may round differently (the README's
# quick-start figures differ in the third digit between Intel and AMD after 400 steps). One step from the same state
# agrees to ~1e-6 relative across CPUs; a checkpoint restored wrongly is off by far more (a queue not restored:
# loss 2.80 instead of 5.52). The LR schedule and the counters are exact.
FLOATS = ("loss", "loss_i2t", "loss_t2i", "tau", "grad_norm")
EXACT = ("lr", "queue_fill", "skipped_rows", "skipped_steps")


def old_records() -> list[dict]:
    return [json.loads(line) for line in (FIXTURE / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_old_checkpoint_resumes_to_the_old_runs_next_step(tmp_path):
    checkpoints = tmp_path / "old"  # a copy: the fixture stays as it was written
    shutil.copytree(FIXTURE / "checkpoints", checkpoints)
    settings = json.loads((FIXTURE / "settings.json").read_text())
    output = deepspeed_train("tiny", [f"train.output_dir={tmp_path / 'run'}", *settings, "train.max_steps=3",
                                      f"train.resume={checkpoints / 'step2'}"])
    assert f"resumed from {checkpoints / 'step2'} at step 2" in output
    new = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in new] == [3]
    expected = old_records()[2]
    assert {k: new[0][k] for k in EXACT} == {k: expected[k] for k in EXACT}
    assert {k: new[0][k] for k in FLOATS} == pytest.approx({k: expected[k] for k in FLOATS}, rel=1e-4)


def test_old_checkpoint_exports_the_same_tensors(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from brivl_ds.export import main as export

    monkeypatch.chdir(REPO)  # the old run recorded its data and tokenizer paths relative to the repository
    export(["--checkpoint", str(FIXTURE / "checkpoints"), "--tag", "step2", "--out", str(tmp_path / "exported")])
    expected = json.loads((FIXTURE / "export_step2.json").read_text())
    weights = load_file(str(tmp_path / "exported" / "model.safetensors"))
    digests = {name: hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
               for name, t in sorted(weights.items())}
    assert digests == expected["tensors"]
    assert json.loads((tmp_path / "exported" / "export.json").read_text())["tau"] == expected["tau"]


def test_the_fixture_is_what_its_manifest_says():
    """A changed fixture file would make the tests above compare against something the old code never wrote."""
    from brivl_ds.checkpointing.store import CheckpointStore

    assert CheckpointStore(FIXTURE / "checkpoints").verify("step2") == []


def test_export_carries_the_runs_evaluation_only_for_its_step(tmp_path, monkeypatch):
    """export.json's "eval" is the run's eval.json when that evaluation was made at the exported checkpoint's step;
    an evaluation of another step would describe other weights, so none is recorded."""
    from brivl_ds.export import export

    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "checkpoints", run / "checkpoints")
    for step, expected in ((2, {"step": 2, "i2t_r1": 0.25}), (3, None)):
        (run / "eval.json").write_text(json.dumps({"step": step, "i2t_r1": 0.25}))
        out = export(run / "checkpoints", tmp_path / f"exported{step}", tag="step2")
        assert json.loads((out / "export.json").read_text())["eval"] == expected
