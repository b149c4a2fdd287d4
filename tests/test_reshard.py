"""Resuming on another number of ranks (brivl_ds/checkpointing/reshard.py).

1. The resharding loader against DeepSpeed's own load, on the same 2 ranks, in the presets' recipe (bf16 weights,
   fp32 master, bf16 Adam moments of adamw_half, fp32 EMA copies, frozen layers, activation checkpointing, small
   persistent parameters): every partition, optimizer state, EMA copy, buffer and counter equal, bit for bit; and
   the same from DeepSpeed's universal checkpoint (`ds_to_universal`), an independent reader of the files.
2. Through the launcher: a 4-rank checkpoint taken mid-epoch resumes on 2 ranks with the same losses as a 2-rank
   run continued from the same state consolidated by DeepSpeed's universal converter, then goes back to 4 ranks.
"""
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import run_distributed
from test_zero3 import make_config, write_atomically


def _recipe(data, out_dir):
    cfg = make_config(data, out_dir, checkpointed=True)  # frozen lower layers and activation checkpointing
    ds = json.loads(open(cfg.train.ds_config).read())
    ds["bf16"] = {"enabled": True}
    path = out_dir / "ds_bf16.json"
    write_atomically(path, ds)
    cfg.train.ds_config, cfg.optim.name = str(path), "adamw_half"
    return cfg


def _state(trainer) -> dict[str, torch.Tensor]:
    """Everything a resume restores on this rank, as named tensors (ZeRO-3's padding at a partition's end left
    out: it holds no value)."""
    engine, opt = trainer.engine, trainer.engine.optimizer
    rank = torch.distributed.get_rank()
    names = {p: n for n, p in engine.module.named_parameters()}
    valid = {p: max(0, min(p.partition_numel(), p.ds_numel - rank * p.partition_numel())) for p in names}
    out = {}
    for g, flat in enumerate(opt.fp32_partitioned_groups_flat):
        st = opt.optimizer.state[flat]
        out[f"step.{g}"] = torch.tensor(float(st["step"]))
        offset = 0
        for p in opt.fp16_groups[g]:
            n, name = p.partition_numel(), names[p]
            for key, flat_state in (("fp32", flat.data), ("exp_avg", st["exp_avg"]), ("exp_avg_sq", st["exp_avg_sq"]),
                                    ("bf16", opt.fp16_partitioned_groups_flat[g].data)):
                out[f"{key}.{name}"] = flat_state[offset:offset + valid[p]]
            offset += n
    for p, name in names.items():
        out[f"partition.{name}"] = p.ds_tensor.data[:valid[p]]
        if getattr(p, "ds_persist", False):
            out[f"gathered.{name}"] = p.data
    for name, b in engine.module.named_buffers():
        out[f"buffer.{name}"] = b
    for (_, momentum), master, low in zip(trainer.momentum.pairs, trainer.momentum.master, trainer.momentum.lowp):
        out[f"ema.{names[momentum]}"] = master[:valid[momentum]]
        out[f"ema_bf16.{names[momentum]}"] = low[:valid[momentum]]
    out["queues"] = torch.cat([trainer.image_queue.keys.float(), trainer.text_queue.keys.float()])
    out["counters"] = torch.tensor([engine.global_steps, engine.global_samples, engine.skipped_steps,
                                    trainer.image_queue.ptr, trainer.image_queue.filled, trainer.pos.step])
    out["lr"] = torch.tensor([g["lr"] for g in opt.optimizer.param_groups] + trainer.scheduler.get_last_lr())
    return out


