"""Training across epoch boundaries: the trainer's loop deals each epoch anew (every row once per epoch, in a new
order), and logs which epoch each step belongs to. Resuming at and just after a boundary, through the launcher, is
in tests/test_quickstart.py (the built-in dataset run)."""
import json

import pytest
import torch

from conftest import run_distributed
from test_zero3 import make_config

WORLD, BATCH, ROWS = 2, 4, 24  # 3 steps per epoch


def _epochs_worker(rank, world, data, out_dir):
    from brivl_ds.training.trainer import Trainer

    cfg = make_config(data, out_dir)
    cfg.data.batch_size = BATCH
    cfg.train.max_steps, cfg.train.eval_at_end = 7, False
    # no DataLoader workers: spawned ranks (run_distributed) default to the spawn start method, where each epoch's
    # new workers take ~10 s to start; the launcher tests run workers across epoch boundaries
    cfg.data.num_workers = 0
    trainer = Trainer(cfg)
    seen, train_step = [], trainer.train_step

    def recording(batch, content_ids, skipped_rows=0, rows=None):
        seen.append((trainer.pos.data.epoch, rows))
        return train_step(batch, content_ids, skipped_rows, rows)

    trainer.train_step = recording
    trainer.fit()
    torch.save(seen, f"{out_dir}/rows{rank}.pt")


@pytest.mark.slow
def test_every_epoch_deals_each_row_once_in_a_new_order(shapes_data, tmp_path):
    import pyarrow.parquet as pq

    from brivl_ds.data.shards import read_table

    table = read_table(shapes_data["train"]).slice(0, ROWS)
    (tmp_path / "shards").mkdir()
    pq.write_table(table, tmp_path / "shards" / "part-00000.parquet", row_group_size=8)
    data = {**shapes_data, "train": tmp_path / "shards"}
    run_distributed(_epochs_worker, WORLD, data, str(tmp_path))
    per_rank = [torch.load(tmp_path / f"rows{r}.pt") for r in range(WORLD)]
    assert [len(steps) for steps in per_rank] == [7, 7]
    epochs = {}
    for steps in per_rank:
        for epoch, rows in steps:
            epochs.setdefault(epoch, []).extend(rows)
    assert sorted(epochs) == [0, 1, 2]
    for epoch in (0, 1):  # whole epochs: each row exactly once (24 rows = 3 global batches of 8)
        assert sorted(epochs[epoch]) == list(range(ROWS)), epoch
    assert len(epochs[2]) == len(set(epochs[2])) == WORLD * BATCH  # one step into the third epoch
    order = [[rows for epoch, rows in per_rank[0] if epoch == e] for e in (0, 1, 2)]
    assert order[0] != order[1] and order[1][:1] != order[2]  # a new order every epoch
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged] == [0] * 3 + [1] * 3 + [2]
