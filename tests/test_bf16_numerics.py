"""bf16 numerics against fp32 references, through the real DeepSpeed ZeRO-3 trainer on 2 gloo ranks.

One spawn trains the reduced paper-1b recipe (TF-EfficientNet with frozen-statistics BatchNorm, frozen lower layers
in both towers, dropout, tau 0.05) from the same weights and batches three times:
  fp32             bf16 off, torch AdamW                 the reference
  fp32_adamw_half  bf16 off, adamw_half                  only the optimizer's states differ from the reference
  bf16             bf16 on (fp32 master), adamw_half      the shipped recipe
Step 1 meets empty queues (loss 0, no gradient: the update is weight decay only); steps 2 and 3 are real steps.

Units: u = 2^-8, bf16's unit roundoff (8 significant bits): every bf16 rounding is off by at most u relative.
"""
import json
import math
import os
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_distributed

WORLD, STEPS, BF16_STEPS = 2, 5, 3
U = 2.0 ** -8
RECIPES = {"fp32": (False, "adamw", STEPS), "fp32_adamw_half": (False, "adamw_half", STEPS),
           "bf16": (True, "adamw_half", BF16_STEPS)}
# paper-1b's layer types at test sizes: B7 -> B0 at 64 px, a 2-layer text encoder of which only the top one
# trains (embeddings and layer 0 frozen), the top 2 backbone groups trainable; dropout, tau, m, weight decay
# and betas stay the preset's.
SIZES = ["model.image.backbone=tf_efficientnet_b0", "model.image.image_size=64", "model.image.max_boxes=4",
         "model.image.width=32", "model.image.num_layers=2", "model.image.num_heads=2", "model.embed_dim=32",
         "model.text.num_layers=2", "model.text.hidden_size=64", "model.text.num_heads=4",
         "model.text.intermediate_size=128", "model.text.sa_layers=2", "model.text.sa_heads=4",
         "model.text.max_length=16", "model.text.trainable_top_layers=1", "model.image.trainable_backbone_groups=2",
         "moco.queue_size=16", "data.batch_size=4", "data.num_workers=0",
         "moco.loss_impl=reference", "moco.momentum_impl=reference",  # the kernels have their own tests
         "optim.lr=2e-3", "optim.warmup_steps=1", f"train.max_steps={STEPS}", "train.resume=none",
         "train.progress_bar=false", "train.seed=7"]


