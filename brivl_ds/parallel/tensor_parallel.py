"""Tensor parallelism with megatron-core, applied to a built BriVL (torchtitan's parallelize step).

The towers are written with plain nn.Linear layers; `parallelize_towers` swaps the ones worth splitting for
megatron-core's ColumnParallelLinear / RowParallelLinear and copies each rank's slice of the existing weights into
them, so a model built (and loaded from pretrained files) whole becomes its TP shard exactly:

  - text encoder (HF BERT/RoBERTa) layers: query/key/value column-parallel by whole heads, attention output
    row-parallel; intermediate column-parallel, output row-parallel;
  - both towers' self-attention blocks: the fused qkv split per q, k and v by whole heads (its rows are laid out
    (3, heads, head_dim), so a plain chunk of the fused weight would hand one rank all of q and part of k), the
    output row-parallel; fc1 column-parallel, fc2 row-parallel;
  - a ViT or EVA image backbone's blocks (timm): the fused qkv (or EVA's q, k, v) by whole heads, EVA's q / v
    bias vectors by the same heads, proj row-parallel, fc1 (SwiGLU's fc1_g and fc1_x) column, fc2 row (a CNN
    backbone stays replicated: megatron-core has no convolutions);
  - both projection heads: fc1 column-parallel, fc2 row-parallel, so the [B, D] embedding comes out whole on every
    TP rank and the loss, queues and kernels are unchanged;
  - optionally (`parallel.vocab_parallel`) the word embedding, by rows of the vocabulary padded to a multiple of TP.

The attention cores (q/k/v to the pre-output activations, a rank's own heads) run on the per-TP-rank RNG stream
(rng.py), so their attention dropout masks are independent across TP ranks; all other dropout sees replicated
activations and draws the same mask on every TP rank.

Everything else (a CNN backbone, RoIAlign, embeddings, LayerNorms, box projections, row-parallel biases) is replicated
on the TP ranks. A column-parallel layer all-reduces its input gradient and a row-parallel one its output, so
replicated parameters get identical gradients on every TP rank.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import ContextManager

import torch
from megatron.core.model_parallel_config import ModelParallelConfig
import torch.nn.functional as F
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                           set_tensor_model_parallel_attributes)
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    reduce_from_tensor_model_parallel_region)
from torch import nn

from brivl_ds.models.layers import SelfAttention
from brivl_ds.parallel.rng import fork_rng_in_forward
from brivl_ds.parallel.tp_plan import (Split, check_backbone_splits, check_divisible, head_rows, padded_vocab,
                                       split_attention_cores, tensor_parallel_plan)
from brivl_ds.parallel.zero import gathered, is_partitioned


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


class VocabParallel(VocabParallelEmbedding):
    """megatron-core's VocabParallelEmbedding that keeps nn.Embedding's padding_idx (whose row gets no gradient)
    on the rank that holds it, so training matches the unsplit embedding."""

    def __init__(self, *args, padding_idx: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        inside = padding_idx is not None and self.vocab_start_index <= padding_idx < self.vocab_end_index
        self.local_padding_idx = padding_idx - self.vocab_start_index if inside else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        outside = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)
        local = (ids - self.vocab_start_index).masked_fill(outside, 0)
        rows = F.embedding(local, self.weight, padding_idx=self.local_padding_idx)
        rows = rows.masked_fill(outside.unsqueeze(-1), 0.0)  # other ranks' tokens: their rows come in the reduce
        return reduce_from_tensor_model_parallel_region(rows, group=self.tp_group)


def sum_gradients_over_tp(norm: nn.Module, group) -> None:
    """A LayerNorm applied to split activations only (a ViT's QK-norm over a rank's own heads) gets a partial
    gradient on each TP rank; its weights pass through megatron's copy-to-TP-region (identity forward, all-reduce
    backward) so every rank gets the sum, as megatron-core all-reduces its qk_layernorm gradients. DeepSpeed would
    not (it averages over data-parallel ranks only)."""
    if not isinstance(norm, nn.LayerNorm):
        raise ValueError(f"{type(norm).__name__} on split heads: only LayerNorm QK-norm is supported with TP")

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight, bias = (copy_to_tensor_model_parallel_region(p, group=group) if p is not None else None
                        for p in (norm.weight, norm.bias))
        return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)

    norm.forward = forward


def _vocab_parallel_embedding(embedding: nn.Embedding, tp: int, rank: int, group, config, construct) -> nn.Module:
    """Rank `rank`'s rows of `embedding`, the vocabulary padded with zero rows to a multiple of TP (never looked
    up: token ids stay below the real vocabulary)."""
    vocab, width = embedding.weight.ds_shape if is_partitioned(embedding.weight) else embedding.weight.shape
    with construct():
        layer = VocabParallel(padded_vocab(vocab, tp), width, init_method=nn.init.zeros_, config=config,
                              tp_group=group, padding_idx=embedding.padding_idx)
    start, end = layer.vocab_start_index, layer.vocab_end_index
    with gathered([embedding.weight], modifier_rank=None), gathered([layer.weight]), torch.no_grad():
        rows = embedding.weight[start:min(end, vocab)]
        layer.weight.zero_()
        layer.weight[:rows.shape[0]].copy_(rows)
    layer.weight.requires_grad_(embedding.weight.requires_grad)
    return layer


class _Vector(nn.Module):
    """Hosts one 1-D parameter, so that building it under zero.Init partitions it like any module's."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))


