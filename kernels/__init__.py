"""brivl_kernels: fused Triton kernels for BriVL training.

queue_contrastive_loss     MoCo/BriVL InfoNCE over a queue of negatives, logits never materialised
momentum_update_           fused EMA of flat (ZeRO-3) buffers, optional bf16 copy written in the same pass
AdamWHalfStates            AdamW with fp32 master weights and bf16 moments (stochastic rounding)

Each has a plain-PyTorch reference with the same signature (`*_reference`, or impl="reference"). impl="auto" runs
Triton on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 was exported before Python started; otherwise
it falls back to the reference. impl="triton" / "reference" force a path.
"""
from . import _dispatch
from .contrastive import _fwd_kernel, queue_contrastive_loss
from .contrastive_reference import queue_contrastive_loss_reference
from .momentum import _momentum_kernel, momentum_update_, momentum_update_reference_
from .adamw_half import _adamw_kernel, AdamWHalfStates

__all__ = [
    "queue_contrastive_loss",
    "queue_contrastive_loss_reference",
    "momentum_update_",
    "momentum_update_reference_",
    "AdamWHalfStates",
    "path_taken",
]

_KERNELS = {"queue_contrastive_loss": _fwd_kernel, "momentum_update_": _momentum_kernel,
            "AdamWHalfStates": _adamw_kernel}


def path_taken(op: str, impl: str, device) -> str:
    """"triton" or "reference": the path `op` takes for `impl` on tensors of `device` (raises as the op would)."""
    import torch

    return _dispatch.resolve(impl, torch.device(device), _KERNELS[op])