def make_config(data, out_dir: Path, bf16: bool, optimizer: str):
    from brivl_ds.config import build_config

    cfg = build_config("paper-1b", SIZES + [
        f"optim.name={optimizer}", f"train.output_dir={out_dir}", f"data.train_path={data['train']}",
        f"data.eval_path={data['eval']}", f"model.text.tokenizer_path={data['tokenizer']}"])
    ds = json.loads((REPO / "ds_configs" / "paper-1b.json").read_text())  # as shipped, bf16 on or off
    ds["bf16"] = {"enabled": bf16}
    # at these sizes the shipped thresholds would keep every parameter whole: partition most of them
    ds["zero_optimization"].update(stage3_param_persistence_threshold=100, reduce_bucket_size=20000,
                                   stage3_prefetch_bucket_size=20000)
    path = out_dir / "ds.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"ds.json.{os.getpid()}")  # both ranks write it: each renames its own complete copy
    tmp.write_text(json.dumps(ds))
    os.replace(tmp, path)
    cfg.train.ds_config = str(path)
    return cfg


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def load_weights(trainer, weights: dict, rank: int, world: int) -> None:
    """Give a built engine these full fp32 weights: its parameters (bf16 in a bf16 engine: the rounding), the
    optimizer's fp32 master partitions, and the EMA's fp32 copies. Needed because zero.Init draws a random init
    directly in the run's precision, so the same seed gives other weights in bf16 (README, partitioned build)."""
    import deepspeed
    from deepspeed.utils import safe_set_local_fp32_param

    params = dict(trainer.model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
        for name, p in params.items():
            p.data.copy_(weights[name])
    for name, p in params.items():
        if p.requires_grad:  # this rank's slice of the zero-padded flat parameter
            part = p.ds_tensor.numel()
            padded = torch.zeros(part * world)
            padded[:p.ds_numel] = weights[name].flatten()
            safe_set_local_fp32_param(p, padded[rank * part:(rank + 1) * part])
    trainer.momentum.copy_online_to_momentum()


def update_errors(got: dict, ref: dict, lr: float) -> dict:
    """Parameter updates (after - before, fp32 masters) against the reference's: over all trainable parameters
    together, and per tensor for the tensors the reference moved by more than 1 % of an Adam step (lr) in RMS (a
    tensor whose true gradient is zero, e.g. a BERT key bias, only moves by rounding noise). In float64: a
    float32 cosine of 3 M elements is off by 3e-4."""
    def compare(g, r):
        g, r = g.double().flatten(), r.double().flatten()
        return {"rel": ((g - r).norm() / r.norm()).item(), "ratio": (g.norm() / r.norm()).item(),
                "cos": torch.nn.functional.cosine_similarity(g, r, 0).item()}

    moved = [n for n, r in ref.items() if r.norm() > 0.01 * lr * math.sqrt(r.numel())]
    return {**compare(torch.cat([got[n].flatten() for n in ref]), torch.cat([ref[n].flatten() for n in ref])),
            "tensors": {n: compare(got[n], ref[n]) for n in moved}}


def _worker(rank, world, data, out_dir):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    from torch.utils.data import DataLoader

    from brivl_ds.training.trainer import Trainer

    runs, start = {}, None
    for recipe, (bf16, optimizer, steps) in RECIPES.items():
        trainer = Trainer(make_config(data, Path(out_dir) / recipe, bf16, optimizer))
        trainer.engine.train()
        model, engine = trainer.model, trainer.engine
        generator = torch.Generator().manual_seed(0)
        for bn in batchnorms(model):  # non-trivial statistics, as a pretrained backbone has (online and momentum)
            bn.running_mean.uniform_(-0.5, 0.5, generator=generator)
            bn.running_var.uniform_(0.5, 2.0, generator=generator)
        stats = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in batchnorms(model)]
        params = dict(model.named_parameters())
        if start is None:
            with deepspeed.zero.GatheredParameters(list(params.values())):
                start = {n: p.data.detach().clone() for n, p in params.items()}
        else:
            load_weights(trainer, start, rank, world)
        trainable = [n for n, p in params.items() if p.requires_grad]
        frozen = [n for n, p in params.items() if not p.requires_grad and n.startswith("online.")]
        assert any(n.startswith("online.image.backbone") for n in frozen)
        assert any(n.startswith("online.text.encoder") for n in frozen)
        before = {n: safe_get_full_fp32_param(params[n]).clone() for n in trainable}
        with deepspeed.zero.GatheredParameters([params[n] for n in frozen]):
            frozen_before = {n: params[n].data.clone() for n in frozen}
        embeddings = []
        hook = model.online.register_forward_hook(
            lambda module, inputs, out: embeddings.append([e.detach().float().clone() for e in out]))
        torch.manual_seed(11)  # the same dropout masks in every run (construction drew differently in bf16)
        trainer.stream.start_epoch(0, num_workers=0)
        loader = DataLoader(trainer.stream, batch_size=None)
        losses, grad_norms, updates, lrs = [], [], [], []
        for _, (batch, meta) in zip(range(steps), loader):
            lrs.append(trainer.scheduler.get_last_lr()[0])
            losses.append(trainer.train_step(batch, meta["content_ids"])["loss"])
            grad_norms.append(float(engine.get_global_grad_norm()))
            updates.append({n: safe_get_full_fp32_param(params[n]) - before[n] for n in trainable})
        hook.remove()
        with deepspeed.zero.GatheredParameters([params[n] for n in frozen]):
            frozen_moved = [n for n in frozen if not torch.equal(params[n].data, frozen_before[n])]
        optimizer_states = {p.dtype for s in engine.optimizer.optimizer.state.values() for p in s.values()
                            if torch.is_tensor(p) and p.numel() > 1}
        runs[recipe] = {
            "losses": losses, "grad_norms": grad_norms, "embeddings": embeddings, "updates": updates, "lrs": lrs,
            "optimizer": type(engine.optimizer.optimizer).__name__,
            "optimizer_states": sorted(map(str, optimizer_states)),
            "param_dtype": str(params[trainable[0]].dtype), "frozen_moved": frozen_moved,
            # stored values, never computed: the statistics must be the fp32 tensors set above, bit for bit
            "bn_stats_kept": all(bn.running_mean.dtype == bn.running_var.dtype == torch.float32
                                 and torch.equal(bn.running_mean, m) and torch.equal(bn.running_var, v)
                                 for bn, (m, v) in zip(batchnorms(model), stats)),
            "start_kept": all(torch.equal(before[n], start[n]) for n in trainable),
        }
        del trainer, model, engine, params

    if rank == 0:
        ref = runs["fp32"]
        summary = {}
        for recipe in ("fp32_adamw_half", "bf16"):
            run = runs[recipe]
            summary[recipe] = {
                **{k: run[k] for k in ("losses", "grad_norms", "lrs", "optimizer", "optimizer_states", "param_dtype",
                                       "frozen_moved", "bn_stats_kept", "start_kept")},
                "ref_losses": ref["losses"][:len(run["losses"])], "ref_grad_norms": ref["grad_norms"],
                "ref_lrs": ref["lrs"], "ref_frozen_moved": ref["frozen_moved"],
                "ref_bn_stats_kept": ref["bn_stats_kept"],
                # per step, the largest distance of an embedding (a row: a unit vector) from the reference's
                "embedding_errors": [max((g - r).norm(dim=-1).max().item() for g, r in zip(got, want))
                                     for got, want in zip(run["embeddings"], ref["embeddings"])],
                "updates": [update_errors(got, want, ref["lrs"][0])
                            for got, want in zip(run["updates"], ref["updates"])],
            }
        (Path(out_dir) / "summary.json").write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def trained(shapes_data, tmp_path_factory) -> dict:
    out_dir = tmp_path_factory.mktemp("bf16_numerics")
    run_distributed(_worker, WORLD, shapes_data, str(out_dir))
    summary = json.loads((out_dir / "summary.json").read_text())
    print(json.dumps({recipe: {k: v for k, v in run.items() if k != "updates"} for recipe, run in summary.items()}))
    return summary


