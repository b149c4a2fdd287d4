"""Fused momentum-encoder update: momentum <- m * momentum + (1 - m) * online, in place, one pass.

Works on flat 1-D buffers (ZeRO-3 partitions, or any parameters' data) and on lists of them in a single launch.
When `momentum_lowp` (bf16) is given, the same pass writes the rounded result into it, so a bf16 copy used by the
momentum encoder's forward needs no second read of the fp32 buffer. Memory-bound: 12 bytes per element
(fp32 read + write of momentum, fp32 read of online), 14 with the bf16 copy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _dispatch
from ._multi_tensor import ROW, as_list, bump_version, check_flat, chunk_table
from ._rounding import _bf16_rne

CHUNK = 65536  # elements per program: ~1.5k programs for 1e8 elements
BLOCK = 2048   # elements per loop step: 4 warps x 32 threads x 16 (four 16-byte vectors each)
MOMENTUM_DTYPES = (torch.float32,)
ONLINE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _momentum_block(mom_ptr, onl_ptr, low_ptr, idx, msk, m, one_minus_m, HAS_LOWP: tl.constexpr):
    x = tl.load(mom_ptr + idx, mask=msk)
    y = tl.load(onl_ptr + idx, mask=msk).to(tl.float32)
    r = x * m + y * one_minus_m
    tl.store(mom_ptr + idx, r, mask=msk)
    if HAS_LOWP:
        tl.store(low_ptr + idx, _bf16_rne(r), mask=msk)


@triton.jit
def _momentum_kernel(mom_ptr, onl_ptr, low_ptr, table_ptr, m, one_minus_m,
                     HAS_LOWP: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                     ROW: tl.constexpr):
    row = table_ptr + tl.program_id(0) * ROW
    off_m = tl.load(row + 0)
    off_o = tl.load(row + 1)
    off_l = tl.load(row + 2)
    start = tl.load(row + 4)
    n = tl.load(row + 5)
    if ALIGNED:  # every tensor 16-byte aligned and chunks start at multiples of CHUNK: allow 16-byte accesses
        off_m = tl.multiple_of(off_m, 4)
        off_o = tl.multiple_of(off_o, 4)
        off_l = tl.multiple_of(off_l, 8)
        start = tl.multiple_of(start, CHUNK)
    mom = mom_ptr + off_m
    onl = onl_ptr + off_o
    low = low_ptr + off_l
    n_here = tl.minimum(n - start, CHUNK)
    n_full = n_here // BLOCK * BLOCK
    for i in range(0, n_full, BLOCK):  # unmasked body: vectorises
        idx = start + i + tl.arange(0, BLOCK)
        _momentum_block(mom, onl, low, idx, None, m, one_minus_m, HAS_LOWP)
    if n_full < n_here:  # ragged tail of the tensor
        idx = start + n_full + tl.arange(0, BLOCK)
        _momentum_block(mom, onl, low, idx, idx < start + n_here, m, one_minus_m, HAS_LOWP)


def _check(momentum, online, momentum_lowp, m):
    moms, onls = as_list(momentum), as_list(online)
    if len(moms) != len(onls):
        raise ValueError(f"{len(moms)} momentum buffers but {len(onls)} online buffers")
    check_flat("momentum", moms, MOMENTUM_DTYPES)
    numels = [t.numel() for t in moms]
    check_flat("online", onls, ONLINE_DTYPES, numels, moms[0].device)
    lows = None
    if momentum_lowp is not None:
        lows = as_list(momentum_lowp)
        if len(lows) != len(moms):
            raise ValueError(f"{len(moms)} momentum buffers but {len(lows)} momentum_lowp buffers")
        check_flat("momentum_lowp", lows, (torch.bfloat16,), numels, moms[0].device)
    m = float(m)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"m must lie in [0, 1], got {m}")
    return moms, onls, lows, m


@torch.no_grad()
def momentum_update_reference_(momentum, online, m, momentum_lowp=None):
    """Plain PyTorch: momentum = m * momentum + (1 - m) * online (fp32), then momentum_lowp = bf16(momentum)."""
    moms, onls, lows, m = _check(momentum, online, momentum_lowp, m)
    for i, (mom, onl) in enumerate(zip(moms, onls)):
        mom.mul_(m).add_(onl, alpha=1.0 - m)
        if lows is not None:
            lows[i].copy_(mom)


@torch.no_grad()
def momentum_update_(momentum, online, m, momentum_lowp=None, impl="auto"):
    """In place: momentum <- m * momentum + (1 - m) * online; momentum_lowp <- bf16(new momentum) if given.

    momentum: fp32 1-D tensor or list of them (e.g. ZeRO-3 partitions); online: same lengths, fp32/bf16/fp16;
    momentum_lowp: None or bf16 tensors of the same lengths; m: a Python float in [0, 1].
    One kernel launch for the whole list. impl: "auto" | "triton" | "reference" (see brivl_kernels).
    """
    moms, onls, lows, m = _check(momentum, online, momentum_lowp, m)
    if _dispatch.resolve(impl, moms[0].device, _momentum_kernel) == "reference":
        return momentum_update_reference_(moms, onls, m, lows)
    roles = [moms, onls] + ([lows] if lows is not None else [])
    table, aligned = chunk_table(roles, CHUNK)
    if table.shape[0] == 0:
        return None
    _momentum_kernel[(table.shape[0],)](
        moms[0], onls[0], lows[0] if lows is not None else moms[0], table, m, 1.0 - m,
        HAS_LOWP=lows is not None, ALIGNED=aligned, CHUNK=CHUNK, BLOCK=BLOCK, ROW=ROW, num_warps=4)
    bump_version(*moms, *(lows or []))
    return None


def aot_cases():
    """Configurations for aot_check.py."""
    sig = dict(mom_ptr="*fp32", onl_ptr="*fp32", low_ptr="*bf16", table_ptr="*i64", m="fp32", one_minus_m="fp32")
    return [(f"momentum update{' + bf16 copy' if low else ''}", _momentum_kernel, sig,
             dict(HAS_LOWP=low, ALIGNED=True, CHUNK=CHUNK, BLOCK=BLOCK, ROW=ROW), 4, 3) for low in (False, True)]
