"""Micro-batching: items of concurrent requests run through the model together, so throughput grows with load.

The first waiting request opens a window of `window_s`; the batch runs when the window closes or `max_batch` items
are waiting. One batch runs at a time, in a worker thread (the model is one resource, and the event loop must keep
accepting requests meanwhile). With batching off, each request runs alone, in arrival order: the baseline the
benchmark compares against.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class BatchingConfig:
    enabled: bool = True
    max_batch: int = 32  # items per model call
    window_s: float = 0.005  # how long the first waiting request waits for company
    max_waiting: int = 1024  # items waiting beyond this are refused (503): shed load rather than queue without end


@dataclass
class _Request:
    items: Sequence
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class Overloaded(RuntimeError):
    """More items wait than `max_waiting`: the caller should answer 503 and the client retry later."""


class MicroBatcher:
    """`await submit(items)` returns `run(items)`'s rows for exactly these items, run in a batch with others'."""

    def __init__(self, run: Callable[[list], torch.Tensor], config: BatchingConfig, executor: ThreadPoolExecutor,
                 on_batch: Callable[[int, float], None] | None = None):
        self.run, self.config, self.executor = run, config, executor
        self.on_batch = on_batch  # (items, seconds) of each model call, for the metrics
        self._queue: asyncio.Queue[_Request] | None = None
        self._task: asyncio.Task | None = None
        self._waiting_items = 0

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    @property
    def waiting(self) -> int:
        """Items queued and not yet taken into a batch."""
        return self._waiting_items

    async def submit(self, items: Sequence) -> torch.Tensor:
        if self._waiting_items + len(items) > self.config.max_waiting:
            raise Overloaded(f"{self._waiting_items} items are waiting for the model (limit "
                             f"{self.config.max_waiting}): retry later")
        request = _Request(items, asyncio.get_running_loop().create_future())
        self._waiting_items += len(items)
        await self._queue.put(request)
        return await request.future

    async def _collect(self) -> list[_Request]:
        batch = [await self._queue.get()]
        if not self.config.enabled:
            return batch
        size, deadline = len(batch[0].items), time.perf_counter() + self.config.window_s
        while size < self.config.max_batch:
            try:
                if self._queue.empty():
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    request = await asyncio.wait_for(self._queue.get(), left)
                else:
                    request = self._queue.get_nowait()
            except asyncio.TimeoutError:
                break
            batch.append(request)
            size += len(request.items)
        return batch

    def _run_chunks(self, items: list) -> torch.Tensor:
        """The model over `items` in calls of at most max_batch (a large request is split, not refused)."""
        step = self.config.max_batch if self.config.enabled else len(items)
        outputs = []
        for start in range(0, len(items), step):
            chunk = items[start:start + step]
            t0 = time.perf_counter()
            outputs.append(self.run(chunk))
            if self.on_batch:
                self.on_batch(len(chunk), time.perf_counter() - t0)
        return torch.cat(outputs)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            self._waiting_items -= sum(len(r.items) for r in batch)
            batch = [r for r in batch if not r.future.cancelled()]  # the client went away while it waited
            if not batch:
                continue
            items = [item for r in batch for item in r.items]
            try:
                rows = await loop.run_in_executor(self.executor, self._run_chunks, items)
            except Exception as err:  # noqa: BLE001 - every waiting request gets the error, the loop goes on
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(err)
                continue
            start = 0
            for r in batch:
                if not r.future.done():
                    r.future.set_result(rows[start:start + len(r.items)])
                start += len(r.items)
