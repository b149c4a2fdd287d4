"""The memory planner (brivl_ds/memory/planner.py, `python -m brivl_ds.plan`) against measurement on CPU.

- Model states: what the planner predicts per rank from shapes and the ds_config equals, within 1% per part, what
  live Trainers hold after a real step: `base` at its real size on 2 ranks (TP = 1, its shipped bf16 config,
  AdamW, frozen lower layers), the reduced `10b` on 4 ranks at TP = 2 x DP = 2 (adamw_half), the reduced
  `paper-1b` with DeepSpeed's bf16 optimizer states, and `tiny` (fp32).
- Activations: the planner's estimate (traced on the meta device at batch 1 and 2, extrapolated) is within 10% of
  the bytes autograd actually saves in a real training step of `tiny` and of `base` at its real size, at batch 3.
"""
import json
from pathlib import Path

import pytest
import torch

from brivl_ds.config import build_config
from conftest import run_distributed
from test_presets_matrix import REDUCED
from test_zero3 import write_atomically


def _config(preset, settings, data, out_dir, tp=1, persistence=None, ds_config=None):
    cfg = build_config(preset, settings)
    cfg.data.train_path, cfg.data.eval_path = str(data["train"]), str(data["eval"])
    cfg.model.text.tokenizer_path = str(data["tokenizer"])
    cfg.data.num_workers, cfg.parallel.tensor_parallel = 0, tp
    cfg.train.output_dir, cfg.train.resume, cfg.train.progress_bar = str(out_dir), "none", False
    if persistence is not None or ds_config is not None:
        ds = json.loads((Path(__file__).parent.parent / "ds_configs" / (ds_config or f"{preset}.json")).read_text())
        if persistence is not None:
            ds["zero_optimization"]["stage3_param_persistence_threshold"] = persistence
        path = Path(out_dir) / "ds_config.json"
        write_atomically(path, ds)
        cfg.train.ds_config = str(path)
    return cfg


def _one_step(trainer):
    """The trainer's own step on its first batch."""
    from torch.utils.data import DataLoader

    trainer.engine.train()
    trainer.stream.start_epoch(0, num_workers=0)
    batch, meta = next(iter(DataLoader(trainer.stream, batch_size=None)))
    return batch, trainer.train_step(batch, meta["content_ids"])


def _worker(rank, world, preset, settings, data, out_dir, tp, persistence, ds_config):
    """One real training step; then what it held and saved, next to what the planner predicts."""
    import brivl_ds.training.trainer as trainer_module
    from brivl_ds.ds_config import load_ds_config
    from brivl_ds.memory.activations import ActivationModel, SavedForBackward
    from brivl_ds.memory.model_states import measure_model_states
    from brivl_ds.memory.planner import Planner
    from brivl_ds.training.trainer import Trainer

    real_run_moco, saved = trainer_module.run_moco, []

    def counted_run_moco(engine, batch):  # the trainer's own forward, with autograd's saves counted
        with SavedForBackward(engine.module) as counter:
            out = real_run_moco(engine, batch)
        saved.append(counter.bytes)
        return out

    trainer_module.run_moco = counted_run_moco
    trainer = Trainer(_config(preset, settings, data, out_dir, tp, persistence, ds_config))
    batch, _ = _one_step(trainer)  # ZeRO-3 also gathers its persistent parameters in this first forward
    cfg, vocab = trainer.cfg, len(trainer.tokenizer)
    activations = ActivationModel.trace(cfg, vocab, trainer.dtype, text_length=batch.input_ids.shape[1])
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({
        "measured_states": measure_model_states(trainer),
        "planned_states": Planner(cfg, load_ds_config(cfg), world, tp, vocab).states,
        "saved": saved[0], "estimate": activations.at(len(batch)).held, "batch": len(batch)}))


def _run(preset, settings, world, data, out_dir, tp=1, persistence=None, ds_config=None) -> list[dict]:
    run_distributed(_worker, world, preset, settings, data, str(out_dir), tp, persistence, ds_config)
    return [json.loads((Path(out_dir) / f"rank{rank}.json").read_text()) for rank in range(world)]


def _check_states(results):
    for rank, result in enumerate(results):
        measured, planned = result["measured_states"], result["planned_states"]
        assert measured.keys() == planned.keys()
        assert measured["master_weights"] > 0 and measured["optimizer_states"] > 0
        for part, value in measured.items():
            assert planned[part] == pytest.approx(value, rel=0.01), (rank, part, planned[part], value)
        assert sum(planned.values()) == pytest.approx(sum(measured.values()), rel=0.01)


