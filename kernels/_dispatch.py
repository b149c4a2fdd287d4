"""Choosing between the Triton kernels and their plain-PyTorch references.

Triton decides at *decoration* time whether `@triton.jit` builds a compiled kernel or an interpreted one
(`TRITON_INTERPRET=1` must be in the environment before `triton` is imported). So the Triton path can run on CPU
tensors only if the interpreter was on when our kernels were defined; we check that instead of trusting the
environment variable at call time, and say how to fix it when the two disagree.
"""
from __future__ import annotations

import functools
import os

import torch
from triton.runtime.interpreter import InterpretedFunction

IMPLS = ("auto", "triton", "reference")


def interpreter_requested() -> bool:
    """True when TRITON_INTERPRET is set to a true value now."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def is_interpreted(kernel) -> bool:
    """True when `kernel` (a @triton.jit object) was built by the interpreter."""
    return isinstance(kernel, InterpretedFunction)


def resolve(impl: str, device: torch.device, kernel) -> str:
    """Return "triton" or "reference" for tensors on `device`.

    auto:      Triton on CUDA, or on CPU when the kernels run in the Triton interpreter; reference otherwise.
    triton:    Triton or a clear error.  reference: always the reference.
    `kernel` is one of the module's @triton.jit kernels; it tells whether the interpreter built them.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return "reference"
    interpreted = is_interpreted(kernel)
    if device.type == "cuda":
        return "triton"  # compiled, or interpreted on CUDA tensors when TRITON_INTERPRET=1 was set at import
    if interpreted:
        return "triton"
    if interpreter_requested():
        # The variable is set now, but triton was imported (and our kernels defined) before it was.
        raise RuntimeError(
            "TRITON_INTERPRET=1 is set, but brivl_kernels' Triton kernels were compiled-mode objects: triton was "
            "imported before the variable was set. Export TRITON_INTERPRET=1 before starting Python "
            "(or before the first `import triton` / `import brivl_kernels`)."
        )
    if impl == "triton":
        raise RuntimeError(
            f"impl='triton' on {device.type} tensors needs a CUDA device or the Triton interpreter "
            "(export TRITON_INTERPRET=1 before starting Python); use impl='auto' or 'reference' to fall back"
        )
    return "reference"


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in for the interpreter (to still test splitting)."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 2


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
