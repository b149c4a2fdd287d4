"""Tensor parallelism with megatron-core, applied to a built BriVL (torchtitan's parallelize step).

The towers are written with plain nn.Linear layers; `parallelize_towers` swaps the ones worth splitting for
megatron-core's ColumnParallelLinear / RowParallelLinear and copies each rank's slice of the existing weights into
them, so a model built (and loaded from pretrained files) whole becomes its TP shard exactly:

  - text encoder (HF BERT/RoBERTa) layers: query/key/value column-parallel by whole heads, attention output
    row-parallel; intermediate column-parallel, output row-parallel;
  - both towers' self-attention blocks: the fused qkv split per q, k and v by whole heads (its rows are laid out
    (3, heads, head_dim), so a plain chunk of the fused weight would hand one rank all of q and part of k), the
    output row-parallel; fc1 column-parallel, fc2 row-parallel;
  - both projection heads: fc1 column-parallel, fc2 row-parallel, so the [B, D] embedding comes out whole on every
    TP rank and the loss, queues and kernels are unchanged.

Everything else (the CNN, RoIAlign, embeddings, LayerNorms, box projections, row-parallel biases) is replicated
on the TP ranks. A column-parallel layer all-reduces its input gradient and a row-parallel one its output, so
replicated parameters get identical gradients on every TP rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from brivl_ds.models.layers import SelfAttention


def model_parallel_config(tp: int) -> ModelParallelConfig:
    """CPU-safe settings: weights built on the CPU (then overwritten by our slices), no fused CUDA paths, no
    sequence parallelism (DeepSpeed would not all-reduce the LayerNorm gradients)."""
    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               gradient_accumulation_fusion=False, sequence_parallel=False,
                               params_dtype=torch.float32)


class ColumnParallel(ColumnParallelLinear):
    """megatron-core's ColumnParallelLinear returning only its (bias-added) output, like the nn.Linear it replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[0]


class RowParallel(RowParallelLinear):
    """megatron-core's RowParallelLinear returning only its output (bias added after the all-reduce)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[0]


def head_rows(width: int, heads: int, tp: int, rank: int, fused: int = 1) -> torch.Tensor:
    """Output rows of rank `rank`'s whole heads in a projection laid out (fused, heads, head_dim)."""
    if heads % tp:
        raise ValueError(f"{heads} attention heads do not split over tensor_parallel={tp} (heads % TP must be 0)")
    block = width // tp
    return torch.cat([torch.arange(j * width + rank * block, j * width + (rank + 1) * block) for j in range(fused)])


@dataclass(frozen=True)
class Split:
    """One nn.Linear of a BriVL to split: `column` (output rows; by whole heads when `heads`, per each of `fused`
    projections stacked in the rows) or `row` (input columns; bias kept whole, added after the all-reduce)."""
    path: str
    style: str
    heads: int = 0
    fused: int = 1


def tensor_parallel_plan(model: nn.Module) -> list[Split]:
    """Every Linear that tensor parallelism splits in a BriVL (model.image, model.text); the rest is replicated."""
    plan: list[Split] = []
    encoder = model.text.encoder
    for i in range(len(encoder.encoder.layer)):  # HF BERT/RoBERTa names
        prefix = f"text.encoder.encoder.layer.{i}"
        plan += [Split(f"{prefix}.attention.self.{n}", "column", encoder.config.num_attention_heads)
                 for n in ("query", "key", "value")]
        plan += [Split(f"{prefix}.attention.output.dense", "row"), Split(f"{prefix}.intermediate.dense", "column"),
                 Split(f"{prefix}.output.dense", "row")]
    for path in ("image.encoder", "text.self_attention"):
        for i, layer in enumerate(model.get_submodule(path).layers):
            prefix = f"{path}.layers.{i}"
            plan += [Split(f"{prefix}.attn.qkv", "column", layer.attn.heads, fused=3),
                     Split(f"{prefix}.attn.out", "row"), Split(f"{prefix}.fc1", "column"), Split(f"{prefix}.fc2", "row")]
    for tower in ("image", "text"):
        plan += [Split(f"{tower}.head.fc1", "column"), Split(f"{tower}.head.fc2", "row")]
    return plan


