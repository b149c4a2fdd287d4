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
    owned = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,  # explicit: DeepSpeed 0.19.8 clips at 1.0 when absent
        "zero_allow_untested_optimizer": True,  # our AdamW with weight-decay groups is a client optimizer
    }
    for key, value in owned.items():
        if key in ds and ds[key] != value:
            raise ValueError(f"{path} sets {key}={ds[key]!r}, but this comes from the trainer config "
                             f"(value {value!r}); remove it from the JSON and use --set instead")
    for key in ("train_batch_size", "optimizer", "scheduler"):
        if key in ds:
            raise ValueError(f"{path} sets {key!r}; the trainer owns it (see README: tuning ZeRO configs)")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage != 3:
        raise ValueError(f"{path}: brivl-ds partitions both towers and their momentum copies with ZeRO stage 3 "
                         f"(got stage {stage})")
    ds.update(owned)
    return ds
