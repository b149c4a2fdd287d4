"""The key queues of cross-modal MoCo, with all-gathered enqueue across data-parallel ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_keys(keys: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate the (detached) keys of every rank of `group` in rank order; sizes may differ between ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return keys
    world = dist.get_world_size(group)
    size = torch.tensor([keys.shape[0]], device=keys.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes_list = [int(s.item()) for s in sizes]
    longest = max(sizes_list)
    padded = keys.new_zeros((longest, keys.shape[1]))
    padded[: keys.shape[0]] = keys
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous(), group=group)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes_list)])


def no_content_ids(n: int, dim: int = 2, start: int = 0) -> torch.Tensor:
    """[n, dim] ids that match nothing: distinct negative values (real content ids are >= 0)."""
    return -(1 + start + torch.arange(n, dtype=torch.long)).unsqueeze(1).expand(n, dim).contiguous()


class KeyQueue:
    """A ring buffer of K normalised keys [K, D] and the content ids of their pairs [K, 2] (image, caption).

    The ids travel with the keys through the all-gathered enqueue and the checkpoints, so that a query's own image
    or caption in the queue can be masked out of its negatives (moco/loss.py). Rows never written, and rows
    restored from checkpoints that predate the ids, hold ids that match nothing.

    Rows are written from 0 upward, so until the queue is full its valid keys are the prefix [0, filled).
    Any batch size works (no `K % batch == 0` requirement): writes wrap around. When one enqueue brings more
    than K keys (global batch > K) only the newest K are kept, and they land exactly where sequential writes of
    the whole batch would have left them.
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if size < 0:
            raise ValueError(f"queue size must be >= 0, got {size}")
        self.keys = torch.zeros(size, dim, dtype=dtype, device=device)
        self.ids = no_content_ids(size).to(device)
        self.ptr = 0
        self.filled = 0

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    def valid(self) -> torch.Tensor:
        """The keys written so far ([filled, D]); all K once the queue has wrapped."""
        return self.keys[: self.filled]

    def valid_ids(self) -> torch.Tensor:
        """The content ids of `valid()`'s rows ([filled, 2] int64)."""
        return self.ids[: self.filled]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
        """All-gather this rank's keys and their content ids across `group` and write them; every rank ends with
        the same queue."""
        self.write(all_gather_keys(keys.detach().to(self.keys.dtype), group),
                   all_gather_keys(ids.to(self.ids.device), group))

    @torch.no_grad()
    def write(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        n, k = keys.shape[0], self.size
        if ids.shape != (n, self.ids.shape[1]):
            raise ValueError(f"ids must be [{n}, {self.ids.shape[1]}] for {n} keys, got {tuple(ids.shape)}")
        if k == 0 or n == 0:
            return
        start = self.ptr
        if n > k:  # only the newest K survive; they sit where writing all n in order would leave them
            start = (self.ptr + n - k) % k
            keys, ids = keys[n - k:], ids[n - k:]
        index = (start + torch.arange(keys.shape[0], device=self.keys.device)) % k
        self.keys[index] = keys.to(self.keys.device)
        self.ids[index] = ids.to(self.ids.device)
        self.ptr = (self.ptr + n) % k
        self.filled = min(self.filled + n, k)

    # Checkpointing: the queue is identical on every rank, so each rank saves only its slice of rows.
    def shard_state(self, rank: int, world: int) -> dict:
        rows = torch.tensor_split(torch.arange(self.size), world)[rank]
        start = int(rows[0]) if len(rows) else 0
        return {"rows": self.keys[start:start + len(rows)].cpu().clone(),
                "ids": self.ids[start:start + len(rows)].cpu().clone(), "start": start, "ptr": self.ptr,
                "filled": self.filled, "size": self.size}

    def load_shards(self, shards: list[dict]) -> None:
        """Rebuild from the slices of every rank (in any order)."""
        if not shards or shards[0]["size"] != self.size:
            raise ValueError(f"checkpoint queue size {shards[0]['size'] if shards else None} != {self.size}")
        for shard in shards:
            start, n = shard["start"], shard["rows"].shape[0]
            self.keys[start:start + n] = shard["rows"].to(self.keys)
            # checkpoints written before content ids: their keys mask nothing
            ids = shard["ids"] if "ids" in shard else no_content_ids(n, self.ids.shape[1], start)
            self.ids[start:start + n] = ids.to(self.ids)
        self.ptr, self.filled = shards[0]["ptr"], shards[0]["filled"]
