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


class KeyQueue:
    """A ring buffer of K normalised keys [K, D].

    Rows are written from 0 upward, so until the queue is full its valid keys are the prefix [0, filled).
    Any batch size works (no `K % batch == 0` requirement): writes wrap around. When one enqueue brings more
    than K keys (global batch > K) only the newest K are kept, and they land exactly where sequential writes of
    the whole batch would have left them.
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if size < 0:
            raise ValueError(f"queue size must be >= 0, got {size}")
        self.keys = torch.zeros(size, dim, dtype=dtype, device=device)
        self.ptr = 0
        self.filled = 0

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    def valid(self) -> torch.Tensor:
        """The keys written so far ([filled, D]); all K once the queue has wrapped."""
        return self.keys[: self.filled]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
        """All-gather this rank's keys across `group` and write them; every rank ends with the same queue."""
        self.write(all_gather_keys(keys.detach().to(self.keys.dtype), group))

    @torch.no_grad()
    def write(self, keys: torch.Tensor) -> None:
        n, k = keys.shape[0], self.size
        if k == 0 or n == 0:
            return
        start = self.ptr
        if n > k:  # only the newest K survive; they sit where writing all n in order would leave them
            start = (self.ptr + n - k) % k
            keys = keys[n - k:]
        index = (start + torch.arange(keys.shape[0], device=self.keys.device)) % k
        self.keys[index] = keys.to(self.keys.device)
        self.ptr = (self.ptr + n) % k
        self.filled = min(self.filled + n, k)

    # Checkpointing: the queue is identical on every rank, so each rank saves only its slice of rows.
    def shard_state(self, rank: int, world: int) -> dict:
        rows = torch.tensor_split(torch.arange(self.size), world)[rank]
        start = int(rows[0]) if len(rows) else 0
        return {"rows": self.keys[start:start + len(rows)].cpu().clone(), "start": start, "ptr": self.ptr,
                "filled": self.filled, "size": self.size}

    def load_shards(self, shards: list[dict]) -> None:
        """Rebuild from the slices of every rank (in any order)."""
        if not shards or shards[0]["size"] != self.size:
            raise ValueError(f"checkpoint queue size {shards[0]['size'] if shards else None} != {self.size}")
        for shard in shards:
            self.keys[shard["start"]:shard["start"] + shard["rows"].shape[0]] = shard["rows"].to(self.keys)
        self.ptr, self.filled = shards[0]["ptr"], shards[0]["filled"]
