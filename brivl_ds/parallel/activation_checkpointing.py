"""Activation checkpointing, applied to built online towers (the momentum towers run without a graph).

Each checkpointed block keeps only its inputs and is recomputed in the backward, non-reentrant (the form that
handles frozen parameters and keyword arguments, and that DeepSpeed ZeRO-3 supports). The libraries' own switches
are used where they exist (timm's set_grad_checkpointing, Hugging Face's activation_checkpointing_enable); our
self-attention layers are wrapped in place, so parameter names (and so checkpoints and the EMA pairs) do not
change. The recompute sees the same dropout masks as the forward: torch restores the default generators, and
`checkpoint_rng_contexts` the tensor-parallel stream.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from brivl_ds.config import ModelConfig
from brivl_ds.parallel.rng import checkpoint_rng_contexts


def checkpoint_forward(module: nn.Module) -> None:
    """Recompute `module`'s forward in the backward when it runs with a graph."""
    forward = module.forward

    @functools.wraps(forward)
    def checkpointed(*args, **kwargs):
        if not (module.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False,
                                                 context_fn=checkpoint_rng_contexts, **kwargs)

    module.forward = checkpointed


def apply_activation_checkpointing(towers: nn.Module, cfg: ModelConfig) -> None:
    """Switch on the configured checkpointing of a BriVL's towers (call it on the online towers only)."""
    if cfg.image.grad_checkpointing:
        from timm.layers import use_reentrant_ckpt

        if use_reentrant_ckpt():  # TIMM_REENTRANT_CKPT=1: with frozen lower blocks the blocks above get no gradient
            raise ValueError("timm is set to reentrant activation checkpointing (TIMM_REENTRANT_CKPT): it builds no "
                             "graph when a block's input needs no gradient, so blocks above frozen ones would "
                             "silently stop training; unset TIMM_REENTRANT_CKPT")
        towers.image.backbone.set_grad_checkpointing(True)
        for layer in towers.image.encoder.layers:
            checkpoint_forward(layer)
    if cfg.text.grad_checkpointing:
        towers.text.encoder.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": checkpoint_rng_contexts})
        for layer in towers.text.self_attention.layers:
            checkpoint_forward(layer)
