"""AdamW parameter groups (decoupled decay on weights only) and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from brivl_ds.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on every weight matrix / kernel / embedding; none on gains, biases or the temperature
    (every parameter with fewer than 2 dimensions). ZeRO-3 partitioned parameters are judged by ds_shape."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        shape = getattr(param, "ds_shape", param.shape)
        (decay if len(shape) >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, dp_rank: int = 0) -> torch.optim.Optimizer:
    """`dp_rank`: this process's data-parallel rank (seeds adamw_half's stochastic rounding)."""
    groups = param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    if cfg.name == "adamw_half":
        import brivl_kernels

        # Stochastic rounding of the bf16 moments: a stream per data-parallel rank (each owns other partitions).
        # Not per global rank: the TP ranks of a group hold the same partition of every replicated parameter,
        # with the same gradients, and must round it alike or their copies drift apart.
        return brivl_kernels.AdamWHalfStates(groups, seed=dp_rank, **kwargs)
    raise ValueError(f"unknown optimizer {cfg.name!r}; choose adamw or adamw_half")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier for the optimizer step that follows `step` completed steps: linear warmup from 1/warmup,
    then cosine decay from 1 to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """torch's LambdaLR (checkpointed by DeepSpeed with the engine). DeepSpeed's WarmupCosineLR is not used: it
    starts from lr 0 for the first two steps and defaults to a logarithmic warmup."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        warmup_cosine, warmup_steps=max(1, cfg.warmup_steps), total_steps=total_steps, min_ratio=cfg.min_lr_ratio))
