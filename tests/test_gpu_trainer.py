"""GPU only (`pytest -m gpu`): the trainer on CUDA as users run it, not only the kernels. Skipped without CUDA.

Every other launch in the suite runs DeepSpeed's CPU accelerator with gloo and the plain-PyTorch references of the
kernels; these run DeepSpeed's CUDA accelerator with NCCL, bf16, and the fused Triton loss and EMA (what `auto`
picks on CUDA), with the `paper-1b` recipe shrunk in sizes only (tests/test_presets_matrix.py's variant: TF-
EfficientNet with frozen BatchNorm statistics, a pretrained BERT, frozen lower layers, `adamw_half`).
"""
import json
import math

import pytest
import torch

from conftest import deepspeed_train, run_distributed
from test_presets_matrix import N, pretrained, settings_for  # noqa: F401  (pretrained: a fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = {"DS_ACCELERATOR": "cuda"}
FUSED = ["moco.loss_impl=triton", "moco.momentum_impl=triton"]  # what `auto` picks on CUDA, made explicit


def test_paper_recipe_trains_on_one_gpu_through_the_launcher(shapes_data, pretrained, tmp_path):  # noqa: F811
    """`deepspeed --num_gpus 1` on CUDA: ZeRO-3, bf16, fused kernels; trains, checkpoints, evaluates, and a resume
    from step N follows the uninterrupted run (within bf16 noise: GPU reductions need not be bitwise repeatable)."""
    full, resumed = tmp_path / "run", tmp_path / "resumed"
    log = deepspeed_train("paper-1b", settings_for("paper-1b", shapes_data, pretrained, full) + FUSED, world=1,
                          env=CUDA)
    assert ("paper-1b: 1 rank (1 data-parallel x 1 tensor-parallel) on cuda, bfloat16, kernels: loss triton, "
            "momentum triton, adamw_half triton") in log
    assert f"eval @ step {2 * N} on 48 held-out pairs" in log
    run = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in run] == list(range(1, 2 * N + 1)) and run[0]["loss"] == 0.0
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in run)
    assert len({r["loss"] for r in run[1:]}) > 1
    optim = torch.load(full / "checkpoints" / f"step{N}" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       map_location="cpu", weights_only=False)["optimizer_state_dict"]["optimizer_state_dict"]
    assert {s["exp_avg"].dtype for s in optim["state"].values()} == {torch.bfloat16}  # adamw_half on the GPU

    deepspeed_train("paper-1b", settings_for("paper-1b", shapes_data, pretrained, resumed) + FUSED +
                    [f"train.resume={full}/checkpoints/step{N}"], world=1, env=CUDA)
    again = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == list(range(N + 1, 2 * N + 1))
    torch.testing.assert_close(torch.tensor([r["loss"] for r in again]), torch.tensor([r["loss"] for r in run[N:]]),
                               rtol=2e-2, atol=1e-3)


def _fused_equals_eager_worker(rank, world, settings, out_file):
    from deepspeed.utils import safe_get_local_fp32_param
    from torch.utils.data import DataLoader

    from brivl_ds.config import build_config
    from brivl_ds.moco.loss import moco_loss
    from brivl_ds.moco.model import run_moco
    from brivl_ds.training.trainer import Trainer

    trainer = Trainer(build_config("paper-1b", settings))
    assert trainer.info.device.type == "cuda" and trainer.dtype == torch.bfloat16
    trainer.engine.train()
    trainer.stream.start_epoch(0, num_workers=0)
    loader = iter(DataLoader(trainer.stream, batch_size=None))
    ema, m, worst = trainer.momentum, trainer.cfg.moco.momentum, {"loss": 0.0, "grad": 0.0, "ema": 0.0}
    for step in range(4):
        batch, meta = next(loader)
        if step >= 1:  # the queues hold keys from step 2 on: compare the fused loss with the eager one on them
            with torch.no_grad():
                out = run_moco(trainer.engine, batch.to(trainer.info.device, dtype=trainer.dtype))
            results = {}
            for impl in ("triton", "reference"):
                image_q = out.image_query.detach().requires_grad_()
                text_q = out.text_query.detach().requires_grad_()
                tau = out.tau.detach().requires_grad_()
                parts = out.__class__(image_q, text_q, out.image_key, out.text_key, tau)
                loss, _ = moco_loss(parts, trainer.image_queue, trainer.text_queue, impl)
                results[impl] = (loss.detach().float(), *torch.autograd.grad(loss, (image_q, text_q, tau)))
            fused, eager = results["triton"], results["reference"]
            worst["loss"] = max(worst["loss"], abs(fused[0] - eager[0]).item() / eager[0].item())
            worst["grad"] = max(worst["grad"], max(((f.float() - e.float()).norm() / e.float().norm()).item()
                                                   for f, e in zip(fused[1:], eager[1:])))
        before = [t.clone() for t in ema.master]
        trainer.train_step(batch, meta["content_ids"])
        for (online, _), prev, now, low in zip(ema.pairs, before, ema.master, ema.lowp):
            theta = safe_get_local_fp32_param(online).view(-1)[: now.numel()].double()
            expected = m * prev.double() + (1 - m) * theta
            error = ((now.double() - expected).abs() / expected.abs().clamp(min=1)).max().item()
            worst["ema"] = max(worst["ema"], error)
            assert torch.equal(low, now.bfloat16())  # the bf16 shard the forward uses is the rounded fp32 EMA
    torch.save(worst, out_file)


def test_fused_loss_and_ema_equal_the_eager_path_inside_real_steps(shapes_data, pretrained, tmp_path):  # noqa: F811
    """One CUDA rank, the trainer's own engine and batches: on each step's real embeddings and queues, the fused
    Triton loss and its gradients (queries and tau) equal the eager reference within the kernels' bf16 tolerance;
    the fused EMA of every momentum shard equals the float64 formula within fp32 rounding."""
    settings = settings_for("paper-1b", shapes_data, pretrained, tmp_path / "run") + FUSED
    run_distributed(_fused_equals_eager_worker, 1, settings, str(tmp_path / "worst.pt"), env=CUDA)
    worst = torch.load(tmp_path / "worst.pt")
    assert worst["loss"] < 1e-3 and worst["grad"] < 1e-2, worst  # fp32 accumulation of bf16 inputs, both paths
    assert worst["ema"] < 1e-6, worst  # relative to max(1, |value|): a few fp32 roundings
