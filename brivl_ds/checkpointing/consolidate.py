"""One whole fp32 state dict from a ZeRO-3 checkpoint written with tensor parallelism.

DeepSpeed's zero_to_fp32 consolidates the data-parallel shards of mp_rank_00 only. Each TP rank's file set is
consolidated on its own (through a folder of links that present it as mp_rank_00), then the TP shards are put
back along each split parameter's partition, by the same split plan that cut them.

Resuming on another TP size goes one parameter at a time (a 10B model is never whole on a rank): `tp_layout` says
how each split parameter is cut, `merge_param` puts one tensor of its shape back together from the TP ranks' parts
and `split_param` cuts the part of TP rank r of T from the full tensor; `merge_tp_shards` is built on them.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from brivl_ds.checkpointing.files import as_tp_rank0, rank_files, tp_size
from brivl_ds.parallel.tp_plan import check_divisible, head_rows, padded_vocab, tensor_parallel_plan

def _consolidate_mp_rank(checkpoint: Path, mp_rank: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        view = Path(tmp) / checkpoint.name
        view.mkdir()
        for f in rank_files(checkpoint, tp_rank=mp_rank):
            (view / as_tp_rank0(f.path, mp_rank)).symlink_to(f.path.resolve())
        return get_fp32_state_dict_from_zero_checkpoint(tmp, tag=checkpoint.name)


def consolidate(checkpoint: Path, whole_model: nn.Module, prefixes: tuple[str, ...] = ("online.", "momentum."),
                vocab_parallel: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of `whole_model` (a BriVLMoCo built unsplit) from a TP checkpoint folder (one tag), written
    with `parallel.vocab_parallel` = `vocab_parallel`."""
    tp = tp_size(checkpoint)
    shards = [_consolidate_mp_rank(checkpoint, m) for m in range(tp)]
    return shards[0] if tp == 1 else merge_tp_shards(shards, whole_model, prefixes, vocab_parallel)


def merge_tp_shards(shards: list[dict[str, torch.Tensor]], whole_model: nn.Module,
                    prefixes: tuple[str, ...] = ("online.", "momentum."), vocab_parallel: bool = False
                    ) -> dict[str, torch.Tensor]:
    """One state dict of `whole_model` from the TP ranks' state dicts (in TP rank order), by the split plan of each
    BriVL under `prefixes` ("" for a bare BriVL)."""
    merged = dict(shards[0])  # replicated parameters, buffers, row-parallel biases: rank 0's copy
    for name, split in tp_layout(whole_model, prefixes, vocab_parallel).items():
        merged[name] = merge_param(split, [shard[name] for shard in shards])
    return merged


# ------------------------------------------------------------------ one parameter at a time (resharding TP -> TP')
@dataclass(frozen=True)
class ParamSplit:
    """How TP splits one parameter (or any tensor of its shape: Adam's exp_avg / exp_avg_sq alike).

    `shape` is the full, unpadded shape. `column`: rows (dim 0) of a Linear's weight or bias, by whole heads when
    `heads` (rows laid out (fused, heads, head_dim)), else in TP equal blocks; `row`: columns (dim 1) of a weight;
    `vocab`: rows of the word embedding, padded with zero rows to a multiple of TP, in TP equal blocks; `vector`: a
    per-head 1-D parameter (EVA's q / v bias) by whole heads."""
    style: str
    shape: tuple[int, ...]
    heads: int = 0
    fused: int = 1

    @property
    def dim(self) -> int:
        return 1 if self.style == "row" else 0


def tp_layout(whole_model: nn.Module, prefixes: tuple[str, ...] = ("online.", "momentum."),
              vocab_parallel: bool = False) -> dict[str, ParamSplit]:
    """Every parameter of `whole_model` (built unsplit; the meta device will do) that TP splits, by its state-dict
    name; any other parameter is replicated on the TP ranks (row-parallel biases included)."""
    def shape(p: torch.Tensor) -> tuple[int, ...]:  # a ZeRO-3 partitioned parameter keeps its shape in ds_shape
        return tuple(getattr(p, "ds_shape", None) or p.shape)

    layout = {}
    for prefix in prefixes:
        towers = whole_model.get_submodule(prefix.rstrip("."))
        for s in tensor_parallel_plan(towers, vocab_parallel):
            name = f"{prefix}{s.path}"
            if s.style == "vector":
                layout[name] = ParamSplit("vector", shape(towers.get_parameter(s.path)), s.heads)
                continue
            module = towers.get_submodule(s.path)
            layout[f"{name}.weight"] = ParamSplit(s.style, shape(module.weight), s.heads, s.fused)
            if s.style == "column" and module.bias is not None:
                layout[f"{name}.bias"] = ParamSplit("column", shape(module.bias), s.heads, s.fused)
    return layout


def _index(split: ParamSplit, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s indices along `split.dim` of the full tensor (the padded one for `vocab`): the same rules as
    tensor_parallel.py cuts the model by."""
    size = split.shape[split.dim]
    if split.style == "vocab":
        return torch.tensor_split(torch.arange(padded_vocab(size, tp)), tp)[rank]
    if split.heads:
        return head_rows(size // split.fused, split.heads, tp, rank, split.fused)
    check_divisible(size, tp, "output" if split.dim == 0 else "input")
    return torch.tensor_split(torch.arange(size), tp)[rank]


def local_shape(split: ParamSplit, tp: int) -> torch.Size:
    """The shape every TP rank holds of the parameter (the same on each rank)."""
    shape = list(split.shape)
    shape[split.dim] = len(_index(split, tp, 0))
    return torch.Size(shape)


def split_param(split: ParamSplit | None, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """The part of `full` (the parameter, or any tensor of its shape) that TP rank `rank` of `tp` holds: a new
    contiguous tensor; `full` itself when replicated (`split` None). A flat tensor: pass `full.view(split.shape)`
    and flatten the result."""
    if split is None:
        return full
    if tuple(full.shape) != split.shape:
        raise ValueError(f"a {split.style}-split parameter of shape {split.shape} given {tuple(full.shape)}")
    index = _index(split, tp, rank).to(full.device)
    if split.style == "vocab":  # rows past the vocabulary are padding: zeros, as the model holds them
        part = full.new_zeros(local_shape(split, tp))
        real = index < split.shape[0]
        part[real] = full.index_select(0, index[real])
        return part
    return full.index_select(split.dim, index)


def merge_param(split: ParamSplit | None, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor from every TP rank's part of it (in TP rank order; TP = len(shards)), on their device and in
    their dtype; rank 0's copy when replicated (`split` None). Flat shards: pass
    `[s.view(local_shape(split, len(shards))) for s in shards]` and flatten the result."""
    if split is None:
        return shards[0]
    tp = len(shards)
    expected = local_shape(split, tp)
    if any(s.shape != expected for s in shards):
        raise ValueError(f"TP={tp} shards of a {split.style}-split parameter of shape {split.shape} must be "
                         f"{tuple(expected)}, got {[tuple(s.shape) for s in shards]}")
    full = shards[0].new_empty(split.shape)
    for rank, shard in enumerate(shards):
        index = _index(split, tp, rank).to(full.device)
        if split.style == "vocab":  # the padding rows are dropped (not kept as a view's hidden storage)
            real = index < split.shape[0]
            index, shard = index[real], shard[real]
        full.index_copy_(split.dim, index, shard)
    return full