@pytest.mark.slow
def test_bf16_zero3_steps_match_fp32_within_bf16_rounding(trained):
    """The bf16 + adamw_half recipe against the fp32 + AdamW run of the same 3 steps (u = 2^-8).

    - Embeddings at steps 1-2 (the same weights: step 1 applies only weight decay, identically) within 8 u of the
      reference's, each row (unit vectors). Each passes ~30 sequential bf16 stages (EfficientNet-B0's blocks,
      RoIAlign, the box and token attention layers, BERT, the heads), each rounding once by <= u; independent
      roundings add up like a random walk, ~sqrt(30) u = 5.5 u. Measured <= 2 u.
    - The update after each step. AdamW's first real step (step 2) is ~0.74 lr * sign(gradient) per element, so
      an element whose gradient is within bf16 noise of 0 moves the other way (~0.1-0.2 % of the elements), and
      step 3 starts from weights that differ by those elements. Norms do not see a flip (each element
      contributes lr^2 either way): the update's norm within 16 u (6.25 %) of the reference's over all trainable
      parameters, within 2^-3 per tensor (measured <= 1.0 % and 4.3 %); directions do: cosine >= 1 - 16 u over
      all, >= 0.5 per tensor (measured >= 0.987 and 0.88).
    - Loss and gradient norm at steps 2-3 within 16 u relative: tau = 0.05 magnifies the similarities' errors 20x
      in the logits, and step 3 carries the flipped elements (measured <= 0.62 % and 0.57 %).
    Fails: a parameter group the bf16 step leaves out (norm ratio 0), a loss scale or gradient averaging off by 2x
    (the gradient norm), an LR schedule off by 20 % (the norm ratios: seen once, by mistake), frozen layers moving,
    BN statistics not fp32 or not exactly as loaded (checked where they live, bit for bit: a bf16 copy would be
    off by only 2^-9, far inside any numerical tolerance)."""
    run = trained["bf16"]
    assert run["optimizer"] == "AdamWHalfStates" and run["optimizer_states"] == ["torch.bfloat16"]
    assert run["param_dtype"] == "torch.bfloat16" and run["start_kept"]
    assert run["bn_stats_kept"] and run["ref_bn_stats_kept"], "BN statistics not fp32, or not as set"
    assert run["frozen_moved"] == [] and run["ref_frozen_moved"] == [], "frozen layers moved"
    assert run["losses"][0] == run["ref_losses"][0] == 0.0  # the queues are empty at step 1 ...
    assert run["grad_norms"][0] == run["ref_grad_norms"][0] == 0.0  # ... so only weight decay moves anything
    assert max(run["embedding_errors"][:2]) <= 8 * U, run["embedding_errors"]
    for step in range(1, BF16_STEPS):
        for key in ("losses", "grad_norms"):
            got, want = run[key][step], run[f"ref_{key}"][step]
            assert want > 0 and abs(got - want) <= 16 * U * want, (key, step + 1, got, want)
    for step, update in enumerate(run["updates"], 1):
        assert abs(update["ratio"] - 1) <= 16 * U and update["cos"] >= 1 - 16 * U, (step, update)
        assert step == 1 or len(update["tensors"]) > 100  # step 1 moves only by weight decay
        for name, t in update["tensors"].items():
            assert abs(t["ratio"] - 1) <= 2 ** -3 and t["cos"] >= 0.5, (step, name, t)


