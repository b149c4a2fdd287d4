"""BriVL: the two towers. MoCo (momentum copies, queues, loss) lives in brivl_ds.moco, parallelism elsewhere."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from brivl_ds.config import ModelConfig
from brivl_ds.models.image_tower import ImageTower
from brivl_ds.models.text_tower import TextTower
from brivl_ds.models.tower_init import EAGER_INIT, TowerInit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> (x / 255 - mean) / std in float32, then cast to `dtype`; contiguous NCHW."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    x = images.float().div_(255).sub_(mean).div_(std)
    return x.to(dtype or torch.float32, memory_format=torch.contiguous_format)


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, S, S], uint8 from the data pipeline (normalised by `to`) or already float
    boxes: torch.Tensor  # [B, N, 4] x1, y1, x2, y2 in input pixels
    box_mask: torch.Tensor  # [B, N] bool
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Batch":
        """Move to `device`; `dtype` (the model's compute dtype) applies to the images only. uint8 images cross to
        the device as uint8 (4x fewer bytes) and are normalised there; float images are only moved and cast."""
        # non_blocking: copies from pinned memory overlap with compute (stream-ordered, so safe to use at once)
        moved = [t.to(device, non_blocking=True) for t in self.tensors()]
        images = moved[0]
        if images.dtype == torch.uint8:
            images = normalize_images(images, dtype)
        elif dtype is not None:
            images = images.to(dtype)
        return Batch(images, *moved[1:])

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True) in its pinning thread, so host-to-device copies can overlap."""
        return Batch(*(t.pin_memory() for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.images, self.boxes, self.box_mask, self.input_ids, self.attention_mask

    def __len__(self) -> int:
        return self.images.shape[0]


class BriVL(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, init: TowerInit = EAGER_INIT):
        """`init`: how the towers create their timm and Hugging Face models (models/tower_init.py)."""
        super().__init__()
        self.image = ImageTower(cfg.image, cfg.embed_dim, cfg.head_hidden_dim, init)
        self.text = TextTower(cfg.text, cfg.embed_dim, vocab_size, cfg.head_hidden_dim, init)

    def encode_image(self, batch: Batch) -> torch.Tensor:
        return self.image(batch.images, batch.boxes, batch.box_mask)

    def encode_text(self, batch: Batch) -> torch.Tensor:
        return self.text(batch.input_ids, batch.attention_mask)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(batch), self.encode_text(batch)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; ZeRO-3 partitioned parameters report their full size (ds_numel)."""
    total = trainable = 0
    for p in module.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable
