"""Process groups for tensor x data parallelism (megatron-core's parallel_state), and the adapter DeepSpeed needs.

TP is innermost: ranks [0, TP) form the first tensor-parallel group (the GPUs of one node), and rank r belongs
to data-parallel group r % TP. ZeRO-3 partitions each TP shard over its data-parallel group only.
"""
from __future__ import annotations

from dataclasses import dataclass

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
