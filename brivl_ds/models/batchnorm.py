"""Frozen-statistics BatchNorm that runs in any precision: the project's BN choice (see README, BatchNorm).

The CNN's BatchNorm layers normalise with their running statistics, never batch statistics, and never update
them: an image's embedding does not depend on its batch-mates, so a momentum key cannot leak the positive
through batch statistics (MoCo's reason for shuffle-BN), and no cross-rank shuffle is needed. The affine
parameters (gain, bias) still train where their backbone group is trainable.

Precision: the statistics stay fp32 buffers (DeepSpeed casts only parameters to bf16), the affine parameters are
whatever the engine holds (bf16 under a bf16 ZeRO-3 config, with fp32 masters in the optimizer) and are upcast
exactly for the op, and the activations stay in the compute dtype. `F.batch_norm` with a bf16/fp16 input and fp32
statistics/affine is torch's mixed-type kernel (CPU and CUDA): it normalises in fp32 and rounds once, on output.
The alternative, everything in bf16, would round the pretrained statistics to 8 mantissa bits (each channel's
scale off by up to 0.4 %, over ~55 BN layers in B7) and write the rounded values into every checkpoint; the
statistics are a few kB, so keeping them exact costs nothing. A plain nn.BatchNorm2d cannot run in a bf16 engine
at all: bf16 gain with fp32 statistics is a dtype error in torch.

The conversion keeps module names, parameters and buffers as they are (only the class changes), so timm
checkpoints and our own load unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import nn


class FrozenStatistics:
    """Mixin over a torch `_BatchNorm`: normalise with the running statistics in fp32, whatever the mode."""

    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    eps: float

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.batch_norm(x, self.running_mean.float(), self.running_var.float(), weight, bias,
                            training=False, momentum=0.0, eps=self.eps)


class FrozenStatsBatchNorm2d(FrozenStatistics, nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._normalize(x)


class FrozenStatsBatchNormAct2d(FrozenStatistics, BatchNormAct2d):
    """timm's BatchNorm + activation (EfficientNet, ResNet-D, ...): the same, then timm's drop and act."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self._normalize(x)))


# Exact classes only: a subclass (e.g. a synced or group-aware BN) may compute something else, so it is refused.
_FROZEN_CLASS = {nn.BatchNorm2d: FrozenStatsBatchNorm2d, BatchNormAct2d: FrozenStatsBatchNormAct2d}


def freeze_batchnorm_statistics(module: nn.Module) -> int:
    """Switch every BatchNorm of `module` to frozen statistics in place; returns how many were switched."""
    switched = 0
    for name, child in module.named_modules():
        if not isinstance(child, nn.modules.batchnorm._BatchNorm) or isinstance(child, FrozenStatistics):
            continue
        frozen = _FROZEN_CLASS.get(type(child))
        if frozen is None:
            raise TypeError(f"{name}: {type(child).__name__} has no frozen-statistics form here; "
                            f"set model.image.frozen_bn_stats=false or add it to brivl_ds/models/batchnorm.py")
        if not child.track_running_stats or child.running_mean is None:
            raise ValueError(f"{name}: BatchNorm without running statistics cannot be frozen")
        child.__class__ = frozen  # same parameters, buffers and names; only forward changes
        switched += 1
    return switched
