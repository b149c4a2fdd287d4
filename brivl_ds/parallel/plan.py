"""The tensor-parallel split plan of a BriVL, as data: which Linears split and how (no megatron-core needed).

`parallelize` (tensor_parallel.py) cuts by it, `consolidate` puts checkpoints back together by it, and the presets
command counts each TP rank's parameters by it, so the three cannot disagree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def check_divisible(features: int, tp: int, what: str) -> None:
    if features % tp:
        raise ValueError(f"{features} {what} features of a split layer do not divide by tensor_parallel={tp}")


def head_rows(width: int, heads: int, tp: int, rank: int, fused: int = 1) -> torch.Tensor:
    """Output rows of rank `rank`'s whole heads in a projection laid out (fused, heads, head_dim)."""
    if heads % tp:
        raise ValueError(f"{heads} attention heads do not split over tensor_parallel={tp} (heads % TP must be 0)")
    block = width // tp
    return torch.cat([torch.arange(j * width + rank * block, j * width + (rank + 1) * block) for j in range(fused)])


def padded_vocab(vocab: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of TP (megatron's VocabParallelEmbedding needs equal slices)."""
    return -(-vocab // tp) * tp


@dataclass(frozen=True)
class Split:
    """One layer of a BriVL to split: a Linear `column` (output rows; by whole heads when `heads`, per each of
    `fused` projections stacked in the rows) or `row` (input columns; bias kept whole, added after the all-reduce),
    or the word embedding by `vocab` rows (padded to a multiple of TP)."""
    path: str
    style: str
    heads: int = 0
    fused: int = 1


WORD_EMBEDDING = "text.encoder.embeddings.word_embeddings"


def tensor_parallel_plan(model: nn.Module, vocab_parallel: bool = False) -> list[Split]:
    """Every layer that tensor parallelism splits in a BriVL (model.image, model.text); the rest is replicated."""
    plan: list[Split] = [Split(WORD_EMBEDDING, "vocab")] if vocab_parallel else []
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
            qkv = Split(f"{prefix}.attn.qkv", "column", layer.attn.heads, fused=3)
            plan += [qkv, Split(f"{prefix}.attn.out", "row"), Split(f"{prefix}.fc1", "column"),
                     Split(f"{prefix}.fc2", "row")]
    for i, block in enumerate(vit_blocks(model.image.backbone)):
        prefix = f"image.backbone.blocks.{i}"
        plan += [Split(f"{prefix}.attn.qkv", "column", block.attn.num_heads, fused=3),
                 Split(f"{prefix}.attn.proj", "row"), Split(f"{prefix}.mlp.fc1", "column"),
                 Split(f"{prefix}.mlp.fc2", "row")]
    for tower in ("image", "text"):
        plan += [Split(f"{tower}.head.fc1", "column"), Split(f"{tower}.head.fc2", "row")]
    return plan


def vit_blocks(backbone: nn.Module) -> list[nn.Module]:
    """A timm ViT backbone's transformer blocks, checked to split like the text encoder's layers (the fused qkv by
    whole heads); [] for a CNN, which stays replicated."""
    from timm.models.vision_transformer import Attention, Block

    blocks = list(getattr(backbone, "blocks", []))
    if not blocks or not all(isinstance(b, Block) for b in blocks):
        return []
    for i, block in enumerate(blocks):
        attn = block.attn
        if not isinstance(attn, Attention) or not isinstance(attn.norm, nn.Identity) or attn.gate is not None \
                or not isinstance(block.mlp.norm, nn.Identity) or attn.proj_drop.p:
            raise ValueError(f"image.backbone.blocks.{i}: tensor parallelism splits timm ViT blocks without "
                             "scale-norm, gates or projection dropout (the attention core's dropout is per rank)")
    return blocks


def check_backbone_splits(backbone: nn.Module, tp: int) -> None:
    """At TP > 1 a ViT backbone must be one whose blocks split (timm VisionTransformer); a CNN stays replicated.
    EVA blocks are refused rather than silently replicated: their attention builds the fused qkv bias from
    separate q/v parameters and reshapes to the full width, and EVA-02's SwiGLU normalises the hidden features
    (a norm over split activations); ZeRO-3 alone shards an EVA tower (see the memory planner)."""
    from timm.models.eva import Eva

    if tp > 1 and isinstance(backbone, Eva):
        raise ValueError(f"EVA backbones ({type(backbone).__name__}) are not tensor-parallel: train them with "
                         f"parallel.tensor_parallel=1 (ZeRO-3 shards them), or use a timm VisionTransformer")


def split_attention_cores(model: nn.Module) -> list[str]:
    """The modules whose forward computes on a rank's own heads only (q/k/v in, pre-output-projection out): their
    dropout (on the attention probabilities) must draw per-TP-rank masks."""
    cores = [f"text.encoder.encoder.layer.{i}.attention.self" for i in range(len(model.text.encoder.encoder.layer))]
    for path in ("image.encoder", "text.self_attention"):
        cores += [f"{path}.layers.{i}.attn" for i in range(len(model.get_submodule(path).layers))]
    return cores + [f"image.backbone.blocks.{i}.attn" for i in range(len(vit_blocks(model.image.backbone)))]


def local_numels(model: nn.Module, tp: int, vocab_parallel: bool = False) -> dict[str, int]:
    """Exact element count of every parameter of a BriVL (model.image, model.text) on one TP rank: split weights
    and column-parallel biases / TP, the vocabulary-parallel embedding's padded rows / TP, everything else whole.
    Works on the meta device."""
    check_backbone_splits(model.image.backbone, tp)
    plan = tensor_parallel_plan(model, vocab_parallel)
    for s in plan:
        if s.heads % tp:
            raise ValueError(f"{s.path}: {s.heads} heads do not split over tensor_parallel={tp}")
    split = {f"{s.path}.weight": tp for s in plan if s.style != "vocab"}
    split.update({f"{s.path}.bias": tp for s in plan if s.style == "column"})
    numels = {}
    for name, p in model.named_parameters():
        if name == f"{WORD_EMBEDDING}.weight" and vocab_parallel:
            numels[name] = padded_vocab(p.shape[0], tp) // tp * p.shape[1]
            continue
        divisor = split.get(name, 1)
        if p.numel() % divisor:
            raise ValueError(f"{name} ({p.numel()}) does not divide by tensor_parallel={tp}")
        numels[name] = p.numel() // divisor
    return numels


def parameters_per_tp_rank(model: nn.Module, tp: int, vocab_parallel: bool = False) -> dict[str, int]:
    """Parameter count each TP rank holds of each tower (before ZeRO-3 divides it by the DP size)."""
    numels = local_numels(model, tp, vocab_parallel)
    return {tower: sum(n for name, n in numels.items() if name.startswith(f"{tower}."))
            for tower in ("image", "text")}
