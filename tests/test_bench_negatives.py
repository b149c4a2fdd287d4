"""The negatives study's report (brivl_ds/bench/negatives.py): cells averaged over seeds with their spread, every
metric in percent, a missing metric said to be missing, and the loss plot written. The runs it reports come from
the trainer (the README's table); here their records are given, so that the report's arithmetic can be checked."""
import pytest

from brivl_ds.bench.negatives import plot, run_name, summarise, table


def record(mode, batch, seed, r1, zeroshot=None):
    evaluation = {"i2t_r1": r1, "t2i_r1": r1 / 2, "i2t_r5": 0.5, "t2i_r5": 0.25}
    if zeroshot is not None:
        evaluation["zeroshot_acc1"] = zeroshot
    return {"name": run_name(mode, batch, False, seed), "mode": mode, "batch": batch, "mask": False, "seed": seed,
            "seconds": 1.0, "eval": evaluation, "loss": [3.0, 2.0, 1.0], "neg_lse": [], "dup_share": []}


def test_cells_average_their_seeds_and_show_the_spread(tmp_path):
    runs = [record("queue", 4, 1, 0.10, 0.5), record("queue", 4, 2, 0.20, 0.7), record("batch", 4, 1, 0.04)]
    rows = summarise(runs)
    queue = next(r for r in rows if r["mode"] == "queue")
    assert queue["seeds"] == 2 and queue["i2t_r1"] == pytest.approx((0.15, 0.10, 0.20))
    text = table(rows, ranks=2)
    lines = text.splitlines()
    assert lines[0].startswith("| negatives | global batch | masking | seeds | i2t_r1")
    assert "| queue | 8 | off | 2 | 15.0 (10.0-20.0) | 7.5 (5.0-10.0) |" in text
    batch_line = next(line for line in lines if line.startswith("| batch"))
    assert batch_line.endswith("| not measured |")  # no zero-shot metric in that run
    assert run_name("queue+batch", 16, True, 7) == "queue-batch_b16_mask_s7"
    plot(runs, tmp_path / "curves.png", ranks=2)
    assert (tmp_path / "curves.png").stat().st_size > 10_000
