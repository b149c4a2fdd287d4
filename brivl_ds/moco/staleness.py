"""How stale is the queue? A diagnostic probe (train.staleness_every): the queue's keys were encoded by momentum
encoders of up to K / (global batch) steps ago; the probe re-encodes the same samples with today's momentum encoder
and compares the loss against the real queue with the loss against the re-encoded one.

The probe batch is the newest step's last micro-batch, whose own keys were just enqueued: both losses leave out
the negatives that carry its pairs' content ids (its own keys, and any other copy of its images or captions), so
the comparison is of the other keys only, whatever `moco.mask_false_negatives` says.

It keeps this rank's input batches of the steps whose keys are still in the queue (CPU copies: about K / ranks
samples), so it is for studies on small presets, not for production runs. It runs in eval mode (no dropout, so no
random numbers are drawn and training is unchanged; the presets that use it have no dropout).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import replace

import torch
import torch.nn.functional as F

from brivl_ds.config import MocoConfig
from brivl_ds.models.brivl import Batch
from brivl_ds.moco.loss import ContrastiveLoss, MocoOutputs
from brivl_ds.moco.queue import KeyQueue, all_gather_keys

STALENESS_KEYS = ("stale_loss", "fresh_loss", "key_drift", "probe_coverage")
"""stale_loss / fresh_loss: the probe batch's loss against the real queues / the re-encoded ones; key_drift: the
mean of 1 - cos(real key, re-encoded key) over the re-encoded rows; probe_coverage: the share of the queues' valid
rows that were re-encoded (below 1 right after a resume: older keys are kept as they are)."""


class StalenessProbe:
    def __init__(self, cfg: MocoConfig, every: int, keys_per_step: int, group=None):
        """keys_per_step: the keys one optimizer step enqueues (the global batch)."""
        self.every, self.group = every, group
        self.loss_fn = ContrastiveLoss(replace(cfg, mask_false_negatives=True), group)
        queue_size = cfg.queue_size
        held = max(1, math.ceil(queue_size / keys_per_step))
        self.steps: deque[list[tuple[Batch, torch.Tensor]]] = deque(maxlen=held)

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0 and len(self.steps) > 0

    def record(self, micro_batches: list[tuple[Batch, torch.Tensor]]) -> None:
        """An applied step's micro-batches (CPU batches and their content ids), whose keys were just enqueued."""
        self.steps.append(micro_batches)

    @torch.no_grad()
    def measure(self, model, image_queue: KeyQueue, text_queue: KeyQueue, device: torch.device,
                dtype: torch.dtype) -> dict[str, float]:
        """Collective (every rank calls it at the same step). `model` is the BriVLMoCo (or its engine's module)."""
        was_training = model.training
        model.eval()
        fresh = [_copy(image_queue), _copy(text_queue)]
        written, keys_written = 0, []
        for step in self.steps:  # as the trainer enqueued them: this rank's micro-batches, then all-gathered
            encoded = [model.momentum(batch.to(device, dtype=dtype)) for batch, _ in step]
            ids = torch.cat([i for _, i in step]).to(device)
            image = all_gather_keys(torch.cat([e[0] for e in encoded]).to(image_queue.keys.dtype), self.group)
            text = all_gather_keys(torch.cat([e[1] for e in encoded]).to(text_queue.keys.dtype), self.group)
            keys_written.append((image, text, all_gather_keys(ids, self.group)))
            written += image.shape[0]
        for queue, real in zip(fresh, (image_queue, text_queue)):
            queue.ptr = (real.ptr - written) % max(1, real.size)
        for image, text, ids in keys_written:
            fresh[0].write(image, ids)
            fresh[1].write(text, ids)
        # The probe batch: the newest step's last micro-batch, through today's online and momentum encoders.
        batch, ids = self.steps[-1][-1]
        image_query, text_query, image_key, text_key, tau = model(*batch.to(device, dtype=dtype).tensors())
        out = MocoOutputs(image_query, text_query, image_key, text_key, tau)
        stale, _ = self.loss_fn(out, ids, image_queue, text_queue)
        renewed, _ = self.loss_fn(out, ids, *fresh)
        covered = min(written, text_queue.filled)
        drift = [_drift(real, new, covered) for real, new in zip((image_queue, text_queue), fresh)]
        model.train(was_training)
        return {"stale_loss": stale.item(), "fresh_loss": renewed.item(), "key_drift": sum(drift) / 2,
                "probe_coverage": covered / max(1, text_queue.filled)}


def _copy(queue: KeyQueue) -> KeyQueue:
    copy = KeyQueue(queue.size, queue.keys.shape[1], queue.keys.dtype, queue.keys.device)
    copy.keys.copy_(queue.keys)
    copy.ids.copy_(queue.ids)
    copy.ptr, copy.filled = queue.ptr, queue.filled
    return copy


def _drift(real: KeyQueue, fresh: KeyQueue, rows: int) -> float:
    """Mean 1 - cos over the `rows` newest rows (those the probe re-encoded)."""
    if rows == 0 or real.size == 0:
        return 0.0
    index = (real.ptr - 1 - torch.arange(rows, device=real.keys.device)) % real.size
    return (1 - F.cosine_similarity(real.keys[index].float(), fresh.keys[index].float(), dim=-1)).mean().item()
