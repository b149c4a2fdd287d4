"""The service's micro-batcher in-process (asyncio, no HTTP): concurrent requests share model calls within the
window and up to max_batch items, each gets exactly its own rows, a large request is split, a model error reaches
every request of its batch and the batcher goes on, batching off runs requests alone, and load beyond max_waiting
is refused."""
import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from brivl_ds.serving.batcher import BatchingConfig, MicroBatcher, Overloaded


class Model:
    """Row i of an item x is [x, x]: a crossed response shows. Records every call's items."""

    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def __call__(self, items):
        self.calls.append(list(items))
        if self.fail_on in items:
            raise RuntimeError("model failed")
        return torch.tensor([[float(x), float(x)] for x in items])


def run(config: BatchingConfig, model: Model, requests: list[list[int]], stagger_s: float = 0.0):
    async def main():
        batcher = MicroBatcher(model, config, ThreadPoolExecutor(1))
        batcher.start()

        async def one(i, items):
            await asyncio.sleep(i * stagger_s)
            return await batcher.submit(items)

        try:
            return await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)), return_exceptions=True)
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_concurrent_requests_share_calls_and_get_their_own_rows():
    model = Model()
    requests = [[i] for i in range(10)] + [[100, 101, 102]]
    out = run(BatchingConfig(max_batch=4, window_s=0.05), model, requests)
    for items, rows in zip(requests, out):
        assert rows.tolist() == [[float(x), float(x)] for x in items]
    assert sorted(x for call in model.calls for x in call) == sorted(x for r in requests for x in r)
    assert all(len(call) <= 4 for call in model.calls)  # max_batch, also when a request is split
    assert len(model.calls) < len(requests)


def test_a_request_larger_than_max_batch_is_split_not_refused():
    model = Model()
    (rows,) = run(BatchingConfig(max_batch=3, window_s=0.0), model, [list(range(8))])
    assert rows[:, 0].tolist() == list(range(8)) and [len(c) for c in model.calls] == [3, 3, 2]


def test_a_model_error_reaches_every_request_of_its_batch_and_the_batcher_goes_on():
    model = Model(fail_on=3)
    out = run(BatchingConfig(max_batch=64, window_s=0.05), model, [[1], [2], [3], [4]])
    assert all(isinstance(r, RuntimeError) for r in out)  # one batch held them all
    out = run(BatchingConfig(max_batch=64, window_s=0.0), Model(fail_on=3), [[3], [5]], stagger_s=0.05)
    assert isinstance(out[0], RuntimeError) and out[1].tolist() == [[5.0, 5.0]]


def test_batching_off_runs_each_request_alone():
    model = Model()
    requests = [[i, i + 10] for i in range(6)]
    out = run(BatchingConfig(enabled=False, max_batch=2, window_s=0.05), model, requests)
    assert sorted(model.calls) == sorted(requests)
    assert [r[:, 0].tolist() for r in out] == [[float(x) for x in r] for r in requests]


def test_load_beyond_max_waiting_is_refused():
    model = Model()
    out = run(BatchingConfig(max_batch=2, window_s=0.2, max_waiting=5), model, [[1, 2], [3, 4], [5, 6], [7]])
    assert isinstance(out[2], Overloaded) and "limit 5" in str(out[2])
    assert [r.shape[0] for i, r in enumerate(out) if i != 2] == [2, 2, 1]


@pytest.mark.parametrize("window_s", [0.0, 0.05])
def test_every_item_runs_exactly_once(window_s):
    model = Model()
    requests = [[i * 10 + j for j in range(i % 3 + 1)] for i in range(20)]
    out = run(BatchingConfig(max_batch=5, window_s=window_s), model, requests, stagger_s=0.002)
    assert sorted(x for c in model.calls for x in c) == sorted(x for r in requests for x in r)
    assert all(r[:, 0].tolist() == [float(x) for x in items] for r, items in zip(out, requests))
