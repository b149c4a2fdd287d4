"""BriVLMoCo: the online towers, their momentum copies and the learnable temperature, as one module.

DeepSpeed wraps this whole module, so ZeRO-3 partitions the momentum encoders exactly like the online ones
(nothing is replicated on every rank); the momentum parameters simply have requires_grad=False and are left
out of the optimizer. The EMA itself is applied by brivl_ds.moco.momentum on each rank's own shards.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from brivl_ds.config import MocoConfig
from brivl_ds.models.brivl import Batch, BriVL
from brivl_ds.moco.loss import MocoOutputs, uses_momentum_keys


class BriVLMoCo(nn.Module):
    def __init__(self, online: BriVL, cfg: MocoConfig, momentum: BriVL | None = None):
        """`momentum`: a second instance built like `online` (required for partitioned parameters, which deepcopy
        cannot copy; see construction.towers.build_brivl_moco); None = a deepcopy of `online`."""
        super().__init__()
        self.cfg = cfg
        self.online = online
        self.momentum = momentum if momentum is not None else copy.deepcopy(online)
        for p in self.momentum.parameters():
            p.requires_grad_(False)
        # log(tau) keeps tau positive; shape [1] because DeepSpeed cannot broadcast 0-d parameters.
        self.log_tau = nn.Parameter(torch.tensor([math.log(cfg.tau_init)]), requires_grad=cfg.learn_tau)
        # In bf16 runs log_tau's forward value is rounded to bf16 (tau then moves in ~1.6 % steps while the
        # optimizer's fp32 master moves smoothly): the trainer keeps the master's value here (set_log_tau_master)
        # and the forward uses it, with the gradient still flowing through the parameter.
        self.log_tau_master: torch.Tensor | None = None
        self.with_keys = uses_momentum_keys(cfg.negatives)

    def set_log_tau_master(self, value: torch.Tensor | None) -> None:
        self.log_tau_master = None if value is None else value.detach().float().reshape(1).clone()

    def tau(self) -> torch.Tensor:
        log_tau = self.log_tau.float()
        if self.log_tau_master is not None:  # the fp32 value, straight through to the parameter's gradient
            log_tau = log_tau + (self.log_tau_master.to(log_tau.device) - log_tau).detach()
        # Clamped to a sane range: a runaway temperature makes the softmax one-hot (or flat) and stalls training.
        return log_tau.exp().clamp(self.cfg.tau_min, self.cfg.tau_max).reshape(())

    def parameter_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(online, momentum) parameter pairs in a fixed order; both towers have identical structure."""
        online = dict(self.online.named_parameters())
        return [(online[name], p) for name, p in self.momentum.named_parameters()]

    def train(self, mode: bool = True) -> "BriVLMoCo":
        super().train(mode)
        self.momentum.train(mode)  # same dropout/BN behaviour as the online towers (BN statistics stay frozen)
        return self

    def forward(self, images: torch.Tensor, boxes: torch.Tensor, box_mask: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Plain tensors in and out (ZeRO-3's hooks only see tensors); see `outputs` for the named form."""
        batch = Batch(images, boxes, box_mask, input_ids, attention_mask)
        image_query, text_query = self.online(batch)
        if not self.with_keys:  # in-batch negatives only: the momentum encoders are never run
            empty = image_query.new_empty(0, image_query.shape[1])
            return image_query, text_query, empty, empty, self.tau()
        with torch.no_grad():
            image_key, text_key = self.momentum(batch)
        return image_query, text_query, image_key.detach(), text_key.detach(), self.tau()


def run_moco(model, batch: Batch) -> MocoOutputs:
    """Call a BriVLMoCo (or the DeepSpeed engine wrapping it) on a batch."""
    return MocoOutputs(*model(*batch.tensors()))
