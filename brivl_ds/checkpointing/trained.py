"""A trained model out of a run's checkpoint, in one process with no process group (for export and evaluation)."""
from __future__ import annotations

from pathlib import Path

import torch

from brivl_ds.checkpointing.consolidate import consolidate
from brivl_ds.checkpointing.files import latest_tag, rank_files
from brivl_ds.checkpointing.state import saved_config
from brivl_ds.config import Config
from brivl_ds.data.tokenizer import load_tokenizer
from brivl_ds.models.brivl import BriVL
from brivl_ds.moco.model import BriVLMoCo


def checkpoint_config(folder: Path) -> Config:
    """The config of the run that wrote checkpoint `folder` (one tag)."""
    states = rank_files(folder, "model")
    if not states:
        raise FileNotFoundError(f"no DeepSpeed model states in {folder}")
    return Config.from_dict(saved_config(torch.load(states[0].path, map_location="cpu", weights_only=False)))


def load_moco_model(checkpoint_dir: Path, tag: str | None = None) -> tuple[BriVLMoCo, object, Config]:
    """The trained BriVLMoCo (online towers and temperature; momentum towers as built, not loaded), its tokenizer
    and config, from a DeepSpeed ZeRO-3 checkpoint of any data- and tensor-parallel size."""
    checkpoint_dir = Path(checkpoint_dir)
    tag = tag or latest_tag(checkpoint_dir)
    if tag is None:
        raise FileNotFoundError(f"no 'latest' file in {checkpoint_dir}; pass --tag")
    cfg = checkpoint_config(checkpoint_dir / tag)
    tokenizer = load_tokenizer(cfg.model.text.tokenizer_path or cfg.model.text.pretrained_path)
    model = BriVLMoCo(BriVL(cfg.model, vocab_size=len(tokenizer)), cfg.moco)
    # ZeRO-3 shards of every data-parallel rank, and of every tensor-parallel rank put back together
    state = consolidate(checkpoint_dir / tag, model, vocab_parallel=cfg.parallel.vocab_parallel)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("momentum.")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model, tokenizer, cfg


def load_online_model(checkpoint_dir: Path, tag: str | None = None):
    """The trained online towers in eval mode, their tokenizer and config."""
    model, tokenizer, cfg = load_moco_model(checkpoint_dir, tag)
    return model.online.eval(), tokenizer, cfg
