"""fp32 -> bf16 rounding on the bits, in Triton and in PyTorch, so that both paths produce identical results.

Round to nearest even is what `.to(torch.bfloat16)` does; the Triton interpreter's own conversion truncates, so
the kernels round on the bits instead. Stochastic rounding adds 16 random bits below the bf16 mantissa and
truncates: it rounds up with probability equal to the discarded fraction, so it is unbiased. The random bits come
from a counter-based hash (murmur3's 32-bit finaliser) of (stream, element index), not from a stateful generator:
the reference computes the very same bits, and a resumed run repeats them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

M32 = 0xFFFFFFFF
_C1, _C2 = 0x85EBCA6B, 0xC2B2AE35


@triton.jit
def _fmix32(h):
    """murmur3 finaliser on uint32 tensors: a bijection whose output bits all depend on all input bits."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _bf16_rne(x):
    """fp32 -> bf16, round to nearest even (NaN stays NaN)."""
    bits = x.to(tl.uint32, bitcast=True)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    r = tl.where(x != x, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _bf16_sr(x, rnd16):
    """fp32 -> bf16, stochastic: `rnd16` holds 16 uniform random bits (uint32 in [0, 65536))."""
    bits = x.to(tl.uint32, bitcast=True)
    r = (bits + rnd16) >> 16  # sign-magnitude: rounds the magnitude up with probability = dropped fraction
    r = tl.where(x != x, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


# ---- PyTorch twins (int64 arithmetic on values < 2^32; products split to stay below 2^63) ----

def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & M32


def fmix32_torch(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, _C1)
    h = h ^ (h >> 13)
    h = _mul32(h, _C2)
    return h ^ (h >> 16)


def fmix32_int(h: int) -> int:
    """The same on a Python int (for per-launch seeds)."""
    h &= M32
    h ^= h >> 16
    h = (h * _C1) & M32
    h ^= h >> 13
    h = (h * _C2) & M32
    return h ^ (h >> 16)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.float().contiguous().view(torch.int32).to(torch.int64) & M32


def _to_bf16(bits16: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    bits16 = torch.where(torch.isnan(x), torch.full_like(bits16, 0x7FC0), bits16)
    return bits16.to(torch.int32).to(torch.int16).view(torch.bfloat16)  # int32 -> int16 keeps the low 16 bits


def bf16_rne_torch(x: torch.Tensor) -> torch.Tensor:
    b = _bits(x)
    return _to_bf16((b + 0x7FFF + ((b >> 16) & 1)) >> 16 & 0xFFFF, x)


def bf16_sr_torch(x: torch.Tensor, rnd16: torch.Tensor) -> torch.Tensor:
    return _to_bf16(((_bits(x) + rnd16) >> 16) & 0xFFFF, x)


def chunk_seed(seed: int, stream: int, start: int) -> int:
    """Per-chunk hash state: element e of a stream then uses fmix32((e mod 2^32) ^ chunk_seed)."""
    return fmix32_int(fmix32_int(stream ^ seed) ^ (start >> 32))


def random_bits_torch(seed: int, stream: int, n: int, device, start: int = 0) -> torch.Tensor:
    """The 32 random bits the kernel draws for elements start..start+n-1 of `stream`."""
    idx = torch.arange(start, start + n, dtype=torch.int64, device=device)
    s = fmix32_torch((idx >> 32) ^ fmix32_int(stream ^ seed))
    return fmix32_torch((idx & M32) ^ s)
