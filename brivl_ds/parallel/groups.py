"""Process groups for tensor x data parallelism (megatron-core's parallel_state), and the adapter DeepSpeed needs.

TP is innermost: ranks [0, TP) form the first tensor-parallel group (the GPUs of one node), and rank r belongs
to data-parallel group r % TP. ZeRO-3 partitions each TP shard over its data-parallel group only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelGroups:
    tp: int  # tensor-parallel size
    tp_rank: int
    tp_group: dist.ProcessGroup | None
    dp: int  # data-parallel size: the ranks that see different data
    dp_rank: int
    dp_group: dist.ProcessGroup | None  # None = the world (TP = 1)


def data_parallel_only() -> ParallelGroups:
    """TP = 1: every rank is a data-parallel rank of the world group (today's layout)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    return ParallelGroups(tp=1, tp_rank=0, tp_group=None, dp=world, dp_rank=rank, dp_group=None)


def init_tensor_parallel(tp: int) -> ParallelGroups:
    """Create the TP and DP groups with megatron-core (the world must already be initialised)."""
    if tp == 1:
        return data_parallel_only()
    from megatron.core import parallel_state

    world = dist.get_world_size()
    if world % tp:
        raise ValueError(f"tensor_parallel={tp} does not divide the {world} ranks")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    return ParallelGroups(tp=tp, tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                          tp_group=parallel_state.get_tensor_model_parallel_group(),
                          dp=parallel_state.get_data_parallel_world_size(),
                          dp_rank=parallel_state.get_data_parallel_rank(),
                          dp_group=parallel_state.get_data_parallel_group())


class DeepSpeedMPU:
    """The `mpu` object deepspeed.initialize asks for model/data-parallel ranks and groups. megatron-core 0.16's
    parallel_state has no get_model_parallel_*; here model parallel = tensor parallel (no pipeline stages).
    It deliberately has no `initialize_sequence_parallel` (DeepSpeed would then treat it as sequence parallel)."""

    def __init__(self, groups: ParallelGroups):
        self.groups = groups

    def get_model_parallel_rank(self) -> int:
        return self.groups.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.groups.tp

    def get_model_parallel_group(self):
        return self.groups.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self.groups.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.groups.dp

    def get_data_parallel_group(self):
        return self.groups.dp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1


def check_same_batch(batch, tp_group, device: torch.device) -> None:
    """The TP ranks of one group must see the same samples (else the split layers mix different inputs): compare
    a checksum of the raw batch (a models.brivl.Batch) over the group, one tiny all-gather per step (on the device:
    NCCL groups on GPUs)."""
    checksum = torch.stack([t.double().sum() for t in batch.tensors()]).to(device)
    everyone = [torch.empty_like(checksum) for _ in range(torch.distributed.get_world_size(tp_group))]
    torch.distributed.all_gather(everyone, checksum, group=tp_group)
    if any(not torch.equal(everyone[0], other) for other in everyone[1:]):
        raise RuntimeError("the tensor-parallel ranks of one group received different batches; the data must be "
                           "split by data-parallel rank")
