"""One launch over many 1-D tensors: a table of chunks, each addressed relative to the first tensor of its role.

For every role (e.g. momentum, online, low-precision copy) the kernel gets the first tensor as a base pointer and,
per chunk of CHUNK elements, the element offset of that chunk's tensor from the base, the chunk's start, the
tensor's length and a running element index (a counter for random streams). One launch then covers a whole list
of parameters or ZeRO partitions, whatever their number. Tables are cached by the tensors' addresses, which are
stable across steps for parameters and optimizer state.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

ROW = 8  # int64 fields per chunk: up to 4 role offsets, start, numel, rng offset, padding
MAX_ROLES = 4
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 64


def as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def check_flat(name: str, tensors: list, dtypes, numels=None, device=None):
    """All 1-D, contiguous, one dtype from `dtypes`, on one device, lengths equal to `numels` if given."""
    if not tensors:
        raise ValueError(f"{name}: empty list")
    dtype = tensors[0].dtype
    for i, t in enumerate(tensors):
        if not torch.is_tensor(t) or t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{name}[{i}] must be a contiguous 1-D tensor")
        if t.dtype != dtype or dtype not in dtypes:
            raise TypeError(f"{name}[{i}]: all tensors must share one dtype from {dtypes}; got {t.dtype}")
        if device is not None and t.device != device:
            raise ValueError(f"{name}[{i}] is on {t.device}, expected {device}")
        if numels is not None and t.numel() != numels[i]:
            raise ValueError(f"{name}[{i}] has {t.numel()} elements, expected {numels[i]}")


def chunk_table(roles: list[list[torch.Tensor]], chunk: int, streams=None) -> tuple[torch.Tensor, bool]:
    """(int64 table [n_chunks, ROW] on the tensors' device, all-16-byte-aligned flag). Roles share lengths.

    The rng field holds streams[i] for chunks of tensor i when `streams` is given, else the running element index.
    """
    if len(roles) > MAX_ROLES:
        raise ValueError("too many roles")
    device = roles[0][0].device
    key = (chunk, device, tuple((t.data_ptr(), t.numel(), t.element_size()) for r in roles for t in r),
           None if streams is None else tuple(streams))
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    rows = []
    aligned = all(t.data_ptr() % 16 == 0 for r in roles for t in r)
    rng = 0
    for i in range(len(roles[0])):
        n = roles[0][i].numel()
        offs = []
        for r in roles:
            delta = r[i].data_ptr() - r[0].data_ptr()
            size = r[i].element_size()
            if delta % size:
                raise ValueError("tensors of one role must be aligned to their element size")
            offs.append(delta // size)
        offs += [0] * (MAX_ROLES - len(offs))
        for start in range(0, n, chunk):
            rows.append(offs + [start, n, rng + start if streams is None else streams[i], 0])
        rng += n
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, ROW).to(device)
    _CACHE[key] = (table, aligned)
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return table, aligned


def bump_version(*tensors):
    """Tell autograd that a kernel wrote into these tensors (in-place ops through PyTorch do this themselves)."""
    for t in tensors:
        torch.autograd.graph.increment_version(t)
