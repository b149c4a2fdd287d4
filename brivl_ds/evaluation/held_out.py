"""Held-out retrieval: encode every pair with the online towers (sharded over ranks), then Recall@K."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from brivl_ds.data.dataset import PairDataset
from brivl_ds.distributed import DistInfo
from brivl_ds.evaluation.recall import recall_at_k
from brivl_ds.models.brivl import BriVL
from brivl_ds.moco.queue import all_gather_keys
from brivl_ds.parallel.groups import ParallelGroups


@torch.no_grad()
def encode(model: BriVL, dataset: PairDataset, collate, batch_size: int, info: DistInfo, dtype: torch.dtype,
           groups: ParallelGroups | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text embeddings of every row, in row order, on every rank.

    Each rank encodes a contiguous slice; slices are padded to the same number of batches because ZeRO-3 gathers
    parameters collectively (a rank that stopped early would hang the others).
    """
    was_training = model.training
    model.eval()
    # Split by data-parallel rank (the TP ranks of a group encode the same rows together)
    rank, world = (groups.dp_rank, groups.dp) if groups else (info.rank, info.world)
    rows = torch.tensor_split(torch.arange(len(dataset)), world)[rank].tolist()
    per_rank = -(-len(dataset) // world)
    padded = rows + [rows[-1] if rows else 0] * (per_rank - len(rows))
    # A private generator: creating the iterator draws a seed, which must not move the global RNG (the
    # dropout masks of the training steps after an evaluation would then depend on whether one happened).
    loader = DataLoader(padded, batch_size=batch_size, shuffle=False, generator=torch.Generator(),
                        collate_fn=lambda items: collate([dataset[i] for i in items]))
    image, text = [], []
    for batch, _ in loader:
        batch = batch.to(info.device, dtype=dtype)
        i, t = model(batch)
        image.append(i.float())
        text.append(t.float())
    model.train(was_training)
    image_local = torch.cat(image)[: len(rows)]
    text_local = torch.cat(text)[: len(rows)]
    group = groups.dp_group if groups else None
    return all_gather_keys(image_local, group), all_gather_keys(text_local, group)


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
