"""Everything a training run is built from, from a validated Config: process groups, data, the partitioned model with
its parallelism applied, the DeepSpeed engine, the momentum updater and the key queues."""
from __future__ import annotations

import dataclasses
import functools
import shutil
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch

from brivl_ds.config import Config
from brivl_ds.construction.towers import build_brivl_moco
from brivl_ds.construction.zero_init import partitioned_construction
from brivl_ds.data.build import build_collator, build_train_stream
from brivl_ds.data.dataset import Collator
from brivl_ds.data.stream import ShardStream
from brivl_ds.data.synthetic import (check_variant, default_synthetic_dir, ensure_shapes_dataset,
                                     shapes_dataset_paths)
from brivl_ds.data.tokenizer import load_tokenizer
from brivl_ds.distributed import DistInfo, barrier, init_distributed
from brivl_ds.ds_config import load_ds_config
from brivl_ds.evaluation.zeroshot import make_shapes_benchmark
from brivl_ds.moco.model import BriVLMoCo
from brivl_ds.moco.momentum import MomentumUpdater
from brivl_ds.moco.queue import KeyQueue
from brivl_ds.parallel.activation_checkpointing import apply_activation_checkpointing
from brivl_ds.parallel.groups import DeepSpeedMPU, ParallelGroups, init_tensor_parallel
from brivl_ds.training.optim import build_optimizer, build_scheduler


@dataclass
class TrainingSetup:
    cfg: Config  # resolved: the built-in dataset's paths filled in
    info: DistInfo
    groups: ParallelGroups
    tokenizer: object
    collate: Collator
    stream: ShardStream
    engine: deepspeed.DeepSpeedEngine
    scheduler: object
    dtype: torch.dtype  # the engine's compute dtype
    momentum: MomentumUpdater
    image_queue: KeyQueue
    text_queue: KeyQueue
    total_steps: int

    @property
    def model(self) -> BriVLMoCo:
        return self.engine.module


def with_builtin_data(cfg: Config, info: DistInfo) -> Config:
    """`cfg`, or a copy of it whose data paths point at the built-in dataset (`data.synthetic_variant`) when no
    shards are given (generated once, by rank 0; the others wait), with its zero-shot benchmark unless
    `data.zeroshot_path` names another set."""
    if cfg.data.train_path is not None:
        return cfg
    # checked on every rank (rank 0 alone refusing would leave the others waiting at the barrier)
    synthetic_dir = cfg.data.synthetic_dir or default_synthetic_dir(cfg.data.synthetic_variant)
    check_variant(cfg.data.synthetic_variant)
    zeroshot = cfg.data.zeroshot_path is None
    if info.is_main:
        ensure_shapes_dataset(synthetic_dir, cfg.data.synthetic_train, cfg.data.synthetic_eval,
                              cfg.model.image.image_size, seed=0, variant=cfg.data.synthetic_variant)
        if zeroshot:
            ensure_shapes_benchmark(synthetic_dir)
    barrier()
    paths = shapes_dataset_paths(synthetic_dir)
    text = cfg.model.text
    # A pretrained text encoder brings its own tokenizer (its vocabulary indexes the embedding)
    tokenizer = text.tokenizer_path or text.pretrained_path or str(paths["tokenizer"])
    data = dataclasses.replace(cfg.data, train_path=str(paths["train"]), eval_path=str(paths["eval"]),
                               synthetic_dir=str(synthetic_dir))
    if zeroshot:
        bench = shapes_benchmark_path(synthetic_dir)
        data = dataclasses.replace(data, zeroshot_path=str(bench), zeroshot_classes=str(bench / "classes.txt"))
    return dataclasses.replace(
        cfg, data=data, model=dataclasses.replace(cfg.model, text=dataclasses.replace(text, tokenizer_path=tokenizer)))


def shapes_benchmark_path(synthetic_dir: str | Path) -> Path:
    return Path(synthetic_dir) / "zeroshot"


