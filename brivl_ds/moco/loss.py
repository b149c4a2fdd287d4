"""Cross-modal MoCo loss (paper eq. 3-5): L = L_I2T + L_T2I against the queues of the other modality."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from brivl_ds.moco.queue import KeyQueue


@dataclass
class MocoOutputs:
    image_query: torch.Tensor  # f^I(x), [B, D], unit norm, with grad
    text_query: torch.Tensor  # f^T(x), [B, D]
    image_key: torch.Tensor  # f_m^I(x), [B, D], no grad
    text_key: torch.Tensor  # f_m^T(x), [B, D]
    tau: torch.Tensor  # temperature, 0-d


def queue_contrastive_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: torch.Tensor,
                           impl: str = "auto") -> torch.Tensor:
    """mean_i -log(exp(q_i.k_i/tau) / (exp(q_i.k_i/tau) + sum_j exp(q_i.queue_j/tau))).

    Dispatches to brivl_kernels: the fused Triton kernel on CUDA (or under TRITON_INTERPRET=1), else the plain
    PyTorch reference. Inputs may be bf16, fp16 or fp32; accumulation is in fp32.
    """
    import brivl_kernels

    return brivl_kernels.queue_contrastive_loss(q, k, queue, tau.reshape(()), impl=impl)


def moco_loss(out: MocoOutputs, image_queue: KeyQueue, text_queue: KeyQueue, impl: str = "auto"
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Image queries against the text queue (I2T) plus text queries against the image queue (T2I).

    Each term is a mean over this rank's samples; DeepSpeed averages gradients over data-parallel ranks, which
    gives exactly the gradient of the mean over the global batch (no sample interacts with another except
    through the no-grad queues).
    """
    i2t = queue_contrastive_loss(out.image_query, out.text_key, text_queue.valid(), out.tau, impl)
    t2i = queue_contrastive_loss(out.text_query, out.image_key, image_queue.valid(), out.tau, impl)
    return i2t + t2i, {"loss_i2t": i2t.detach(), "loss_t2i": t2i.detach()}
