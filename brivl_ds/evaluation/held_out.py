"""The trainer's held-out evaluations with the online towers, every rank encoding its share of the rows (ZeRO-3
gathers parameters collectively, so every rank takes part in every forward): retrieval (encode every pair, then
Recall@K) and zero-shot classification (class prompts and labelled images, then evaluation/zeroshot.py's
accuracy)."""
from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from brivl_ds.data.dataset import PairDataset
from brivl_ds.distributed import DistInfo
from brivl_ds.evaluation.recall import recall_at_k
from brivl_ds.evaluation.zeroshot import (LabelledImages, is_shards, load_templates, read_classes, read_image_folder,
                                          read_labelled_shards, zeroshot_evaluate)
from brivl_ds.models.brivl import BriVL, normalize_images
from brivl_ds.moco.queue import all_gather_keys
from brivl_ds.parallel.groups import ParallelGroups

log = logging.getLogger(__name__)


def rows_of_this_rank(n: int, info: DistInfo, groups: ParallelGroups | None = None) -> tuple[list[int], int]:
    """This rank's contiguous slice of rows 0..n-1 and the longest slice's length (every rank pads to it). Split by
    data-parallel rank: the TP ranks of a group encode the same rows together."""
    rank, world = (groups.dp_rank, groups.dp) if groups else (info.rank, info.world)
    return torch.tensor_split(torch.arange(n), world)[rank].tolist(), -(-n // world)


@torch.no_grad()
def encode_sharded(n: int, encode_batch: Callable[[list[int]], torch.Tensor], batch_size: int, info: DistInfo,
                   groups: ParallelGroups | None = None) -> torch.Tensor:
    """[n, D] fp32 on the CPU of every rank, in row order, from encode_batch(indices) -> [len(indices), D].

    Each rank encodes a contiguous slice of the rows; slices are padded (with repeats of their last row) to the same
    number of batches because ZeRO-3 gathers parameters collectively (a rank that stopped early would hang the
    others); the padding is cut off before the all-gather over the data-parallel group."""
    rows, per_rank = rows_of_this_rank(n, info, groups)
    padded = rows + [rows[-1] if rows else 0] * (per_rank - len(rows))
    out = [encode_batch(padded[start:start + batch_size]).float() for start in range(0, per_rank, batch_size)]
    local = torch.cat(out)[: len(rows)] if out else torch.zeros(0, 0, device=info.device)
    return all_gather_keys(local, groups.dp_group if groups else None).cpu()


@torch.no_grad()
def encode(model: BriVL, dataset: PairDataset, collate, batch_size: int, info: DistInfo, dtype: torch.dtype,
           groups: ParallelGroups | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text embeddings of every row, in row order, on every rank (`encode_sharded`)."""
    was_training = model.training
    model.eval()

    def pair_batch(indices: list[int]) -> torch.Tensor:
        batch, _ = collate([dataset[i] for i in indices])
        image, text = model(batch.to(info.device, dtype=dtype))
        return torch.cat([image.float(), text.float()], 1)  # one gather for both

    try:
        both = encode_sharded(len(dataset), pair_batch, batch_size, info, groups)
    finally:
        model.train(was_training)
    image, text = both.tensor_split(2, dim=1)
    return image.contiguous(), text.contiguous()


def evaluate_retrieval(model: BriVL, dataset: PairDataset, collate, batch_size: int, info: DistInfo,
                       dtype: torch.dtype, groups: ParallelGroups | None = None,
                       embeddings_out: Path | None = None) -> dict[str, float]:
    image, text = encode(model, dataset, collate, batch_size, info, dtype, groups)
    if embeddings_out is not None and info.is_main:  # row order, fp32: for analysis, and to check exports against
        torch.save({"image": image.cpu(), "text": text.cpu()}, embeddings_out)
    result = recall_at_k(image.cpu(), text.cpu())
    result["skipped_rows"] = float(len(skipped_rows(dataset)))  # undecodable held-out rows, replaced (all ranks)
    return result


def skipped_rows(dataset: PairDataset) -> set[int]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return set(dataset.skipped)
    per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, dataset.skipped)
    return set().union(*per_rank)


@dataclass
class ZeroShotSet:
    """What the trainer classifies zero-shot at each evaluation."""
    data: LabelledImages
    classes: list[str]
    templates: list[str]


def read_zeroshot_set(path: str | Path, classes_file: str | Path, templates: str = "zh",
                      label_column: str = "label") -> ZeroShotSet:
    """An ImageFolder tree or labelled Parquet shards (the zero-shot command's readers), the class names and the
    templates (`zh`, `none` or a file)."""
    classes = read_classes(classes_file)
    data = (read_labelled_shards(path, classes, label_column) if is_shards(Path(path))
            else read_image_folder(path, classes))
    return ZeroShotSet(data, classes, load_templates(templates))


@torch.no_grad()
def evaluate_zeroshot(model: BriVL, zeroshot: ZeroShotSet, transform, tokenizer, max_length: int, batch_size: int,
                      info: DistInfo, dtype: torch.dtype, groups: ParallelGroups | None = None) -> dict[str, float]:
    """Zero-shot accuracy of the online towers: {"zeroshot_acc1", "zeroshot_acc5" (with more than 5 classes; top-5
    of 5 or fewer is 1 by definition), "zeroshot_n" (images classified)}, fractions, the same on every rank.

    evaluation/zeroshot.py's `zeroshot_evaluate` computes them from embeddings encoded here as the exported model
    encodes them (`transform`: the evaluation transform, boxes from the shards or the fallback layout; prompts
    tokenised like captions), class prompts and images sharded over the data-parallel ranks. An undecodable image
    is skipped (and logged by the rank that met it); its slot in the batch is filled with a blank picture so that
    every rank still runs the same forwards."""
    was_training = model.training
    model.eval()
    data = zeroshot.data

    def image_batch(indices: list[int]) -> torch.Tensor:
        prepared, ok = [], []
        for i in indices:
            source = data.images[i]
            try:
                encoded = source if isinstance(source, bytes) else Path(source).read_bytes()
                prepared.append(transform(encoded, (data.boxes[i] if data.boxes else None) or [], 0))
                ok.append(1.0)
            except Exception as err:  # undecodable: skipped and counted, never fatal (as in the zero-shot command)
                log.warning("skipping zero-shot image %s: %s", f"row {i}" if isinstance(source, bytes) else source, err)
                prepared.append(transform(_blank_image(), [], 0))
                ok.append(0.0)
        pixels, boxes, mask = (torch.stack([p[k] for p in prepared]).to(info.device) for k in range(3))
        emb = model.image(normalize_images(pixels, dtype), boxes, mask).float()
        return torch.cat([emb, torch.tensor(ok, device=emb.device)[:, None]], 1)  # the kept flag travels along

    def embed_images(images: list, boxes: list | None) -> tuple[torch.Tensor, list[int]]:
        out = encode_sharded(len(images), image_batch, batch_size, info, groups)
        kept = out[:, -1].nonzero().squeeze(1)
        return out[kept, :-1], kept.tolist()

    def embed_texts(prompts: list[str]) -> torch.Tensor:
        def text_batch(indices: list[int]) -> torch.Tensor:
            tokens = tokenizer([prompts[i] for i in indices], padding="longest", truncation=True,
                               max_length=max_length, return_tensors="pt")
            return model.text(tokens["input_ids"].to(info.device), tokens["attention_mask"].to(info.device))
        return encode_sharded(len(prompts), text_batch, batch_size, info, groups)

    try:
        result = zeroshot_evaluate(embed_images, embed_texts, data, zeroshot.classes, zeroshot.templates)
    finally:
        model.train(was_training)
    metrics = {"zeroshot_acc1": result["metrics"]["acc1"]}
    if len(zeroshot.classes) > 5:
        metrics["zeroshot_acc5"] = result["metrics"]["acc5"]
    return {**metrics, "zeroshot_n": float(result["n"])}


def _blank_image() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()
