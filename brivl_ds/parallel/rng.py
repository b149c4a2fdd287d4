"""Dropout randomness under tensor parallelism (megatron-core's RNG tracker, and its CPU counterpart).

Replicated activations must get the same dropout mask on every TP rank (they are one tensor held TP times), so
they draw from the default generator, seeded the same on every rank. Split activations (the attention
probabilities of a rank's own heads) must get independent masks, or the ranks' heads would drop the same
positions: they draw from a second stream seeded `seed + 2718 + tp_rank` (megatron's offset), swapped in for the
forward of the modules that compute them.

On CUDA this is megatron-core's CudaRNGStatesTracker. It only knows CUDA generators, so on CPU (the tests, gloo)
a subclass does the same with the CPU generator. Either way the stream's state is part of every checkpoint, so a
resumed run draws the masks an uninterrupted one would.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

TP_STREAM = "model-parallel-rng"  # megatron-core's name for the per-TP-rank stream
TP_SEED_OFFSET = 2718  # megatron-core's model_parallel_cuda_manual_seed offset

_tracker = None  # megatron-core's CudaRNGStatesTracker or cpu_tracker_class()'s; None without TP


@functools.cache
def cpu_tracker_class() -> type:
    """megatron-core's tracker with the CPU default generator in place of the CUDA one (same names and states
    bookkeeping, so `get_states`/`set_states`/`fork` behave the same). Built on first use: importing megatron-core
    costs seconds, which runs without TP should not pay."""
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    class CPURNGStatesTracker(CudaRNGStatesTracker):
        def add(self, name: str, seed: int) -> None:
            if seed in self.seeds_ or name in self.states_:
                raise ValueError(f"RNG stream {name!r} or seed {seed} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = TP_STREAM):
            if name not in self.states_:
                raise KeyError(f"RNG stream {name!r} was not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CPURNGStatesTracker


def init_tensor_parallel_rng(seed: int, tp_rank: int, device: torch.device):
    """Create the per-TP-rank dropout stream for `device` (the default generator is left as it is)."""
    global _tracker
    if device.type == "cuda":
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        _tracker = get_cuda_rng_tracker()
        _tracker.reset()
    else:
        _tracker = cpu_tracker_class()()
    _tracker.add(TP_STREAM, seed + TP_SEED_OFFSET + tp_rank)
    return _tracker


def tensor_parallel_rng():
    """The tracker of this process, or None when tensor parallelism is off."""
    return _tracker


def rng_tracker_state() -> dict | None:
    return {name: state.clone() for name, state in _tracker.get_states().items()} if _tracker else None


def set_rng_tracker_state(states: dict | None) -> None:
    if (states is None) != (_tracker is None):
        raise RuntimeError("the checkpoint's tensor-parallel RNG streams do not match this run's tensor_parallel "
                           "setting")
    if _tracker is not None:
        _tracker.set_states({name: state.clone() for name, state in states.items()})


def checkpoint_rng_contexts():
    """torch.utils.checkpoint's context_fn: the recompute of a checkpointed block draws the per-TP-rank stream from
    where its forward did (torch itself restores the default generators), then the stream is put back."""
    if _tracker is None:
        return contextlib.nullcontext(), contextlib.nullcontext()
    at_forward = rng_tracker_state()

    @contextlib.contextmanager
    def recompute():
        now = rng_tracker_state()
        set_rng_tracker_state(at_forward)
        try:
            yield
        finally:
            set_rng_tracker_state(now)

    return contextlib.nullcontext(), recompute()


def fork_rng_in_forward(module: nn.Module) -> None:
    """Run `module`'s forward on the per-TP-rank stream (the module computes on split activations only)."""
    forward = module.forward

    @functools.wraps(forward)
    def forked(*args, **kwargs):
        if _tracker is None:
            raise RuntimeError("init_tensor_parallel_rng must run before a tensor-parallel forward")
        with _tracker.fork(TP_STREAM):
            return forward(*args, **kwargs)

    module.forward = forked
