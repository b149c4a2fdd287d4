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
    the word embedding by `vocab` rows (padded to a multiple of TP), or a `vector` parameter (`path` names the
    parameter: an EVA attention's q / v bias) by whole heads."""
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
        plan += _backbone_block_plan(f"image.backbone.blocks.{i}", block)
    for tower in ("image", "text"):
        plan += [Split(f"{tower}.head.fc1", "column"), Split(f"{tower}.head.fc2", "row")]
    return plan


def _backbone_block_plan(prefix: str, block: nn.Module) -> list[Split]:
    """A timm ViT or EVA block: q, k and v by whole heads (timm's fused qkv rows are (3, heads, head_dim); an EVA's
    separate q / v bias vectors likewise), the output projection row-parallel; the MLP's input projection(s)
    column-parallel (SwiGLU's gate and value both), its output projection row-parallel."""
    from timm.layers import GluMlp
    from timm.models.eva import EvaAttention

    attn, heads = block.attn, block.attn.num_heads
    if getattr(attn, "qkv", None) is not None:
        plan = [Split(f"{prefix}.attn.qkv", "column", heads, fused=3)]
    else:  # an EVA with separate projections
        plan = [Split(f"{prefix}.attn.{n}", "column", heads) for n in ("q_proj", "k_proj", "v_proj")]
    if isinstance(attn, EvaAttention) and attn.q_bias is not None:
        plan += [Split(f"{prefix}.attn.{n}", "vector", heads) for n in ("q_bias", "v_bias")]
    plan.append(Split(f"{prefix}.attn.proj", "row"))
    mlp = block.mlp
    if hasattr(mlp, "fc1_g"):  # SwiGLU: gate and value projections
        plan += [Split(f"{prefix}.mlp.{n}", "column") for n in ("fc1_g", "fc1_x")]
    elif isinstance(mlp, GluMlp):  # GluMlp: one fc1 whose rows are (2, hidden): each half split alike, one feature a "head"
        plan.append(Split(f"{prefix}.mlp.fc1", "column", heads=mlp.fc2.in_features, fused=2))
    else:
        plan.append(Split(f"{prefix}.mlp.fc1", "column"))
    return plan + [Split(f"{prefix}.mlp.fc2", "row")]



def vit_blocks(backbone: nn.Module) -> list[nn.Module]:
    """A timm ViT or EVA backbone's transformer blocks; [] for a CNN, which stays replicated."""
    from timm.models.eva import EvaBlock, EvaBlockPostNorm
    from timm.models.vision_transformer import Block

    blocks = list(getattr(backbone, "blocks", []))
    return blocks if blocks and all(isinstance(b, (Block, EvaBlock, EvaBlockPostNorm)) for b in blocks) else []


def _unsplittable(block: nn.Module) -> str | None:
    """Why a ViT / EVA block cannot be split by the plan above, or None."""
    from timm.layers import GluMlp, Mlp, SwiGLU
    from timm.models.eva import EvaAttention
    from timm.models.vision_transformer import Attention

    attn, mlp = block.attn, block.mlp
    if not isinstance(attn, (Attention, EvaAttention)):
        return f"{type(attn).__name__} attention is not split by the plan"
    if not isinstance(attn.norm, nn.Identity) or attn.gate is not None:
        return "attention with scale-norm or a gate (a norm or gate over split heads)"
    if attn.proj_drop.p:
        return "projection dropout (the attention core's dropout is per rank)"
    if type(mlp) not in (Mlp, SwiGLU, GluMlp) or not isinstance(mlp.norm, nn.Identity):
        return f"{type(mlp).__name__} with a norm over its hidden features (EVA-02's scale_mlp)"
    if isinstance(mlp, GluMlp) and mlp.chunk_dim != -1:
        return "a GluMlp that chunks along another dimension than the features"
    return None


def check_backbone_splits(backbone: nn.Module, tp: int) -> None:
    """At TP > 1 every ViT / EVA block must split by the plan; a CNN stays replicated (megatron-core has no
    convolutions). Refused with the reason rather than silently replicated or wrongly split."""
    if tp == 1:
        return
    if getattr(backbone, "rope_mixed", False):
        raise ValueError("image.backbone: per-depth, per-head mixed RoPE does not split over tensor parallelism")
    for i, block in enumerate(vit_blocks(backbone)):
        if (reason := _unsplittable(block)) is not None:
            raise ValueError(f"image.backbone.blocks.{i}: tensor parallelism cannot split {reason}; train with "
                             f"parallel.tensor_parallel=1 (ZeRO-3 alone shards it) or another backbone")


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
    split = {f"{s.path}.weight": tp for s in plan if s.style in ("column", "row")}
    split.update({f"{s.path}.bias": tp for s in plan if s.style == "column"})
    split.update({s.path: tp for s in plan if s.style == "vector"})
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
