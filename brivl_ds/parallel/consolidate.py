"""One whole fp32 state dict from a ZeRO-3 checkpoint written with tensor parallelism.

DeepSpeed's zero_to_fp32 consolidates the data-parallel shards of mp_rank_00 only. Each TP rank's file set is
consolidated on its own (through a folder of links that present it as mp_rank_00), then the TP shards are put
back along each split parameter's partition, by the same split plan that cut them.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from brivl_ds.parallel.plan import head_rows, tensor_parallel_plan

_MP_RANK = re.compile(r"_mp_rank_(\d+)_")


def tp_size_of(checkpoint: Path) -> int:
    ranks = {int(m.group(1)) for f in checkpoint.glob("*model_states.pt") if (m := _MP_RANK.search(f.name))}
    return max(ranks) + 1 if ranks else 1


def _consolidate_mp_rank(checkpoint: Path, mp_rank: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        view = Path(tmp) / checkpoint.name
        view.mkdir()
        for f in checkpoint.glob(f"*_mp_rank_{mp_rank:02d}_*.pt"):
            (view / f.name.replace(f"_mp_rank_{mp_rank:02d}_", "_mp_rank_00_")).symlink_to(f.resolve())
        return get_fp32_state_dict_from_zero_checkpoint(tmp, tag=checkpoint.name)


def consolidate(checkpoint: Path, whole_model: nn.Module, prefixes: tuple[str, ...] = ("online.", "momentum."),
                vocab_parallel: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of `whole_model` (a BriVLMoCo built unsplit) from a TP checkpoint folder (one tag), written
    with `parallel.vocab_parallel` = `vocab_parallel`."""
    tp = tp_size_of(checkpoint)
    shards = [_consolidate_mp_rank(checkpoint, m) for m in range(tp)]
    return shards[0] if tp == 1 else merge_tp_shards(shards, whole_model, prefixes, vocab_parallel)


def merge_tp_shards(shards: list[dict[str, torch.Tensor]], whole_model: nn.Module,
                    prefixes: tuple[str, ...] = ("online.", "momentum."), vocab_parallel: bool = False
                    ) -> dict[str, torch.Tensor]:
    """One state dict of `whole_model` from the TP ranks' state dicts (in TP rank order), by the split plan of each
    BriVL under `prefixes` ("" for a bare BriVL)."""
    tp = len(shards)
    merged = dict(shards[0])  # replicated parameters, buffers, row-parallel biases: rank 0's copy
    for prefix in prefixes:
        towers = whole_model.get_submodule(prefix.rstrip("."))
        for split in tensor_parallel_plan(towers, vocab_parallel):
            name = f"{prefix}{split.path}"
            if split.style == "vector":  # a per-head vector parameter: each rank's whole heads, in place
                vector = towers.get_parameter(split.path)
                merged[name] = torch.empty(vector.shape, dtype=torch.float32)
                for rank, shard in enumerate(shards):
                    merged[name][head_rows(vector.shape[0], split.heads, tp, rank)] = shard[name]
                continue
            linear = towers.get_submodule(split.path)
            if split.style == "vocab":  # rows in rank order, then the padding dropped
                rows = torch.cat([shard[f"{name}.weight"] for shard in shards])
                merged[f"{name}.weight"] = rows[:linear.weight.shape[0]]
                continue
            weight = torch.empty_like(linear.weight, device="cpu", dtype=torch.float32)
            bias = torch.empty_like(linear.bias, device="cpu", dtype=torch.float32) if linear.bias is not None else None
            for rank, shard in enumerate(shards):
                if split.style == "column":
                    rows = (head_rows(linear.out_features // split.fused, split.heads, tp, rank, split.fused)
                            if split.heads else torch.tensor_split(torch.arange(linear.out_features), tp)[rank])
                    weight[rows] = shard[f"{name}.weight"]
                    if bias is not None:
                        bias[rows] = shard[f"{name}.bias"]
                else:
                    cols = torch.tensor_split(torch.arange(linear.in_features), tp)[rank]
                    weight[:, cols] = shard[f"{name}.weight"]
            merged[f"{name}.weight"] = weight
            if bias is not None and split.style == "column":
                merged[f"{name}.bias"] = bias
    return merged
