"""ZeRO-3 parameter helpers: whether a parameter is partitioned, its full values for a block, and copying between
identically partitioned modules. Plain parameters pass through every helper untouched."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def any_partitioned(module: nn.Module) -> bool:
    return any(is_partitioned(p) for p in module.parameters())


@contextlib.contextmanager
def gathered(params: Iterable[nn.Parameter], modifier_rank: int | None = 0) -> Iterator[None]:
    """The full values of `params` inside the block; with `modifier_rank`, that rank's writes are kept (broadcast
    and re-partitioned on exit). Plain parameters pass through untouched."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


@torch.no_grad()
def copy_local_shards(source: nn.Module, target: nn.Module) -> None:
    """target <- source for two identically built (and identically partitioned) modules, each rank copying only its
    own partitions, and every buffer: no communication."""
    targets = dict(target.named_parameters())
    for name, p in source.named_parameters():
        local, dest = (p.ds_tensor, targets[name].ds_tensor) if is_partitioned(p) else (p.data, targets[name].data)
        dest.copy_(local)
    target_buffers = dict(target.named_buffers())
    for name, b in source.named_buffers():
        target_buffers[name].copy_(b)


def set_fp32_master(param: nn.Parameter, value: torch.Tensor) -> None:
    """Set the optimizer's fp32 master copy of `param` to `value` (its full shape), on every rank.

    DeepSpeed 0.19's safe_set_full_fp32_param cuts the value into partitions without their padding, so it fails
    for a ZeRO-3 parameter smaller than its data-parallel group (a one-element temperature over 2 ranks); here
    each rank writes its own padded slice."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_full_fp32_param

    if not is_partitioned(param):
        safe_set_full_fp32_param(param, value)
        return
    import torch.distributed as dist

    local = safe_get_local_fp32_param(param)
    n = local.numel()
    rank = dist.get_rank(group=param.ds_process_group)
    padded = torch.zeros(n * dist.get_world_size(group=param.ds_process_group), dtype=torch.float32)
    padded[: value.numel()] = value.detach().float().flatten().cpu()
    with torch.no_grad():
        local.view(-1).copy_(padded[rank * n:(rank + 1) * n].to(local.device))
