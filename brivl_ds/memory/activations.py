"""Activation memory of a training step, measured by running the towers on the meta device: shapes and dtypes are
real, nothing is allocated, so even the 10b preset is traced on a laptop in seconds.

A dispatch mode records every storage an op creates and drops it when its last tensor dies, so it sees what the
autograd graph keeps, whatever keeps it (tensors saved for backward, the inputs a checkpointed block holds for its
recompute), and the peak over the backward (recomputes, activation gradients). Gradients of parameters are dropped
as soon as they are accumulated, as ZeRO-3 moves them into its reduce bucket (counted with the model states).

`SavedForBackward` counts the bytes autograd saves in a real step, which is what the tests compare the trace with.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from brivl_ds.config import Config


class LiveStorages(TorchDispatchMode):
    """Live bytes of the storages created by ops while active, and their peak. Data-dependent scalars of meta
    tensors (e.g. Hugging Face's "is the attention mask all ones?") read as True / 1: the worst case for memory."""

    def __init__(self, states: nn.Module | None = None):
        """`states`: a module whose parameters and buffers are model states, not activations (views of them, such
        as a transposed weight, are not counted either)."""
        super().__init__()
        self.exclude = set() if states is None else {
            t.untyped_storage()._cdata for t in (*states.parameters(), *states.buffers())}
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            dtype = args[0].dtype
            return True if dtype == torch.bool else (1.0 if dtype.is_floating_point else 1)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self.live or key in self.exclude:
            return
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


@dataclass(frozen=True)
class StepActivations:
    """Bytes of one training step's activations at one batch size (per GPU)."""
    held: int  # alive when the online forward ends: what autograd saved, checkpointed blocks' inputs, the outputs
    peak: int  # the most alive at once over the online forward and backward
    momentum: int  # the most the no-grad momentum forward adds while the online activations are held

    @property
    def step_peak(self) -> int:
        return max(self.peak, self.held + self.momentum)


def meta_batch(cfg: Config, batch_size: int, dtype: torch.dtype, text_length: int | None = None):
    """A Batch on the meta device shaped like the collator's: images normalised to the compute dtype, the box
    sequence (max_boxes + the whole image), captions padded to text_length (max_length: the worst case)."""
    from brivl_ds.models.brivl import Batch

    image, text = cfg.model.image, cfg.model.text
    b, n, t = batch_size, image.max_boxes + 1, text_length or text.max_length
    meta = dict(device="meta")
    return Batch(torch.empty(b, 3, image.image_size, image.image_size, dtype=dtype, **meta),
                 torch.empty(b, n, 4, **meta), torch.empty(b, n, dtype=torch.bool, **meta),
                 torch.empty(b, t, dtype=torch.long, **meta), torch.empty(b, t, dtype=torch.long, **meta))


def build_meta_towers(cfg: Config, vocab_size: int, dtype: torch.dtype) -> nn.Module:
    """The online towers as training runs them (precision, frozen layers, checkpointing), on the meta device."""
    from brivl_ds.models.brivl import BriVL
    from brivl_ds.parallel.activation_checkpointing import apply_activation_checkpointing
    from brivl_ds.construction.zero_init import keep_float_buffers_fp32

    with torch.device("meta"):
        towers = BriVL(cfg.model, vocab_size=vocab_size)
    towers.to(dtype)
    keep_float_buffers_fp32(towers)  # BatchNorm statistics stay fp32 in bf16 runs, as in training
    apply_activation_checkpointing(towers, cfg.model)
    return towers.train()


def trace_step(cfg: Config, vocab_size: int, batch_size: int, dtype: torch.dtype,
               text_length: int | None = None, towers: nn.Module | None = None) -> StepActivations:
    """Run the online towers forward and backward and the momentum forward on the meta device, and measure."""
    towers = towers if towers is not None else build_meta_towers(cfg, vocab_size, dtype)
    hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
             for p in towers.parameters() if p.requires_grad]
    try:
        with LiveStorages(towers) as tracker:
            batch = meta_batch(cfg, batch_size, dtype, text_length)
            image_query, text_query = towers(batch)
            held = tracker.current
            online_peak = tracker.peak
            tracker.reset_peak()
            with torch.no_grad():  # the momentum towers: same shapes, no graph
                towers(batch)
            momentum = tracker.peak - held
            tracker.reset_peak()
            (image_query.float().sum() + text_query.float().sum()).backward()
            peak = max(online_peak, tracker.peak)
    finally:
        for hook in hooks:
            hook.remove()
    return StepActivations(held=held, peak=peak, momentum=momentum)


@dataclass(frozen=True)
class ActivationModel:
    """Activations as fixed + per-sample bytes, from traces at batch 1 and 2 (the towers are per-sample
    computations: no op mixes samples, so memory is affine in the batch)."""
    fixed: StepActivations
    per_sample: StepActivations

    def at(self, batch_size: int) -> StepActivations:
        return StepActivations(*(f + batch_size * s for f, s in zip(
            (self.fixed.held, self.fixed.peak, self.fixed.momentum),
            (self.per_sample.held, self.per_sample.peak, self.per_sample.momentum))))

    @classmethod
    def trace(cls, cfg: Config, vocab_size: int, dtype: torch.dtype, text_length: int | None = None,
              towers: nn.Module | None = None) -> "ActivationModel":
        towers = towers if towers is not None else build_meta_towers(cfg, vocab_size, dtype)
        one, two = (trace_step(cfg, vocab_size, b, dtype, text_length, towers) for b in (1, 2))
        per = StepActivations(two.held - one.held, two.peak - one.peak, two.momentum - one.momentum)
        return cls(StepActivations(one.held - per.held, one.peak - per.peak, one.momentum - per.momentum), per)


class SavedForBackward:
    """Bytes autograd saves for backward while active (each storage once), leaving out `module`'s parameters and
    buffers (model states, gathered or not): the activations a real step keeps."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.saved: dict[int, int] = {}

    @property
    def bytes(self) -> int:
        return sum(self.saved.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        # looked up per save, not once: under ZeRO-3 a parameter's storage is a new gathered buffer each forward
        states = {t.untyped_storage()._cdata for t in (*self.module.parameters(), *self.module.buffers())}
        if storage._cdata not in states:
            self.saved[storage._cdata] = storage.nbytes()
        return tensor

    def __enter__(self) -> "SavedForBackward":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
