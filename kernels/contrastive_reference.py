"""Plain-PyTorch queue-contrastive InfoNCE (the MoCo / BriVL loss): the specification the Triton kernel is tested
against, and the CPU fallback. It materialises the [B, K+1] logits, which is exactly what the kernel avoids."""
from __future__ import annotations

import torch


def check_inputs(q, k, queue, tau, queue_mask):
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
    for name, t in (("q", q), ("k", k), ("queue", queue)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return q.shape[0], queue.shape[0], q.shape[1]


def queue_contrastive_loss_reference(q, k, queue, tau, queue_mask=None):
    """mean_i -log( exp(q_i.k_i/tau) / (exp(q_i.k_i/tau) + sum_j exp(q_i.queue_j/tau)) ).

    q [B, D] queries, k [B, D] positive keys, queue [K, D] negatives, tau a one-element tensor, queue_mask an
    optional bool [K] (True = a valid row; False rows are left out of the sum, for a queue that is not full yet).
    k and queue are treated as constants (detached), as in MoCo. Computes in fp32 (float64 for float64 inputs)
    and returns a 0-d tensor of that dtype; differentiable w.r.t. q and tau by autograd.
    """
    check_inputs(q, k, queue, tau, queue_mask)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(acc)
    kf = k.detach().to(acc)
    pos = (qf * kf).sum(dim=1, keepdim=True)                       # [B, 1]
    neg = qf @ queue.detach().to(acc).t()                          # [B, K]
    logits = torch.cat([pos, neg], dim=1) / tau.reshape(()).to(acc)
    if queue_mask is not None:  # mask after scaling: -inf / tau would give a nan tau-gradient
        keep = torch.cat([queue_mask.new_ones(1), queue_mask]).to(logits.device)
        logits = torch.where(keep[None, :], logits, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
