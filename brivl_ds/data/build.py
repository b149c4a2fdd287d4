"""Data objects from a Config: the one place that knows which config field feeds which constructor."""
from __future__ import annotations

from brivl_ds.config import Config
from brivl_ds.data.dataset import Collator, PairDataset
from brivl_ds.data.stream import ShardStream
from brivl_ds.data.transforms import PairTransform


def build_transform(cfg: Config, train: bool) -> PairTransform:
    image = cfg.model.image
    return PairTransform(cfg.data.augment, image.image_size, image.max_boxes, cfg.data.grid_boxes, train)


def build_collator(cfg: Config, tokenizer) -> Collator:
    return Collator(tokenizer, cfg.model.text.max_length)


def build_eval_set(cfg: Config, path: str) -> PairDataset:
    return PairDataset(path, build_transform(cfg, train=False))


def build_train_stream(cfg: Config, collate: Collator, rank: int, world: int) -> ShardStream:
    return ShardStream(cfg.data.train_path, build_transform(cfg, train=True), collate, cfg.data.batch_size,
                       rank, world, seed=cfg.train.seed, block_rows=cfg.data.shuffle_block_rows)