def _check_divisible(features: int, tp: int, what: str) -> None:
    if features % tp:
        raise ValueError(f"{features} {what} features of a split layer do not divide by tensor_parallel={tp}")


def _parallel_linear(linear: nn.Linear, split: Split, tp: int, rank: int, group, config) -> nn.Module:
    """A megatron-core layer holding rank `rank`'s slice of `linear` (weights, bias, requires_grad)."""
    bias = linear.bias is not None
    if split.style == "column":
        if split.heads:
            rows = head_rows(linear.out_features // split.fused, split.heads, tp, rank, split.fused)
        else:
            _check_divisible(linear.out_features, tp, "output")
            rows = torch.tensor_split(torch.arange(linear.out_features), tp)[rank]
        layer = ColumnParallel(linear.in_features, linear.out_features, config=config, init_method=nn.init.zeros_,
                               bias=bias, gather_output=False, tp_group=group)
        weight, bias_value = linear.weight[rows], linear.bias[rows] if bias else None
    else:
        _check_divisible(linear.in_features, tp, "input")
        cols = torch.tensor_split(torch.arange(linear.in_features), tp)[rank]
        layer = RowParallel(linear.in_features, linear.out_features, config=config, init_method=nn.init.zeros_,
                            bias=bias, input_is_parallel=True, skip_bias_add=False, tp_group=group)
        weight, bias_value = linear.weight[:, cols], linear.bias if bias else None
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.weight.requires_grad_(linear.weight.requires_grad)
        if bias:
            layer.bias.copy_(bias_value)
            layer.bias.requires_grad_(linear.bias.requires_grad)
    return layer


def parallelize_towers(model: nn.Module, tp: int, rank: int, group) -> nn.Module:
    """Split a built BriVL (model.image, model.text) over the tensor-parallel group in place; TP=1 is a no-op."""
    if tp == 1:
        return model
    config = model_parallel_config(tp)
    for split in tensor_parallel_plan(model):
        parent_path, name = split.path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        setattr(parent, name, _parallel_linear(getattr(parent, name), split, tp, rank, group, config))
        if isinstance(parent, SelfAttention) and name == "qkv":
            parent.heads //= tp  # it now computes its local heads; the layer's only TP-aware field
    return model


def parallelize(model: nn.Module, tp: int, rank: int, group) -> nn.Module:
    """Split a BriVLMoCo's online and momentum towers identically (each built whole from the same weights), so
    ZeRO-3 partitions both the same way and the EMA stays a local update of each rank's own shard."""
    parallelize_towers(model.online, tp, rank, group)
    parallelize_towers(model.momentum, tp, rank, group)
    return model


def parameters_per_tp_rank(model: nn.Module, tp: int) -> dict[str, int]:
    """Exact parameter count each TP rank holds of each tower (before ZeRO-3 divides it by the DP size): split
    weights and column-parallel biases / TP, everything else whole. Works on the meta device."""
    plan = tensor_parallel_plan(model)
    for s in plan:
        if s.heads % tp:
            raise ValueError(f"{s.path}: {s.heads} heads do not split over tensor_parallel={tp}")
    split = {f"{s.path}.weight": tp for s in plan}
    split.update({f"{s.path}.bias": tp for s in plan if s.style == "column"})
    counts = {}
    for tower in ("image", "text"):
        counts[tower] = 0
        for name, p in model.get_submodule(tower).named_parameters():
            n = p.numel()
            divisor = split.get(f"{tower}.{name}", 1)
            if n % divisor:
                raise ValueError(f"{tower}.{name} ({n}) does not divide by tensor_parallel={tp}")
            counts[tower] += n // divisor
    return counts