def _reshard_equals_deepspeed_load(rank, world, data, out_dir):
    from pathlib import Path

    from torch.utils.data import DataLoader

    from brivl_ds.checkpointing.files import checkpoint_world
    from brivl_ds.training.trainer import Trainer

    out_dir = Path(out_dir)
    trainer = Trainer(_recipe(data, out_dir))
    trainer.engine.train()
    trainer.stream.start_epoch(0, num_workers=0)
    for _, (batch, meta) in zip(range(3), DataLoader(trainer.stream, batch_size=None)):
        trainer.train_step(batch, meta["content_ids"], rows=meta["rows"])
        trainer.pos.step += 1
        trainer.pos.data.batch_in_epoch += 1
    trainer.save()
    folder = out_dir / "checkpoints" / "step3"
    if rank == 0:  # DeepSpeed's own converter: the independent reader
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(folder), "--output_folder", str(out_dir / "universal" / "step3")],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    torch.distributed.barrier()

    cfg = _recipe(data, out_dir)
    cfg.train.resume = "auto"
    expected = _state(Trainer(cfg))  # DeepSpeed's rigid load, rank by rank
    assert expected["counters"][-1] == 3
    # the direct reader, forced: the same layout would take DeepSpeed's load
    direct = Trainer(_recipe(data, out_dir))
    direct.checkpointer._load_resharded(folder, direct.state, written_on=checkpoint_world(folder))
    # DeepSpeed's universal checkpoint, through the trainer's resume
    cfg = _recipe(data, out_dir)
    cfg.train.resume = str(out_dir / "universal" / "step3")
    universal = Trainer(cfg)
    for name, trainer in (("direct", direct), ("universal", universal)):
        got = _state(trainer)
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), (name, key)


@pytest.mark.slow
def test_resharding_loader_equals_deepspeed_load_in_the_presets_recipe(shapes_data, tmp_path):
    run_distributed(_reshard_equals_deepspeed_load, 2, shapes_data, str(tmp_path))


@pytest.mark.slow
def test_resume_on_2_then_4_then_2_ranks_matches_deepspeeds_universal_checkpoint(shapes_data, tmp_path):
    """2 ranks x 4 samples to step 2, resumed mid-epoch on 4 ranks x 2 (the same global batch) to step 4, then on
    2 ranks again to step 6; the last leg equals a 2-rank run continued from DeepSpeed's universal checkpoint of the
    same 4-rank state (its own converter reading the files), loss for loss, bit for bit."""
    from conftest import deepspeed_train
    from test_faults import records, settings

    def leg(name, world, batch, stop, *extra):
        out = tmp_path / name
        log = deepspeed_train("tiny", settings(out, shapes_data, f"data.batch_size={batch}",
                                               f"train.stop_at_step={stop}", "train.save_every=2", *extra), world)
        return out, log

    first, _ = leg("two", 2, 4, 2)
    second, log = leg("four", 4, 2, 4, f"train.resume={first}/checkpoints/step2")
    assert f"resharding {first}/checkpoints/step2 (2 data-parallel x 1 tensor-parallel ranks) onto 4 x 1" in log
    third, log = leg("two-again", 2, 4, 6, f"train.resume={second}/checkpoints/step4")
    assert "(4 data-parallel x 1 tensor-parallel ranks) onto 2 x 1" in log
    universal = tmp_path / "universal" / "step4"
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(second / "checkpoints" / "step4"), "--output_folder", str(universal)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reference, log = leg("reference", 2, 4, 6, f"train.resume={universal}")
    assert "(DeepSpeed universal checkpoint) onto 2 x 1" in log
    legs = [records(d) for d in (first, second, third)]
    assert [[r["step"] for r in leg_records] for leg_records in legs] == [[1, 2], [3, 4], [5, 6]]
    assert [r["loss"] for r in records(reference)] == [r["loss"] for r in legs[2]]
    assert [r["grad_norm"] for r in records(reference)] == [r["grad_norm"] for r in legs[2]]
    assert all(math.isfinite(r["loss"]) for leg_records in legs for r in leg_records[1:])
    position = torch.load(third / "checkpoints" / "step6" / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                          map_location="cpu", weights_only=False)["position"]
    assert position["samples"] == 6 * 8 and position["data"]["batch_in_epoch"] == 6
    assert [d["world"] for d in position["data"]["history"]] == [2, 4]  # the epoch was dealt three times
