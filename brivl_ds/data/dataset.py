"""Samples, the collator that turns them into model batches, and the map-style dataset used for held-out sets.

Training streams its shards (stream.py); held-out sets are small and read whole so every rank can encode any row.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from brivl_ds.data import content_ids
from brivl_ds.data.shards import read_table
from brivl_ds.models.brivl import Batch

log = logging.getLogger(__name__)


@dataclass
class Sample:
    image: torch.Tensor  # uint8 [3, S, S]; normalised on the device (Batch.to)
    boxes: torch.Tensor  # [max_boxes + 1, 4] in input pixels, official layout
    box_mask: torch.Tensor  # [max_boxes + 1] bool
    text: str
    row: int
    image_id: int  # content id of the encoded image (data/content_ids.py)


class Collator:
    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, samples: list[Sample]) -> tuple[Batch, dict]:
        tokens = self.tokenizer([s.text for s in samples], padding="longest", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        batch = Batch(torch.stack([s.image for s in samples]), torch.stack([s.boxes for s in samples]),
                      torch.stack([s.box_mask for s in samples]), tokens["input_ids"], tokens["attention_mask"])
        ids = content_ids.as_tensor([(s.image_id, content_ids.caption_id(s.text)) for s in samples])
        return batch, {"rows": [s.row for s in samples], "content_ids": ids}


class PairDataset(Dataset):
    """Every row of some shards, transformed with a fixed seed per row (held-out evaluation).

    A row that fails to decode is replaced by the next good row, logged and kept in `skipped`, so an evaluation
    never dies for one bad image; the evaluation result reports how many were replaced (`skipped_rows`).
    """

    def __init__(self, path: str | Path, transform, max_retries: int = 16):
        self.table = read_table(path, columns=["id", "image", "text", "boxes"])
        if self.table.num_rows == 0:
            raise ValueError(f"no rows in {path}")
        self.images = self.table.column("image")
        self.texts = self.table.column("text").to_pylist()
        self.boxes = self.table.column("boxes").to_pylist()
        self.transform, self.max_retries = transform, max_retries
        self.skipped: set[int] = set()

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int) -> Sample:
        for attempt in range(self.max_retries):
            row = (index + attempt) % len(self)
            try:
                encoded = self.images[row].as_py()
                image, boxes, mask = self.transform(encoded, self.boxes[row] or [], row)
                return Sample(image, boxes, mask, self.texts[row], row, content_ids.image_id(encoded))
            except Exception as err:  # undecodable or truncated image: replaced and counted, never fatal
                if row not in self.skipped:
                    log.warning("skipping held-out row %d (%s): %s", row, self.table.column("id")[row], err)
                self.skipped.add(row)
        raise RuntimeError(f"{self.max_retries} consecutive rows from {index} failed to decode")
