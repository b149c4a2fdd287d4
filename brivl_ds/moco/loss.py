"""The contrastive objective, with its choice of negatives, false-negative masking and per-step diagnostics.

Negatives (MocoConfig.negatives):
  queue        the paper's cross-modal MoCo (eq. 3-5): each image query against the text queue (I2T), each text
               query against the image queue (T2I); the positive is the pair's momentum key.
  batch        CLIP's InfoNCE over the all-gathered global batch: the other modality's online embeddings of every
               pair, gathered with gradients (no momentum keys, no queue).
  queue+batch  ALBEF-style: the global batch's momentum keys joined to the queue as negatives.
The loss is L_I2T + L_T2I in every mode, each term a mean over this rank's queries. DeepSpeed averages gradients
over data-parallel ranks, which gives exactly the gradient of the mean over the global batch (`batch` sends each
rank the gradient of its own rows from every rank's loss through the differentiable gather).

False negatives: with `mask_false_negatives`, a negative whose pair has the query's image or caption (content ids,
data/content_ids.py) is left out of the query's sum, inside the fused kernel as a per-row id compare.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from brivl_ds.config import MocoConfig
from brivl_ds.distributed import all_gather_with_grad
from brivl_ds.moco.queue import KeyQueue, all_gather_keys, no_content_ids

NEGATIVES = ("queue", "batch", "queue+batch")
STAT_KEYS = ("pos_cos", "neg_lse", "dup_share", "hardest_neg_cos")
"""Diagnostics per step, each the mean of both directions over this rank's queries: the positive cosine, the
log-sum-exp of the negatives' logits (cos / tau), the share of negatives that carry the query's image or caption
(whether or not they are masked) and the cosine of the closest negative the loss keeps."""


@dataclass
class MocoOutputs:
    image_query: torch.Tensor  # f^I(x), [B, D], unit norm, with grad
    text_query: torch.Tensor  # f^T(x), [B, D]
    image_key: torch.Tensor  # f_m^I(x), [B, D], no grad ([0, D] when the mode needs no momentum keys)
    text_key: torch.Tensor  # f_m^T(x), [B, D]
    tau: torch.Tensor  # temperature, 0-d


def uses_momentum_keys(negatives: str) -> bool:
    """Whether a mode reads momentum keys (and so needs the momentum encoders, their EMA and the queues)."""
    return negatives != "batch"


def queue_contrastive_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: torch.Tensor,
                           impl: str = "auto", query_ids: torch.Tensor | None = None,
                           queue_ids: torch.Tensor | None = None) -> torch.Tensor:
    """mean_i -log(exp(q_i.k_i/tau) / (exp(q_i.k_i/tau) + sum_j exp(q_i.queue_j/tau))), over the j whose ids share
    no column with row i's (all j without ids).

    Dispatches to brivl_kernels: the fused Triton kernel on CUDA (or under TRITON_INTERPRET=1), else the plain
    PyTorch reference. Inputs may be bf16, fp16 or fp32; accumulation is in fp32.
    """
    import brivl_kernels

    return brivl_kernels.queue_contrastive_loss(q, k, queue, tau.reshape(()), impl=impl, query_ids=query_ids,
                                                queue_ids=queue_ids)


def batch_contrastive_loss(q: torch.Tensor, keys: torch.Tensor, own: torch.Tensor, tau: torch.Tensor,
                           keep: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE of queries q [B, D] against all keys [N, D] (with gradients), row i's positive at keys[own[i]];
    keep [B, N] bool leaves negatives out (the positive is always kept). Computed in fp32."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = q.to(acc) @ keys.to(acc).t() / tau.to(acc)
    if keep is not None:  # mask after scaling: -inf / tau would give a nan tau-gradient
        logits = torch.where(keep, logits, float("-inf"))
    return F.cross_entropy(logits, own)


def id_matches(query_ids: torch.Tensor, key_ids: torch.Tensor) -> torch.Tensor:
    """[B, N] bool: key j shares the image or the caption of query i."""
    return (query_ids[:, None, :] == key_ids[None, :, :]).any(-1)


@dataclass
class Negatives:
    """What one direction's queries are contrasted with: keys [N, D], their content ids [N, C], and in `batch`
    mode each query's own row in them (the positive, which then must not count as a negative)."""
    keys: torch.Tensor
    ids: torch.Tensor
    own: torch.Tensor | None = None