def _split_vector(vector: nn.Parameter, split: Split, tp: int, rank: int, construct) -> nn.Parameter:
    """Rank `rank`'s whole heads of a per-head vector parameter (an EVA attention's q / v bias), marked as
    tensor-parallel for DeepSpeed's gradient norm."""
    width = vector.ds_shape[0] if is_partitioned(vector) else vector.shape[0]
    rows = head_rows(width, split.heads, tp, rank)
    with gathered([vector], modifier_rank=None):
        value = vector.detach()[rows].clone()
    with construct():
        local = _Vector(len(rows)).weight
    with gathered([local]), torch.no_grad():
        local.copy_(value)
    local.requires_grad_(vector.requires_grad)
    set_tensor_model_parallel_attributes(local, True, 0, 1)
    return local


def eva_attention_forward(attn: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None,
                          attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """timm's EvaAttention.forward on a rank's own heads: the qkv (or q, k, v) projections are column-parallel,
    the q / v bias vectors hold the local heads, and the output projection (row-parallel) all-reduces. timm's own
    forward cannot run split: it applies the fused weight with F.linear (bypassing the layer that all-reduces the
    input gradient) and reshapes to the full width. Scale-norm and gates are refused by the plan."""
    from timm.layers import apply_rot_embed_cat

    B, N, _ = x.shape
    if attn.qkv is not None:
        qkv = attn.qkv(x)
        if attn.q_bias is not None:
            qkv = qkv + torch.cat((attn.q_bias, attn.k_bias.to(attn.q_bias.dtype), attn.v_bias))
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (proj(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                       dropout_p=attn.attn_drop.p if attn.training else 0.0)
    return attn.proj_drop(attn.proj(x.transpose(1, 2).reshape(B, N, -1)))


def _parallel_linear(linear: nn.Linear, split: Split, tp: int, rank: int, group, config, construct) -> nn.Module:
    """A megatron-core layer holding rank `rank`'s slice of `linear` (weights, bias, requires_grad)."""
    bias = linear.bias is not None
    out_features, in_features = linear.out_features, linear.in_features
    if split.style == "column":
        if split.heads:
            rows = head_rows(linear.out_features // split.fused, split.heads, tp, rank, split.fused)
        else:
            check_divisible(linear.out_features, tp, "output")
            rows = torch.tensor_split(torch.arange(linear.out_features), tp)[rank]
        with construct():
            layer = ColumnParallel(in_features, out_features, config=config, init_method=nn.init.zeros_,
                                   bias=bias, gather_output=False, tp_group=group)
        with gathered(linear.parameters(), modifier_rank=None):  # read-only: one layer whole at a time
            weight, bias_value = linear.weight[rows].clone(), linear.bias[rows].clone() if bias else None
    else:
        check_divisible(in_features, tp, "input")
        cols = torch.tensor_split(torch.arange(in_features), tp)[rank]
        with construct():
            layer = RowParallel(in_features, out_features, config=config, init_method=nn.init.zeros_,
                                bias=bias, input_is_parallel=True, skip_bias_add=False, tp_group=group)
        with gathered(linear.parameters(), modifier_rank=None):
            weight, bias_value = linear.weight[:, cols].clone(), linear.bias.clone() if bias else None
    with gathered(layer.parameters()), torch.no_grad():  # this DP group's rank 0 writes, ZeRO-3 re-partitions
        layer.weight.copy_(weight)
        if bias:
            layer.bias.copy_(bias_value)
    layer.weight.requires_grad_(linear.weight.requires_grad)
    if bias:
        layer.bias.requires_grad_(linear.bias.requires_grad)
    return layer


def parallelize_towers(model: nn.Module, tp: int, rank: int, group, vocab_parallel: bool = False,
                       construct: Callable[[], ContextManager] = contextlib.nullcontext) -> nn.Module:
    """Split a built BriVL (model.image, model.text) over the tensor-parallel group in place; TP=1 is a no-op.
    Its forward then needs the per-TP-rank RNG stream (rng.init_tensor_parallel_rng). A model built under
    zero.Init is split one layer at a time (gathered over its data-parallel group, sliced, and the slice built
    under `construct`, the same zero.Init), so no rank holds more than one whole layer."""
    if tp == 1:
        return model
    check_backbone_splits(model.image.backbone, tp)
    from timm.models.eva import EvaAttention
    from timm.models.vision_transformer import Attention

    config = model_parallel_config(tp)
    for split in tensor_parallel_plan(model, vocab_parallel):
        parent_path, name = split.path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        if split.style == "vocab":
            setattr(parent, name, _vocab_parallel_embedding(getattr(parent, name), tp, rank, group, config,
                                                            construct))
            continue
        if split.style == "vector":
            setattr(parent, name, _split_vector(getattr(parent, name), split, tp, rank, construct))
            continue
        setattr(parent, name, _parallel_linear(getattr(parent, name), split, tp, rank, group, config, construct))
        if isinstance(parent, SelfAttention) and name == "qkv":
            parent.heads //= tp  # it now computes its local heads; the layer's only TP-aware field
        elif name in ("qkv", "q_proj") and isinstance(parent, (Attention, EvaAttention)):  # its local heads
            parent.num_heads //= tp
            if isinstance(parent, Attention):  # timm's ViT attention reshapes to attn_dim
                parent.attn_dim //= tp
            else:  # EVA: its zero k bias shrinks with the heads, and its forward runs split (see above)
                if parent.k_bias is not None:
                    parent.k_bias = parent.k_bias.new_zeros(parent.k_bias.shape[0] // tp)
                parent.forward = functools.partial(eva_attention_forward, parent)
            for norm in (parent.q_norm, parent.k_norm):
                if not isinstance(norm, nn.Identity):
                    sum_gradients_over_tp(norm, group)
    for path in split_attention_cores(model):
        fork_rng_in_forward(model.get_submodule(path))
    return model


def parallelize(model: nn.Module, tp: int, rank: int, group, vocab_parallel: bool = False,
                construct: Callable[[], ContextManager] = contextlib.nullcontext) -> nn.Module:
    """Split a BriVLMoCo's online and momentum towers identically (each built whole from the same weights), so
    ZeRO-3 partitions both the same way and the EMA stays a local update of each rank's own shard."""
    parallelize_towers(model.online, tp, rank, group, vocab_parallel, construct)
    parallelize_towers(model.momentum, tp, rank, group, vocab_parallel, construct)
    return model