def ensure_shapes_benchmark(synthetic_dir: str | Path) -> Path:
    """The built-in dataset's zero-shot benchmark, <synthetic_dir>/zeroshot (<background colour>/<id>.jpg and
    classes.txt: its held-out split labelled by background, by make_shapes_benchmark): made once, again when the
    dataset was generated anew (its DONE.json is copied in), and published by a rename, never half-written."""
    out, done = shapes_benchmark_path(synthetic_dir), Path(synthetic_dir) / "DONE.json"
    spec = done.read_text()
    if (out / "DONE.json").exists() and (out / "DONE.json").read_text() == spec:
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    make_shapes_benchmark(shapes_dataset_paths(synthetic_dir)["eval"], partial)
    (partial / "DONE.json").write_text(spec)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def build_training(cfg: Config) -> TrainingSetup:
    cfg.validate()
    info = init_distributed(cfg.train.threads, cfg.resilience.collective_timeout_s)
    # Tensor-parallel and data-parallel groups (TP innermost); TP = 1 leaves every rank data-parallel.
    groups = init_tensor_parallel(cfg.parallel.tensor_parallel)
    deepspeed.runtime.utils.set_random_seed(cfg.train.seed)  # the same on every rank: TP ranks build one model
    cfg = with_builtin_data(cfg, info)

    tokenizer = load_tokenizer(cfg.model.text.tokenizer_path or cfg.model.text.pretrained_path)
    collate = build_collator(cfg, tokenizer)
    # Data by data-parallel rank: the TP ranks of one group read the same samples.
    stream = build_train_stream(cfg, collate, groups.dp_rank, groups.dp)
    steps_per_epoch = stream.batches_per_epoch // cfg.train.grad_accum_steps
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else steps_per_epoch * cfg.train.epochs

    ds_config = load_ds_config(cfg)
    # Partitioned construction: every module's parameters are split over the data-parallel group as soon as it
    # is built, so no rank ever holds a whole tower (online or momentum).
    construct = functools.partial(partitioned_construction, ds_config, groups.dp_group)
    model = build_brivl_moco(cfg.model, cfg.moco, len(tokenizer), construct)
    if groups.tp > 1:  # applied to the built model: the towers know nothing of it
        from brivl_ds.parallel.rng import init_tensor_parallel_rng
        from brivl_ds.parallel.tensor_parallel import parallelize

        parallelize(model, groups.tp, groups.tp_rank, groups.tp_group, cfg.parallel.vocab_parallel, construct)
        # attention dropout on a rank's own heads draws from a per-TP-rank stream; the rest from the shared one
        init_tensor_parallel_rng(cfg.train.seed, groups.tp_rank, info.device)
    apply_activation_checkpointing(model.online, cfg.model)  # the momentum forward keeps no graph
    optimizer = build_optimizer(model, cfg.optim, groups.dp_rank)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    check_batchnorm_precision(model, cfg, ds_config)
    # With TP, DeepSpeed needs the groups: ZeRO-3 then partitions each TP shard over its DP group only, and the
    # gradient norm counts TP-split parameters once per shard.
    mpu = DeepSpeedMPU(groups) if groups.tp > 1 else None
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config, mpu=mpu)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else (
        torch.float16 if engine.fp16_enabled() else torch.float32)
    momentum = MomentumUpdater(engine.module.parameter_pairs(), cfg.moco.momentum_impl)
    momentum.copy_online_to_momentum()
    # Keys are stored in the compute dtype: the loss kernel reads the whole queue every step (half the bytes in
    # bf16) and accumulates in fp32.
    queues = [KeyQueue(cfg.moco.queue_size, cfg.model.embed_dim, dtype, info.device) for _ in range(2)]
    return TrainingSetup(cfg, info, groups, tokenizer, collate, stream, engine, scheduler, dtype, momentum,
                         *queues, total_steps)


def check_batchnorm_precision(model: BriVLMoCo, cfg: Config, ds_config: dict) -> None:
    """Train-mode BatchNorm (batch statistics) keeps fp32 running statistics next to the engine's bf16/fp16 gains,
    which torch refuses mid-step; say so before any step runs."""
    low_precision = ds_config.get("bf16", {}).get("enabled") or ds_config.get("fp16", {}).get("enabled")
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.online.image.modules())
    if low_precision and has_bn and not cfg.model.image.frozen_bn_stats:
        raise ValueError("model.image.frozen_bn_stats=false (BatchNorm with batch statistics) runs in fp32 only; "
                         "use a DeepSpeed config with bf16 disabled or keep frozen_bn_stats=true")


def run_summary(setup: TrainingSetup) -> str:
    """One line on what runs where: the world, the device, the precision and the path each kernel takes."""
    import brivl_kernels

    cfg, info, groups = setup.cfg, setup.info, setup.groups
    kernels = {"loss": brivl_kernels.path_taken("queue_contrastive_loss", cfg.moco.loss_impl, info.device),
               "momentum": brivl_kernels.path_taken("momentum_update_", cfg.moco.momentum_impl, info.device)}
    if cfg.optim.name == "adamw_half":
        kernels["adamw_half"] = brivl_kernels.path_taken("AdamWHalfStates", "auto", info.device)
    return (f"{cfg.preset}: {info.world} rank{'s' * (info.world > 1)} ({groups.dp} data-parallel x {groups.tp} "
            f"tensor-parallel) on {info.device.type}, {str(setup.dtype).removeprefix('torch.')}, kernels: "
            + ", ".join(f"{name} {path}" for name, path in kernels.items()))
