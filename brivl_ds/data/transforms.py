"""Image + box transforms (torchvision.transforms.v2 moves the boxes with the image) and the official box layout."""
from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from brivl_ds.config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transform(aug: AugmentConfig, size: int, train: bool) -> v2.Compose:
    """Resize to size x size (aspect not kept, like the official dataset code); random crop, flip, colour jitter,
    grayscale and blur only for training, each applied to the boxes too where it moves pixels."""
    ops: list[v2.Transform] = []
    if train and aug.crop_scale_min < 1.0:
        ops.append(v2.RandomResizedCrop((size, size), scale=(aug.crop_scale_min, 1.0), antialias=True))
    else:
        ops.append(v2.Resize((size, size), antialias=True))
    if train and aug.hflip_prob > 0:
        ops.append(v2.RandomHorizontalFlip(aug.hflip_prob))
    if train and aug.color_jitter > 0:
        ops.append(v2.ColorJitter(brightness=aug.color_jitter, contrast=aug.color_jitter,
                                  saturation=aug.color_jitter))
    if train and aug.grayscale_prob > 0:
        ops.append(v2.RandomGrayscale(aug.grayscale_prob))
    if train and aug.blur_prob > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=aug.blur_prob))
    ops += [
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=None),  # boxes a crop removed are dropped
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    return v2.Compose(ops)


def grid_boxes(width: int, height: int, g: int) -> torch.Tensor:
    """A g x g grid of boxes over the image (the official later version's replacement for detector boxes)."""
    xs = torch.linspace(0, width, g + 1)
    ys = torch.linspace(0, height, g + 1)
    return torch.tensor([[xs[i], ys[j], xs[i + 1], ys[j + 1]] for j in range(g) for i in range(g)])


def box_sequence(boxes: torch.Tensor, size: int, max_boxes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Official layout: the first max_boxes boxes, then the whole image [0, 0, S, S], zero-padded to max_boxes + 1;
    returns (boxes [max_boxes + 1, 4], mask [max_boxes + 1] with True for real boxes)."""
    kept = boxes[:max_boxes].float().reshape(-1, 4)
    whole = torch.tensor([[0.0, 0.0, float(size), float(size)]])
    real = torch.cat([kept, whole])
    out = torch.zeros(max_boxes + 1, 4)
    out[: real.shape[0]] = real
    mask = torch.zeros(max_boxes + 1, dtype=torch.bool)
    mask[: real.shape[0]] = True
    return out, mask


def apply(transform: v2.Compose, image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """image uint8 [3, H, W]; boxes [n, 4] xyxy in its pixels -> (normalised float image, boxes in output pixels)."""
    h, w = image.shape[-2:]
    out_image, out_boxes = transform(tv_tensors.Image(image),
                                     tv_tensors.BoundingBoxes(boxes.reshape(-1, 4), format="XYXY", canvas_size=(h, w)))
    return out_image.as_subclass(torch.Tensor), out_boxes.as_subclass(torch.Tensor)