def _check_activations(results, batch):
    for result in results:
        assert result["batch"] == batch and result["saved"] > 0
        assert result["estimate"] == pytest.approx(result["saved"], rel=0.10), result


@pytest.mark.slow
def test_base_at_real_size_on_2_ranks(shapes_data, tmp_path):
    """base as shipped (380 px B5, 12 x 768 text, D 2048, K 9600, bf16, AdamW, frozen lower layers), random init,
    batch 3: model states and activations."""
    results = _run("base", ["data.batch_size=3"], 2, shapes_data, tmp_path)
    _check_states(results)
    assert results[0]["measured_states"]["ema_fp32"] > 0  # bf16: the EMA keeps an fp32 copy
    _check_activations(results, 3)


@pytest.mark.slow
def test_tiny_on_1_rank(shapes_data, tmp_path):
    """tiny as shipped (fp32, AdamW: no EMA copy), batch 3: model states and activations."""
    results = _run("tiny", ["data.batch_size=3"], 1, shapes_data, tmp_path)
    _check_states(results)
    assert results[0]["measured_states"]["ema_fp32"] == 0
    _check_activations(results, 3)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["vit_small_patch16_224", "eva02_small_patch14_224"])
def test_10b_model_states_at_tp2_on_4_ranks(backbone, shapes_data, tmp_path):
    """The reduced 10b variant (QK-norm and LayerScale, everything trainable, adamw_half, bf16) at TP = 2 x DP = 2,
    built under zero.Init and split, with a low persistence threshold so partitioned and persistent parameters
    both count: with a ViT (ViT-S/16, 6 heads, at depth 2: the matrix's ViT-Ti/16 has 3 heads, which do not split
    over TP = 2), and with an EVA-02 (RoPE, GluMlp, q / v bias vectors split by heads). (Its checkpointed towers
    keep block inputs that autograd's saved-tensor hooks do not see: activations are checked above, on the
    uncheckpointed presets.)"""
    settings = REDUCED["10b"] + [f"model.image.backbone={backbone}", "model.image.backbone_depth=2"]
    if backbone.startswith("eva"):
        settings.append("model.image.image_size=56")  # patch 14
    _check_states(_run("10b", settings, 4, shapes_data, tmp_path, tp=2, persistence=1000))


def test_plan_command_finds_the_largest_batch_that_fits(capsys):
    """The command as users run it (the tiny preset, so it is quick), and its answer checked: the plan at the
    largest batch fits, one more sample does not; the printed table says so."""
    from brivl_ds.ds_config import load_ds_config
    from brivl_ds.memory.planner import GiB, Planner, format_plan
    from brivl_ds.plan import main, parse_bytes

    assert parse_bytes("80GiB") == 80 * GiB and parse_bytes("40GB") == 40 * 10 ** 9
    main(["--preset", "tiny", "--gpus", "2", "--gpu-memory", "1GiB", "--json"])
    plan = json.loads(capsys.readouterr().out)
    largest = plan["largest_batch"]
    assert plan["batch"] == 16 and plan["dp"] == 2 and largest > 16
    cfg = build_config("tiny")
    planner = Planner(cfg, load_ds_config(cfg), 2, 1)
    at_largest = planner.plan(largest, GiB, 0.10)
    assert at_largest.fits and not planner.plan(largest + 1, GiB, 0.10).fits
    text = format_plan(at_largest, largest, None)
    assert f"largest batch per GPU that fits: {largest}" in text and ": fits" in text


@pytest.mark.slow
def test_deepspeed_bf16_optimizer_states_recipe_on_2_ranks(shapes_data, tmp_path):
    """The alternative to adamw_half: DeepSpeed's bf16 master weights and bf16 optimizer states
    (ds_configs/paper-1b-bf16-states.json) with torch AdamW, on the reduced paper-1b."""
    results = _run("paper-1b", REDUCED["paper-1b"] + ["optim.name=adamw"], 2, shapes_data, tmp_path,
                   ds_config="paper-1b-bf16-states.json")
    _check_states(results)
    states = results[0]["measured_states"]
    assert states["master_weights"] == states["gradients"] == states["optimizer_states"] // 2  # all bf16