class ContrastiveLoss:
    """The loss of one micro-batch, with its diagnostics; `cfg` chooses negatives and masking, `group` is the
    data-parallel group the batch is gathered over."""

    def __init__(self, cfg: MocoConfig, group: dist.ProcessGroup | None = None):
        if cfg.negatives not in NEGATIVES:
            raise ValueError(f"moco.negatives must be one of {NEGATIVES}, got {cfg.negatives!r}")
        self.negatives, self.mask, self.impl, self.group = cfg.negatives, cfg.mask_false_negatives, cfg.loss_impl, group

    def __call__(self, out: MocoOutputs, ids: torch.Tensor, image_queue: KeyQueue, text_queue: KeyQueue
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(L_I2T + L_T2I, detached parts: loss_i2t, loss_t2i and STAT_KEYS); ids [B, 2] the pairs' content ids."""
        ids = ids.to(out.image_query.device)
        if self.negatives == "batch":
            i2t, t2i, stats = self._batch(out, ids)
        else:
            query_ids, batch_ids = ids, None
            if self.negatives == "queue+batch":
                # The global batch's momentum keys go in front of the queue, and each query must skip its own key
                # there (it is the positive): a third id column numbers the batch's rows (the queue's number none).
                slots = torch.arange(len(ids), device=ids.device, dtype=torch.long)[:, None]
                query_ids = torch.cat([ids, slots + _rank(self.group) * (1 << 32)], 1)
                batch_ids = all_gather_keys(query_ids, self.group)
            i2t, i2t_stats = self._against_keys(out.image_query, out.text_key, query_ids, batch_ids, text_queue, out)
            t2i, t2i_stats = self._against_keys(out.text_query, out.image_key, query_ids, batch_ids, image_queue, out)
            stats = {key: (i2t_stats[key] + t2i_stats[key]) / 2 for key in STAT_KEYS}
        return i2t + t2i, {"loss_i2t": i2t.detach(), "loss_t2i": t2i.detach(), **stats}

    def _against_keys(self, q: torch.Tensor, k: torch.Tensor, query_ids: torch.Tensor,
                      batch_ids: torch.Tensor | None, queue: KeyQueue, out: MocoOutputs
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`queue` and `queue+batch` (batch_ids: the global batch's ids with their row numbers): the fused
        queue-contrastive loss against the queue (and the batch's keys)."""
        negatives = Negatives(queue.valid(), queue.valid_ids())
        if batch_ids is not None:
            queue_ids = torch.cat([negatives.ids, no_content_ids(len(negatives.ids), 1).to(batch_ids)], 1)
            batch_keys = all_gather_keys(k.detach(), self.group).to(negatives.keys.dtype)
            negatives = Negatives(torch.cat([batch_keys, negatives.keys]), torch.cat([batch_ids, queue_ids]))
        if self.mask:
            kernel_query_ids, kernel_key_ids = query_ids, negatives.ids
        elif self.negatives == "queue+batch":  # only the own-key column
            kernel_query_ids, kernel_key_ids = query_ids[:, 2:], negatives.ids[:, 2:]
        else:
            kernel_query_ids = kernel_key_ids = None
        loss = queue_contrastive_loss(q, k, negatives.keys, out.tau, self.impl, kernel_query_ids, kernel_key_ids)
        keep = None if kernel_query_ids is None else ~id_matches(kernel_query_ids, kernel_key_ids)
        not_own = None if self.negatives == "queue" else ~id_matches(query_ids[:, 2:], negatives.ids[:, 2:])
        duplicate = id_matches(query_ids[:, :2], negatives.ids[:, :2])
        return loss, contrastive_stats(q, k, negatives.keys, out.tau, keep, duplicate, candidates=not_own)

    def _batch(self, out: MocoOutputs, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """`batch`: InfoNCE over the global batch, the other modality's online embeddings gathered with grad."""
        images, start = all_gather_with_grad(out.image_query, self.group)
        texts, _ = all_gather_with_grad(out.text_query, self.group)
        all_ids = all_gather_keys(ids, self.group)
        own = start + torch.arange(len(ids), device=ids.device)
        duplicate = id_matches(ids, all_ids)
        duplicate[torch.arange(len(ids)), own] = False  # the positive is not a duplicate of itself
        keep = ~duplicate if self.mask else None
        i2t = batch_contrastive_loss(out.image_query, texts, own, out.tau, keep)
        t2i = batch_contrastive_loss(out.text_query, images, own, out.tau, keep)
        not_own = torch.ones_like(duplicate)
        not_own[torch.arange(len(ids)), own] = False
        counted = not_own if keep is None else not_own & keep
        stats = [contrastive_stats(q, keys[own], keys, out.tau, counted, duplicate, candidates=not_own)
                 for q, keys in ((out.image_query, texts), (out.text_query, images))]
        return i2t, t2i, {key: (stats[0][key] + stats[1][key]) / 2 for key in STAT_KEYS}


def _rank(group) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def contrastive_stats(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, tau: torch.Tensor,
                      keep: torch.Tensor | None, duplicate: torch.Tensor, candidates: torch.Tensor | None = None
                      ) -> dict[str, torch.Tensor]:
    """STAT_KEYS for queries q [B, D] with positives k [B, D] against negatives [N, D]. keep [B, N]: the negatives
    the loss counts (None = all); duplicate [B, N]: those sharing the query's image or caption; candidates [B, N]:
    what counts as a negative at all (None = all N). No host synchronisation."""
    qf = q.detach().float()
    cos = qf @ negatives.detach().float().t()
    keep = torch.ones_like(cos, dtype=torch.bool) if keep is None else keep
    candidates = torch.ones_like(keep) if candidates is None else candidates
    have = keep.any(1)
    rows = have.sum().clamp(min=1)
    neg_lse = torch.logsumexp(torch.where(keep, cos / tau.detach().float(), float("-inf")), 1)
    hardest = torch.where(keep, cos, float("-inf")).amax(1) if cos.shape[1] else cos.new_zeros(len(q))
    dup = (duplicate & candidates).sum(1) / candidates.sum(1).clamp(min=1)
    return {"pos_cos": (qf * k.detach().float()).sum(1).mean(),
            "neg_lse": torch.where(have, neg_lse, 0.0).sum() / rows,
            "dup_share": dup.float().mean(),
            "hardest_neg_cos": torch.where(have, hardest, 0.0).sum() / rows}


def moco_loss(out: MocoOutputs, image_queue: KeyQueue, text_queue: KeyQueue, impl: str = "auto"
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The paper's loss in one process (queue negatives, nothing masked): L_I2T + L_T2I and its two parts; the
    plain reference the distributed trainer is tested against."""
    i2t = queue_contrastive_loss(out.image_query, out.text_key, text_queue.valid(), out.tau, impl)
    t2i = queue_contrastive_loss(out.text_query, out.image_key, image_queue.valid(), out.tau, impl)
    return i2t + t2i, {"loss_i2t": i2t.detach(), "loss_t2i": t2i.detach()}
