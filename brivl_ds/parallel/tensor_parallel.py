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

import torch
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from brivl_ds.models.layers import ProjectionHead, SelfAttention, SelfAttentionBlock, TransformerLayer


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


class TensorParallelizer:
    """Swaps nn.Linear layers for megatron-core parallel ones holding this rank's slice of the weights."""

    def __init__(self, tp: int, rank: int, group):
        self.tp, self.rank, self.group = tp, rank, group
        self.config = model_parallel_config(tp)

    def column(self, linear: nn.Linear, rows: torch.Tensor | None = None) -> nn.Module:
        if rows is None:
            rows = torch.tensor_split(torch.arange(linear.out_features), self.tp)[self.rank]
            if linear.out_features % self.tp:
                raise ValueError(f"{linear.out_features} output features do not split over TP={self.tp}")
        layer = ColumnParallel(linear.in_features, linear.out_features, config=self.config,
                               init_method=nn.init.zeros_, bias=linear.bias is not None, gather_output=False,
                               tp_group=self.group)
        with torch.no_grad():
            layer.weight.copy_(linear.weight[rows])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias[rows])
        return self._same_grad_flags(layer, linear)

    def row(self, linear: nn.Linear) -> nn.Module:
        if linear.in_features % self.tp:
            raise ValueError(f"{linear.in_features} input features do not split over TP={self.tp}")
        cols = torch.tensor_split(torch.arange(linear.in_features), self.tp)[self.rank]
        layer = RowParallel(linear.in_features, linear.out_features, config=self.config, init_method=nn.init.zeros_,
                            bias=linear.bias is not None, input_is_parallel=True, skip_bias_add=False,
                            tp_group=self.group)
        with torch.no_grad():
            layer.weight.copy_(linear.weight[:, cols])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return self._same_grad_flags(layer, linear)

    @staticmethod
    def _same_grad_flags(layer: nn.Module, linear: nn.Linear) -> nn.Module:
        layer.weight.requires_grad_(linear.weight.requires_grad)
        if linear.bias is not None:
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer

    # ------------------------------------------------------------------------------------------- per block
    def self_attention(self, attn: SelfAttention) -> None:
        width = attn.out.in_features
        attn.qkv = self.column(attn.qkv, head_rows(width, attn.heads, self.tp, self.rank, fused=3))
        attn.out = self.row(attn.out)
        attn.heads //= self.tp  # the local heads; the layer's only TP-aware field

    def transformer_layer(self, layer: TransformerLayer) -> None:
        self.self_attention(layer.attn)
        layer.fc1, layer.fc2 = self.column(layer.fc1), self.row(layer.fc2)

    def block(self, block: SelfAttentionBlock) -> None:
        for layer in block.layers:
            self.transformer_layer(layer)

    def head(self, head: ProjectionHead) -> None:
        head.fc1, head.fc2 = self.column(head.fc1), self.row(head.fc2)

    def hf_encoder(self, encoder: nn.Module) -> None:
        """BERT/RoBERTa encoder layers (HF names). Attention reshapes with -1 heads, so only the Linears change."""
        heads = encoder.config.num_attention_heads
        width = encoder.config.hidden_size
        for layer in encoder.encoder.layer:
            attn = layer.attention.self
            rows = head_rows(width, heads, self.tp, self.rank)
            attn.query, attn.key, attn.value = (self.column(attn.query, rows), self.column(attn.key, rows),
                                                self.column(attn.value, rows))
            layer.attention.output.dense = self.row(layer.attention.output.dense)
            layer.intermediate.dense = self.column(layer.intermediate.dense)
            layer.output.dense = self.row(layer.output.dense)


def parallelize(model: nn.Module, tp: int, rank: int, group) -> nn.Module:
    """Split a BriVLMoCo's online and momentum towers identically (each built whole from the same weights), so
    ZeRO-3 partitions both the same way and the EMA stays a local update of each rank's own shard."""
    parallelize_towers(model.online, tp, rank, group)
    parallelize_towers(model.momentum, tp, rank, group)
    return model


def parallelize_towers(model: nn.Module, tp: int, rank: int, group) -> nn.Module:
    """Split a built BriVL (model.image, model.text) over the tensor-parallel group in place; TP=1 is a no-op."""
    if tp == 1:
        return model
    split = TensorParallelizer(tp, rank, group)
    split.hf_encoder(model.text.encoder)
    for tower in (model.image, model.text):
        split.block(tower.encoder if tower is model.image else tower.self_attention)
        split.head(tower.head)
    return model
