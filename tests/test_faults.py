"""Fault drills through the real launcher (`deepspeed --num_gpus 2 brivl_ds/train.py --set drill.*`), CPU, gloo.

One run's life, restarted as an on-call engineer would restart it:
  1. a NaN loss on rank 1 at step 4 and a poisoned sample at step 5: both steps skipped on every rank (no update,
     no EMA, no enqueue); then rank 0's save of step 6 fails (disk full): the run stops, step 5's checkpoint intact;
  2. step 5's checkpoint is damaged by hand: the restart falls back to step 4; then rank 1 is killed mid-step, on
     another node (two per-node launchers): rank 0 names it and exits by itself;
  3. the restart resumes from step 5 (saved again in 2.), and stops after 3 consecutive non-finite steps; retention
     keeps one checkpoint plus the one it resumed from.
And a stalled rank: the watchdog names it and stops the job.
"""
import base64
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, deepspeed_launch, free_port
from test_presets_matrix import REDUCED

pytestmark = pytest.mark.slow


def settings(out_dir, data, *extra) -> list[str]:
    return [f"train.output_dir={out_dir}", f"data.train_path={data['train']}", f"data.eval_path={data['eval']}",
            f"model.text.tokenizer_path={data['tokenizer']}", *REDUCED["tiny"], "train.max_steps=10",
            "optim.warmup_steps=2", "train.progress_bar=false", "train.save_every=1", "train.log_every=1", *extra]


