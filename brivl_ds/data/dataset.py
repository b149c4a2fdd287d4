"""Pairs from Parquet shards -> model batches, with a resumable, deterministic distributed batch sampler.

Augmentation randomness is a function of (seed, epoch, row) only, never of worker layout or of the training
RNG, so a resumed run sees exactly the images an uninterrupted one would have seen.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image

from brivl_ds.config import AugmentConfig
from brivl_ds.data.shards import read_table
from brivl_ds.data.transforms import apply, box_sequence, build_transform, grid_boxes
from brivl_ds.models.brivl import Batch

log = logging.getLogger(__name__)
MAX_RETRIES = 16


@dataclass
class Sample:
    image: torch.Tensor
    boxes: torch.Tensor
    box_mask: torch.Tensor
    text: str
    index: int
    skipped: int  # bad rows replaced to produce this sample


class PairDataset(Dataset):
    """Map-style view of shards. Item = (row index, per-sample seed); a row that fails to decode is replaced by the
    next row and counted, so one bad image never stops a run and batch sizes stay constant."""

    def __init__(self, path: str | Path, image_size: int, max_boxes: int, augment: AugmentConfig, train: bool,
                 grid: int = 0):
        self.table = read_table(path, columns=["id", "image", "width", "height", "text", "boxes"])
        if self.table.num_rows == 0:
            raise ValueError(f"no rows in {path}")
        self.images = self.table.column("image")
        self.texts = self.table.column("text").to_pylist()
        self.boxes = self.table.column("boxes").to_pylist()
        self.size, self.max_boxes, self.grid = image_size, max_boxes, grid
        self.transform = build_transform(augment, image_size, train)

    def __len__(self) -> int:
        return self.table.num_rows

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        data = torch.frombuffer(bytearray(self.images[index].as_py()), dtype=torch.uint8)
        image = decode_image(data, mode=ImageReadMode.RGB)
        boxes = torch.tensor(self.boxes[index] or [], dtype=torch.float32).reshape(-1, 4)
        if boxes.numel() == 0 and self.grid:
            boxes = grid_boxes(image.shape[-1], image.shape[-2], self.grid)
        image, boxes = apply(self.transform, image, boxes)
        seq, mask = box_sequence(boxes, self.size, self.max_boxes)
        return image, seq, mask

    def __getitem__(self, item: tuple[int, int]) -> Sample:
        index, seed = item
        for attempt in range(MAX_RETRIES):
            row = (index + attempt) % len(self)
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    image, boxes, mask = self._load(row)
                return Sample(image, boxes, mask, self.texts[row], row, attempt)
            except Exception as err:  # undecodable or truncated image: skip and count, never fatal
                log.warning("skipping row %d (%s): %s", row, self.table.column("id")[row], err)
        raise RuntimeError(f"{MAX_RETRIES} consecutive rows from {index} failed to decode")


class Collator:
    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, samples: list[Sample]) -> tuple[Batch, dict]:
        tokens = self.tokenizer([s.text for s in samples], padding="longest", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        batch = Batch(torch.stack([s.image for s in samples]), torch.stack([s.boxes for s in samples]),
                      torch.stack([s.box_mask for s in samples]), tokens["input_ids"], tokens["attention_mask"])
        return batch, {"indices": [s.index for s in samples], "skipped": sum(s.skipped for s in samples)}


class DistributedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Deterministic global batches split across data-parallel ranks, resumable mid-epoch.

    Epoch e permutes the rows with seed (seed, e); global batch j is rows [j*G, (j+1)*G) of that permutation
    (G = batch_size * world, the last partial batch dropped so the global batch is constant) and rank r takes
    its slice [r*b, (r+1)*b). Concatenating the ranks' batches in rank order gives the global batch, which is the
    order the all-gathered enqueue writes keys in. Each item carries its own augmentation seed.
    """

    def __init__(self, num_rows: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        self.num_rows, self.batch_size, self.rank, self.world = num_rows, batch_size, rank, world
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.start_batch = 0, 0
        global_batch = batch_size * world
        self.batches_per_epoch = num_rows // global_batch if drop_last else -(-num_rows // global_batch)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{num_rows} rows cannot fill one global batch of {global_batch}")

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields epoch `epoch` starting at its batch `start_batch`."""
        self.epoch, self.start_batch = epoch, start_batch

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self):
        order = self._order()
        g = self.batch_size * self.world
        base = int(np.random.default_rng([self.seed, self.epoch, 1]).integers(2**31))
        for j in range(self.start_batch, self.batches_per_epoch):
            rows = order[j * g + self.rank * self.batch_size: j * g + (self.rank + 1) * self.batch_size]
            yield [(int(i), base + int(i)) for i in rows]
