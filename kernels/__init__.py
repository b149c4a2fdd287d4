"""brivl_kernels: fused Triton kernels for BriVL training.

queue_contrastive_loss     MoCo/BriVL InfoNCE over a queue of negatives, logits never materialised
momentum_update_           fused EMA of flat (ZeRO-3) buffers, optional bf16 copy written in the same pass
AdamWHalfStates            AdamW with fp32 master weights and bf16 moments (stochastic rounding)

Each has a plain-PyTorch reference with the same signature (`*_reference`, or impl="reference"). impl="auto" runs
Triton on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 was exported before Python started; otherwise
it falls back to the reference. impl="triton" / "reference" force a path.
"""
from .contrastive import queue_contrastive_loss
from .contrastive_reference import queue_contrastive_loss_reference
from .momentum import momentum_update_, momentum_update_reference_
from .adamw_half import AdamWHalfStates

__all__ = [
    "queue_contrastive_loss",
    "queue_contrastive_loss_reference",
    "momentum_update_",
    "momentum_update_reference_",
    "AdamWHalfStates",
]