@pytest.mark.slow
def test_adamw_half_through_zero3_tracks_fp32_adamw(trained):
    """adamw_half as DeepSpeed's ZeRO-3 client optimizer (on the flat fp32 partitions) against torch AdamW, both
    with fp32 weights, so that only the optimizer's states differ: 5 steps from the same start and batches.

    Steps 1 (weight decay only) and 2 (the stored moments were zero; a step uses its own fp32 moments) equal fp32
    AdamW up to fp32 rounding (measured <= 5e-6 per tensor). From step 3 the moments come from bf16
    storage, each within one bf16 ulp (<= 2 u relative), stochastically rounded so that the errors are unbiased
    and independent: the update of all trainable parameters together within u (0.39 %) of AdamW's (measured
    <= 0.12 %); per tensor within 4 u (a tensor with one element, log tau, sees its own roundings only: <= 1.5 x
    2 u per step while its gradient keeps its sign; measured <= 0.17 %). The loss within the README's 0.1 % at
    every step (that bound comes from 1500 steps in kernels/RESULTS.md; measured here 1e-6). Fails: weight decay
    or bias correction missing or wrong, moments not kept between steps, a tensor not updated."""
    run = trained["fp32_adamw_half"]
    assert run["optimizer"] == "AdamWHalfStates" and run["optimizer_states"] == ["torch.bfloat16"]
    assert run["param_dtype"] == "torch.float32" and run["start_kept"]
    assert run["lrs"] == run["ref_lrs"] and len(set(run["lrs"])) > 2  # the same (decaying) schedule
    for step, (got, want) in enumerate(zip(run["losses"], run["ref_losses"]), 1):
        assert abs(got - want) <= 1e-3 * want, (step, got, want)
    for step, update in enumerate(run["updates"], 1):
        assert update["rel"] <= U, (step, update["rel"])
        assert step == 1 or len(update["tensors"]) > 100  # step 1 moves only by weight decay
        for name, t in update["tensors"].items():
            assert t["rel"] <= 4 * U, (step, name, t)
