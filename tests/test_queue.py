"""Queue semantics: wrap-around for any batch size and K, global batch > K, identical queues on every rank, and
the content ids travelling with their keys."""
import torch

from brivl_ds.moco.queue import KeyQueue
from conftest import run_distributed


def keys(start, n, d=3):
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, d)


def ids_of(k: torch.Tensor) -> torch.Tensor:
    """Content ids derived from a key's value, so that a row's ids can be checked against its key."""
    value = k[:, 0].long()
    return torch.stack([value, 7 * value + 1], 1)


def reference_queue(all_keys: torch.Tensor, k: int) -> torch.Tensor:
    """What a ring buffer holds after writing all_keys one by one."""
    q = torch.zeros(k, all_keys.shape[1])
    for i, key in enumerate(all_keys):
        q[i % k] = key
    return q


def assert_ids_follow_keys(q: KeyQueue) -> None:
    assert torch.equal(q.valid_ids(), ids_of(q.valid()))


def test_wraps_around_when_k_is_not_a_multiple_of_the_batch():
    q = KeyQueue(7, 3)
    written = []
    for step in range(6):
        batch = keys(100 * step, 3)
        q.write(batch, ids_of(batch))
        written.append(batch)
        total = 3 * (step + 1)
        assert q.filled == min(total, 7) and q.ptr == total % 7
        assert torch.equal(q.keys, reference_queue(torch.cat(written), 7))
        assert q.valid().shape[0] == min(total, 7)
        assert_ids_follow_keys(q)


def test_batch_larger_than_the_queue_keeps_the_newest_keys_in_place():
    q = KeyQueue(5, 3)
    q.write(keys(0, 2), ids_of(keys(0, 2)))
    q.write(keys(10, 12), ids_of(keys(10, 12)))  # global batch 12 > K = 5
    assert torch.equal(q.keys, reference_queue(torch.cat([keys(0, 2), keys(10, 12)]), 5))
    assert q.ptr == 14 % 5 and q.filled == 5
    assert_ids_follow_keys(q)


def test_empty_queue_and_checkpoint_shards_round_trip():
    q = KeyQueue(0, 3)
    q.write(keys(0, 4), ids_of(keys(0, 4)))
    assert q.valid().shape == (0, 3) and q.valid_ids().shape == (0, 2)
    q = KeyQueue(10, 3)
    q.write(keys(0, 13), ids_of(keys(0, 13)))
    shards = [q.shard_state(r, 3) for r in range(3)]
    restored = KeyQueue(10, 3)
    restored.load_shards(shards[::-1])
    assert torch.equal(restored.keys, q.keys) and (restored.ptr, restored.filled) == (q.ptr, q.filled)
    assert torch.equal(restored.ids, q.ids)


def test_checkpoints_without_content_ids_restore_ids_that_match_nothing():
    q = KeyQueue(6, 3)
    q.write(keys(0, 6), ids_of(keys(0, 6)))
    old = [{k: v for k, v in q.shard_state(r, 2).items() if k != "ids"} for r in range(2)]  # before content ids
    restored = KeyQueue(6, 3)
    restored.load_shards(old)
    assert torch.equal(restored.keys, q.keys)
    ids = restored.ids
    assert (ids < 0).all() and len(set(ids[:, 0].tolist())) == 6  # distinct, and no real id (>= 0) equals one


def test_ids_must_match_the_keys():
    import pytest

    with pytest.raises(ValueError, match=r"ids must be \[3, 2\]"):
        KeyQueue(4, 3).write(keys(0, 3), ids_of(keys(0, 2)))


def _enqueue_on_ranks(rank, world, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    q = KeyQueue(11, 3)
    for step in range(4):  # uneven local batch sizes: rank r contributes r + 1 keys
        batch = keys(1000 * step + 100 * rank, rank + 1)
        q.enqueue(batch, ids_of(batch))
    torch.save({"keys": q.keys, "ids": q.ids, "ptr": q.ptr, "filled": q.filled}, f"{out_dir}/rank{rank}.pt")


def test_all_gathered_enqueue_gives_every_rank_the_same_queue(tmp_path):
    world = 3
    run_distributed(_enqueue_on_ranks, world, str(tmp_path))
    expected = torch.cat([torch.cat([keys(1000 * s + 100 * r, r + 1) for r in range(world)]) for s in range(4)])
    for rank in range(world):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(state["keys"], reference_queue(expected, 11)), rank
        assert torch.equal(state["ids"], ids_of(state["keys"])), rank
        assert state["ptr"] == len(expected) % 11 and state["filled"] == 11