def records(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_state(folder) -> dict[str, torch.Tensor]:
    """Weights, optimizer states, momentum encoders and queues of every rank's files: what a skipped step must
    leave exactly as it was."""
    out = {}
    for f in sorted(folder.glob("*_optim_states.pt")):
        state = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for g, flat in enumerate(state["fp32_flat_groups"]):
            out[f"{f.name}.fp32.{g}"] = flat
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{f.name}.{key}.{g}"] = state["optimizer_state_dict"]["state"][g][key]
    for f in sorted(folder.glob("*_model_states.pt")):
        state = torch.load(f, map_location="cpu", weights_only=False)
        for name, fragment in state["frozen_param_fragments"].items():
            out[f"{f.name}.{name}"] = fragment
        for key in ("image_queue", "text_queue"):
            q = state[key]
            out[f"{f.name}.{key}"] = torch.cat([q["rows"].flatten().float(), torch.tensor([q["ptr"], q["filled"]])])
    return out


def rows_of_step(data, step: int, rank: int) -> list[int]:
    """The dataset rows rank `rank` trains on at `step` (the stream's own plan: batch 4 of 2 ranks, 1 stream)."""
    from brivl_ds.config import get_preset
    from brivl_ds.data.stream import ShardStream

    cfg = get_preset("tiny")
    stream = ShardStream(data["train"], None, None, 4, rank, 2, seed=cfg.train.seed,
                         block_rows=cfg.data.shuffle_block_rows)
    stream.start_epoch(0, num_workers=0)
    return [int(r) for r in stream.epoch_batches()[step - 1]]


def launch_as_two_nodes(args: list[str]) -> tuple[list[int], list[str], float]:
    """Two 'nodes' of one rank each, each started by DeepSpeed's per-node launcher (what `deepspeed --hostfile`
    starts on every host through pdsh): a node's launcher knows nothing of the other node's processes."""
    world_info = base64.urlsafe_b64encode(json.dumps({"node0": [0], "node1": [0]}).encode()).decode()
    port, start = free_port(), time.monotonic()
    nodes = [subprocess.Popen([sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
                               f"--node_rank={n}", "--master_addr=127.0.0.1", f"--master_port={port}",
                               "brivl_ds/train.py", "--preset", "tiny", *[a for s in args for a in ("--set", s)]],
                              cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}) for n in (0, 1)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    return [node.returncode for node in nodes], logs, time.monotonic() - start


def test_skipped_steps_failed_save_torn_checkpoint_crash_mid_step_and_consecutive_skips(shapes_data, tmp_path):
    ckpt = tmp_path / "checkpoints"
    poisoned = rows_of_step(shapes_data, 5, rank=0)[2]
    code, log, _ = deepspeed_launch("tiny", settings(tmp_path, shapes_data, "resilience.keep_last=3",
                                                     "drill.nonfinite_loss_at_step=4", "drill.nonfinite_loss_rank=1",
                                                     f"drill.poison_row={poisoned}", "drill.fail_save_at_step=6"))
    # 1. two skipped steps, then a failed save stops the run: exit code 1 (every rank raises; the launchers pass
    # a rank's code on)
    assert code == 1, log[-3000:]
    assert "fault drill: rank 1 makes its loss NaN at step 4" in log and f"poisons row {poisoned}" in log
    assert f"rank 0: non-finite loss or key at step 5; rows of its batch: {rows_of_step(shapes_data, 5, 0)}" in log
    for step, count in ((4, 1), (5, 2)):
        assert f"step {step} skipped: non-finite loss, key or gradient norm (no update, no EMA, no enqueue; " \
               f"{step - 3} in a row, {count} in all)" in log
    steps = records(tmp_path)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped_steps"] for r in steps] == [0, 0, 0, 1, 2, 2]
    assert steps[3]["loss"] is None and steps[4]["loss"] is None and steps[3]["grad_norm"] is None
    assert all(math.isfinite(r["loss"]) for r in steps if r["step"] not in (4, 5))
    # the LR schedule holds on skipped steps: step 6 gets the LR step 4 would have had
    assert steps[2]["lr"] == steps[3]["lr"] == steps[4]["lr"] != steps[5]["lr"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tb_loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(tb_loss) == [1, 2, 3, 4, 5, 6] and math.isnan(tb_loss[4]) and math.isnan(tb_loss[5])
    assert [e.value for e in events.Scalars("train/skipped_steps")] == [0, 0, 0, 1, 2, 2]
    assert "saving checkpoint step6 failed on rank 0: [Errno 28] No space left on device" in log
    assert "the last complete checkpoint, step5, is intact" in log
    assert (ckpt / "latest").read_text().strip() == "step5"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step3", "step4", "step5"]  # keep_last=3
    states = {step: checkpoint_state(ckpt / f"step{step}") for step in (3, 4, 5)}
    for before, after in ((3, 4), (4, 5)):  # a skipped step changes nothing: weights, Adam, EMA, queues
        assert states[before].keys() == states[after].keys()
        for key in states[before]:
            assert torch.equal(states[before][key], states[after][key]), (before, after, key)
    assert all(torch.isfinite(t).all() for t in states[5].values())  # the queues were never poisoned

    # 2. a damaged newest checkpoint: the restart falls back to the previous one; then rank 1, on another node,
    # is killed mid-step: node 0's launcher is not told, so rank 0 must find out and name it by itself
    victim = ckpt / "step5" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:1000])
    codes, (log, log1), seconds = launch_as_two_nodes(settings(tmp_path, shapes_data, "resilience.keep_last=3",
                                                               "drill.crash_at_step=6", "drill.crash_rank=1"))
    assert f"WARNING: checkpoint {ckpt}/step5 is incomplete or damaged (zero_pp_rank_1_mp_rank_00_optim_states" \
           ".pt has 1000 bytes" in log
    assert f"resumed from {ckpt}/step4 at step 4" in log
    assert "fault drill: rank 1 is killed (SIGKILL) in the middle of step 6" in log1
    assert codes[0] != 0 and codes[1] != 0
    assert "ERROR on rank 0:" in log and "Diagnosis: rank 1 stopped responding" in log, log[-3000:]
    assert seconds < 180  # the job ended by itself, it did not hang
    assert (ckpt / "latest").read_text().strip() == "step5"  # step 5 trained and saved again, verified
    retrained = checkpoint_state(ckpt / "step5")  # a step that is applied changes every kind of state compared
    for kind in ("fp32", "exp_avg", "exp_avg_sq", "momentum.", "image_queue", "text_queue"):
        assert any(not torch.equal(retrained[k], states[4][k]) for k in retrained if kind in k), kind

    # 3. three non-finite steps in a row stop the run; keep_last=1 still keeps the checkpoint it resumed from
    code, log, _ = deepspeed_launch("tiny", settings(tmp_path, shapes_data, "resilience.keep_last=1",
                                                     "resilience.max_consecutive_skips=3",
                                                     "drill.nonfinite_loss_at_step=6", "drill.nonfinite_loss_steps=3"))
    assert f"resumed from {ckpt}/step5 at step 5" in log
    assert code == 1 and "stopping: 3 consecutive steps (up to step 8) had a non-finite loss" in log
    assert "The last checkpoint, step7, is intact" in log
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step5", "step7"]
    assert [r["step"] for r in records(tmp_path)] == list(range(1, 9))  # each step once, over three restarts


def test_a_stalled_rank_is_named_and_the_job_stops(shapes_data, tmp_path):
    code, log, seconds = deepspeed_launch("tiny", settings(tmp_path, shapes_data, "train.save_every=0",
                                                           "resilience.heartbeat_every=1",
                                                           "resilience.hang_timeout_s=15",
                                                           "drill.stall_at_step=3", "drill.stall_rank=1"))
    assert "heartbeat @ step 1: 2 ranks alive; slowest rank" in log
    assert "fault drill: rank 1 stalls while waiting for the batch of step 3" in log
    # each rank prints its own diagnosis ("...; rank R has waited ..."), and both name rank 1
    lines = {int(re.search(r"; rank (\d+) has waited", line)[1]): line
             for line in log.splitlines() if line.startswith("ERROR: ")}
    assert sorted(lines) == [0, 1], log[-3000:]
    assert all(line.startswith("ERROR: rank 1 stalled at step 3 in phase 'data'") for line in lines.values()), lines
    assert code == 86 and "exits with return code = 86" in log
    assert seconds < 240

