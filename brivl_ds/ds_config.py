"""DeepSpeed JSON configs: the JSON owns ZeRO and precision tuning; batch size, accumulation and clipping come
from the typed Config (one source of truth), and the optimizer and scheduler are built by the trainer."""
from __future__ import annotations

import json
from pathlib import Path

from brivl_ds.config import Config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


def default_ds_config_path(preset: str) -> Path:
    return CONFIG_DIR / f"{preset}.json"


def load_ds_config(cfg: Config) -> dict:
    path = Path(cfg.train.ds_config) if cfg.train.ds_config else default_ds_config_path(cfg.preset)
    if not path.exists():
        raise FileNotFoundError(f"DeepSpeed config {path} not found (set train.ds_config)")
    ds = json.loads(path.read_text())
    owned = {  # DeepSpeed key: (value, the trainer setting it comes from)
        "train_micro_batch_size_per_gpu": (cfg.data.batch_size, "data.batch_size"),
        "gradient_accumulation_steps": (cfg.train.grad_accum_steps, "train.grad_accum_steps"),
        # explicit: DeepSpeed 0.19.8 clips at 1.0 when absent
        "gradient_clipping": (cfg.optim.grad_clip, "optim.grad_clip"),
        # our AdamW with weight-decay groups is a client optimizer
        "zero_allow_untested_optimizer": (True, None),
    }
    for key, (value, setting) in owned.items():
        if key in ds and ds[key] != value:
            instead = f"use --set {setting}=..." if setting else "it is always on"
            raise ValueError(f"{path} sets {key}={ds[key]!r}, but this comes from the trainer config "
                             f"(value {value!r}); remove it from the JSON and {instead}")
    for key in ("train_batch_size", "optimizer", "scheduler"):
        if key in ds:
            raise ValueError(f"{path} sets {key!r}; the trainer owns it (see README: tuning ZeRO configs)")
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage != 3:
        raise ValueError(f"{path}: brivl-ds partitions both towers and their momentum copies with ZeRO stage 3 "
                         f"(got stage {stage})")
    offloaded = [key for key in ("offload_optimizer", "offload_param")
                 if zero.get(key) and zero[key].get("device", "none") != "none"]
    if offloaded:
        # The EMA reads each rank's fp32 master partition and writes the momentum partition on the device, in one
        # fused kernel (brivl_ds/moco/momentum.py); offloaded, those live in host memory, and DeepSpeed's offload
        # also wants its own CPU Adam in place of the trainer's optimizers (AdamW groups, adamw_half).
        raise ValueError(f"{path} sets zero_optimization.{offloaded[0]}: ZeRO-Offload is not supported by brivl-ds "
                         "(the momentum EMA and the client optimizers work on device partitions). To fit a model, "
                         "use more data-parallel ranks (ZeRO-3 divides the model states by them), "
                         "--set optim.name=adamw_half (12 bytes per parameter), activation checkpointing, or "
                         "tensor parallelism; `python -m brivl_ds.plan` shows what each GPU holds")
    ds.update({key: value for key, (value, _) in owned.items()})
    return ds
