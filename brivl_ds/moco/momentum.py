"""Momentum (EMA) update theta_m <- m * theta_m + (1 - m) * theta, on each rank's own shards.

Under ZeRO-3 every rank owns the same slice of an online parameter and of its momentum copy (identical shapes
are partitioned identically), so the EMA is purely local: online values come from the optimizer's fp32 master
partition (`safe_get_local_fp32_param`), the momentum values go into the momentum parameter's partition
(`ds_tensor`). Partitioned parameters need no communication; only ZeRO-3's small persistent parameters are
re-gathered afterwards (see _refresh_persistent).

When the model runs in bf16 the momentum shards are bf16, and an EMA computed in bf16 stalls once (1 - m) * delta
is below bf16 resolution; so an fp32 copy of each momentum shard is kept here and the bf16 shard is refreshed
from it in the same fused pass (brivl_kernels.momentum_update_).

Online parameters that are frozen never change, so their momentum copies stay equal to them and are skipped.
"""
from __future__ import annotations

import torch
from torch import nn


def _is_zero3(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


class MomentumUpdater:
    def __init__(self, pairs: list[tuple[nn.Parameter, nn.Parameter]], impl: str = "auto"):
        self.impl = impl
        self.pairs = [(online, momentum) for online, momentum in pairs if online.requires_grad]
        self.zero3 = bool(self.pairs) and _is_zero3(self.pairs[0][1])
        # ZeRO-3 keeps small "persistent" parameters gathered between steps: see _refresh_persistent.
        self.persistent = [m for _, m in self.pairs if getattr(m, "ds_persist", False)]
        storage = [self._storage(m) for _, m in self.pairs]
        self.lowp = storage if storage and storage[0].dtype != torch.float32 else None
        self.master = [s.float().clone() for s in storage] if self.lowp is not None else storage

    def _storage(self, momentum: nn.Parameter) -> torch.Tensor:
        return momentum.ds_tensor.data.view(-1) if self.zero3 else momentum.data.view(-1)

    def _online_fp32(self, online: nn.Parameter) -> torch.Tensor:
        if self.zero3:
            from deepspeed.utils import safe_get_local_fp32_param

            value = safe_get_local_fp32_param(online)
            return value.view(-1)[: self._storage_numel(online)]
        if online.dtype != torch.float32:
            raise TypeError("without ZeRO-3 the online parameters must be fp32 to be the EMA's source")
        return online.data.view(-1)

    def _storage_numel(self, online: nn.Parameter) -> int:
        return online.ds_tensor.numel() if self.zero3 else online.numel()

    @torch.no_grad()
    def copy_online_to_momentum(self) -> None:
        """theta_m <- theta: the momentum encoders start as exact copies (of the fp32 master values)."""
        self.update(0.0)

    @torch.no_grad()
    def update(self, m: float) -> None:
        import brivl_kernels

        if not self.pairs:
            return
        online = [self._online_fp32(o) for o, _ in self.pairs]
        brivl_kernels.momentum_update_(self.master, online, m, momentum_lowp=self.lowp, impl=self.impl)
        self._refresh_persistent()

    def _refresh_persistent(self) -> None:
        """Re-gather the small parameters ZeRO-3 keeps gathered (`ds_persist`) from their just-written shards:
        release, then gather, as DeepSpeed itself does for online parameters after an optimizer step (all_gather
        alone skips parameters that are already available). Large parameters need nothing: ZeRO-3 released them
        and gathers them from the shards at the next forward."""
        if self.persistent:
            self.persistent[0].partition(self.persistent)
            self.persistent[0].all_gather(self.persistent)

    # Per-rank checkpoint state: the fp32 copies exist only in low-precision runs (else the shards are exact and
    # DeepSpeed's own checkpoint restores them).
    def state_dict(self) -> dict:
        return {"master": [t.cpu().clone() for t in self.master]} if self.lowp is not None else {}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.load_masters(self.masters_in(state))

    @staticmethod
    def masters_in(state: dict) -> list[torch.Tensor]:
        """The fp32 copies in a saved `state_dict` (this rank's pieces; empty for fp32 runs)."""
        return state.get("master", [])

    @torch.no_grad()
    def load_masters(self, masters: list[torch.Tensor]) -> None:
        """Set the fp32 copies (this rank's pieces, in `pairs` order) and the low-precision shards from them."""
        if self.lowp is None:
            return
        if len(masters) != len(self.master):
            raise ValueError("momentum checkpoint does not match this model (different parameter count)")
        for dst, src, low in zip(self.master, masters, self.lowp):
            dst.copy_(src)
            low.copy_(dst)
        self._refresh_persistent()
