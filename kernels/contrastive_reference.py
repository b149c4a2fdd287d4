"""Plain-PyTorch queue-contrastive InfoNCE (the MoCo / BriVL loss): the specification the Triton kernel is tested
against, and the CPU fallback. It materialises the [B, K+1] logits, which is exactly what the kernel avoids.

Content ids: the queue holds keys of recent batches, so it can hold another copy of a query's own image or caption
(a duplicate in the data, or the same pair seen again within one queue length). Pushing the query away from it
punishes the model for being right; ids let the loss leave such false negatives out, row by row."""
from __future__ import annotations

import torch


def check_ids(q, queue, query_ids, queue_ids):
    """Both or neither; int64 [B, C] and [K, C] with the same C >= 1."""
    if (query_ids is None) != (queue_ids is None):
        missing = "queue_ids" if queue_ids is None else "query_ids"
        raise ValueError(f"query_ids and queue_ids must be given together; {missing} is missing")
    if query_ids is None:
        return
    for name, t, n, what in (("query_ids", query_ids, q.shape[0], "B"), ("queue_ids", queue_ids, queue.shape[0], "K")):
        if not torch.is_tensor(t) or t.dtype != torch.int64:
            raise ValueError(f"{name} must be an int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() != 2 or t.shape[0] != n or t.shape[1] < 1:
            raise ValueError(f"{name} must be [{what}, C] with {what}={n} and C >= 1; got {tuple(t.shape)}")
    if query_ids.shape[1] != queue_ids.shape[1]:
        raise ValueError(f"query_ids and queue_ids must have the same number of id columns C; got "
                         f"{query_ids.shape[1]} and {queue_ids.shape[1]}")


def check_inputs(q, k, queue, tau, queue_mask, query_ids=None, queue_ids=None):
    """Shape and type checks shared by both implementations; returns (B, K, D)."""
    if q.dim() != 2 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"queue must be [K, D] with D={q.shape[1]}; got {tuple(queue.shape)}")
    if q.shape[0] < 1:
        raise ValueError("need at least one query (B >= 1)")
    if not torch.is_tensor(tau) or tau.numel() != 1:
        raise ValueError("tau must be a tensor with one element (a 0-d tensor; it may require grad)")
    if queue_mask is not None:
        if queue_mask.dtype != torch.bool or queue_mask.shape != (queue.shape[0],):
            raise ValueError(f"queue_mask must be a bool tensor of shape [K]={queue.shape[0]}")
    check_ids(q, queue, query_ids, queue_ids)
    for name, t in (("q", q), ("k", k), ("queue", queue)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return q.shape[0], queue.shape[0], q.shape[1]


def queue_contrastive_loss_reference(q, k, queue, tau, queue_mask=None, query_ids=None, queue_ids=None):
    """mean_i -log( exp(q_i.k_i/tau) / (exp(q_i.k_i/tau) + sum_{j kept for i} exp(q_i.queue_j/tau)) ).

    q [B, D] queries, k [B, D] positive keys, queue [K, D] negatives, tau a one-element tensor, queue_mask an
    optional bool [K] (True = a valid row; False rows are left out of the sum, for a queue that is not full yet).
    query_ids int64 [B, C] and queue_ids int64 [K, C], optional and together: queue_j is left out of row i's sum
    when query_ids[i, c] == queue_ids[j, c] for any c (a copy of the query's own content is no negative). The
    positive is always kept, so a row left with no negatives has loss 0 and zero gradient.
    k and queue are treated as constants (detached), as in MoCo. Computes in fp32 (float64 for float64 inputs)
    and returns a 0-d tensor of that dtype; differentiable w.r.t. q and tau by autograd.
    """
    check_inputs(q, k, queue, tau, queue_mask, query_ids, queue_ids)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(acc)
    kf = k.detach().to(acc)
    pos = (qf * kf).sum(dim=1, keepdim=True)                       # [B, 1]
    neg = qf @ queue.detach().to(acc).t()                          # [B, K]
    logits = torch.cat([pos, neg], dim=1) / tau.reshape(()).to(acc)
    keep = None                                                    # [K] or [B, K], True = a negative of the row
    if queue_mask is not None:
        keep = queue_mask.to(logits.device)[None, :]
    if query_ids is not None:
        qi, ki = query_ids.to(logits.device), queue_ids.to(logits.device)
        distinct = (qi[:, None, :] != ki[None, :, :]).all(dim=2)  # [B, K]
        keep = distinct if keep is None else keep & distinct
    if keep is not None:  # mask after scaling: -inf / tau would give a nan tau-gradient
        keep = torch.cat([keep.new_ones(keep.shape[0], 1), keep], dim=1)
        logits = torch.where(keep, logits, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
