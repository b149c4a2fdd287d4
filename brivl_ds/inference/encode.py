"""Embedding inputs with an exported model (brivl_ds.inference.exported.ExportedModel) in batches, for the embed,
zeroshot and retrieval commands.

Images go through one decode-and-skip loop (`decoded_batches`): each batch of input rows is read (bytes, or a file
path) and prepared one image at a time, and an image that cannot be read or decoded is skipped with a warning,
never fatal; the caller counts what was skipped from the rows kept.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)


def decoded_batches(model, images: Sequence, boxes: Sequence | None = None, rows: Sequence[int] | None = None,
                    batch_size: int = 64, name: Callable[[int], str] | None = None
                    ) -> Iterator[tuple[Sequence[int], list[int], list[tuple[torch.Tensor, ...]]]]:
    """For each batch of `batch_size` input rows (of `rows`, default every image): the batch's rows, the rows whose
    image was read and decoded, and their `model.prepare_image` outputs. `images[r]` is encoded bytes or a file
    path, `boxes[r]` its boxes (no `boxes`: the model's fallback layout). A row that fails is logged as
    "skipping <name(r)>: <error>" (default name: "image <r>") and left out."""
    rows = range(len(images)) if rows is None else rows
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        kept, prepared = [], []
        for r in batch:  # decoded one by one: a bad image is skipped, not fatal
            try:
                data = images[r] if isinstance(images[r], bytes) else Path(images[r]).read_bytes()
                prepared.append(model.prepare_image(data, boxes[r] if boxes else None))
                kept.append(r)
            except Exception as err:
                log.warning("skipping %s: %s", name(r) if name else f"image {r}", err)
        yield batch, kept, prepared


def embed_image_sources(model, images: list, boxes: list | None = None, batch_size: int = 64,
                        progress: bool = False, desc: str = "images") -> tuple[torch.Tensor, list[int]]:
    """Unit-norm embeddings [n_kept, D] (fp32) of images given as encoded bytes or file paths, and the indices of
    the images kept: one that cannot be read or decoded is skipped with a warning, never fatal."""
    out, kept = [], []
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress) as bar:
        for batch, good, prepared in decoded_batches(model, images, boxes, batch_size=batch_size):
            kept += good
            if prepared:
                out.append(model.embed_prepared(prepared).cpu())
            bar.update(len(batch))
    return (torch.cat(out) if out else torch.zeros(0, model.config.embed_dim)), kept


def embed_texts_batched(model, texts: list[str], batch_size: int = 256, progress: bool = False,
                        desc: str = "texts") -> torch.Tensor:
    """Unit-norm text embeddings [N, D] (fp32), `batch_size` texts per forward pass."""
    out = [model.embed_texts(texts[start:start + batch_size]).cpu()
           for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress)]
    return torch.cat(out) if out else torch.zeros(0, model.config.embed_dim)


def model_name(model) -> str:
    """The architecture, for the `model` field of CLIP_benchmark's layout (`pretrained` holds the folder)."""
    return f"brivl-{model.config.image.backbone}-{model.config.text.model_type}"
