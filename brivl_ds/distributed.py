"""Process-group set-up and small helpers; works with the deepspeed launcher, torchrun, or a single process."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# DeepSpeed 0.19.8 uses collectives that torch 2.13 calls deprecated; one warning per call floods the console.
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(threads: int = 0, timeout_s: float = 1800.0) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (nccl on GPUs, gloo on CPU). A bare `python train.py`
    becomes a world of one. Every collective times out after `timeout_s`: a dead peer becomes an error."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = "29512"
    accel = get_accelerator()
    backend = "gloo" if accel.device_name() == "cpu" else accel.communication_backend_name()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
        if accel.device_name() == "cpu":
            release_shm_allreduce_buffer()
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if accel.device_name() == "cpu":
        device = torch.device("cpu")
        # Ranks on one host share its cores; oversubscription makes every rank slower.
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world))
    else:
        accel.set_device(local_rank)
        device = torch.device(accel.device_name(), local_rank)
        if threads:
            torch.set_num_threads(threads)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, local_world, device)


def release_shm_allreduce_buffer() -> None:
    """DeepSpeed's CPU all-reduce (ops/csrc/cpu/comm/shm.cpp) maps one 66 MiB /dev/shm file per rank and never
    unlinks it, so every CPU run left them behind (/dev/shm is memory: 19 GiB after a few hundred test runs here).
    Once every rank has mapped its peers' files (DeepSpeed's init returns only then; the barrier waits for all),
    the name can go: the mappings stay valid and the memory is freed when the last rank exits."""
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    dist.barrier()
    if os.path.exists(name):
        os.unlink(name)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)  # SUM (gloo has no AVG), then divide
        values /= dist.get_world_size()
    return values


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a list of one outside distributed runs)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out



def gathered_sizes(n: int, group=None, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's row count `n`, in rank order (one small all-gather)."""
    size = torch.tensor([n], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    return [int(s.item()) for s in sizes]


class _AllGatherWithGrad(torch.autograd.Function):
    """Rows of every rank of `group`, in rank order; the backward sums every rank's gradient of the gathered rows
    (an all-reduce, which gloo has, unlike reduce-scatter) and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, sizes: list[int], start: int) -> torch.Tensor:
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.shape[0]] = x
        gathered = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(gathered, padded.contiguous(), group=group)
        ctx.group, ctx.start, ctx.n = group, start, x.shape[0]
        return torch.cat([g[:n] for g, n in zip(gathered, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.start:ctx.start + ctx.n], None, None, None


def all_gather_with_grad(x: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """(rows of every rank of `group` in rank order, the index of this rank's first row); differentiable, as
    OpenCLIP's `gather_with_grad`: a loss over the gathered rows sends each rank the gradient of its own rows from
    every rank's loss, so with gradients averaged over ranks the step is that of the global batch's mean loss."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x, 0
    sizes = gathered_sizes(x.shape[0], group, x.device)
    start = sum(sizes[: dist.get_rank(group)])
    return _AllGatherWithGrad.apply(x, group, sizes, start), start
