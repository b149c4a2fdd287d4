"""False-negative masking through the launcher, on data with real duplicates: the content ids travel with the keys
through the all-gathered enqueue into the queue and the checkpoint, the logged duplicate share is what the data
says, and a resumed run masks exactly as the uninterrupted one (the ids are restored, not re-invented).

The modes' losses against references are in test_loss.py (one process) and test_zero3.py (2 ZeRO-3 ranks against
plain PyTorch); every mode also runs in the preset matrix (test_presets_matrix.py) and batch at TP=2
(test_tensor_parallel.py).
"""
import json

import pytest
import torch

from brivl_ds.config import build_config
from conftest import deepspeed_train

N = 2  # checkpoint at N, resume to 2N
DISTINCT_CAPTIONS = 5
SETTINGS = ["model.image.image_size=64", "data.batch_size=4", "moco.queue_size=12", "moco.mask_false_negatives=true",
            f"train.max_steps={2 * N}", f"train.save_every={N}", "optim.warmup_steps=1", "train.progress_bar=false",
            "train.eval_at_end=false"]


@pytest.fixture(scope="module")
def duplicated_data(shapes_data, tmp_path_factory):
    """The test shapes, re-captioned with 5 captions (each caption many pairs, as a crawl's boilerplate alt texts
    are), and the second half's images copies of the first half's (a re-crawled image under another caption)."""
    from brivl_ds.data.shards import Row, read_table, write_shards

    rows = read_table(shapes_data["train"]).to_pylist()
    half = len(rows) // 2
    out = tmp_path_factory.mktemp("duplicated") / "train"
    write_shards([Row(id=r["id"], image=rows[i % half]["image"], width=r["width"], height=r["height"],
                      text=rows[i % DISTINCT_CAPTIONS]["text"], boxes=r["boxes"]) for i, r in enumerate(rows)],
                 out, rows_per_shard=64)
    return {**shapes_data, "train": out}


def settings(data, out_dir, *extra):
    return [f"train.output_dir={out_dir}", f"data.train_path={data['train']}", f"data.eval_path={data['eval']}",
            f"model.text.tokenizer_path={data['tokenizer']}", *SETTINGS, *extra]


def expected_ids(data, world=2):
    """Every step's global batch as content ids, rank by rank (the enqueue's order), computed from the shards with
    the stream's own row order but the ids derived here from the bytes and captions."""
    import hashlib
    import unicodedata

    from brivl_ds.data.build import build_collator, build_train_stream
    from brivl_ds.data.shards import read_table
    from brivl_ds.data.tokenizer import load_tokenizer

    def digest(raw: bytes) -> int:
        return int.from_bytes(hashlib.sha256(raw).digest()[:8], "big") >> 1

    table = read_table(data["train"]).to_pylist()
    ids = torch.tensor([(digest(r["image"]), digest(" ".join(unicodedata.normalize("NFKC", r["text"]).lower()
                                                                .split()).encode())) for r in table])
    cfg = build_config("tiny", settings(data, "unused"))
    collate = build_collator(cfg, load_tokenizer(data["tokenizer"]))
    per_rank = []
    for rank in range(world):
        stream = build_train_stream(cfg, collate, rank, world)
        stream.start_epoch(0, num_workers=0)
        per_rank.append(stream.epoch_batches())
    return [torch.cat([ids[torch.as_tensor(per_rank[r][step])] for r in range(world)]) for step in range(2 * N)]


def queue_ids(checkpoint, key="text_queue"):
    shards = [torch.load(f, map_location="cpu", weights_only=False)[key]
              for f in sorted(checkpoint.glob("zero_pp_rank_*_model_states.pt"))]
    ids = torch.zeros(shards[0]["size"], 2, dtype=torch.long)
    for shard in shards:
        ids[shard["start"]:shard["start"] + shard["ids"].shape[0]] = shard["ids"]
    return ids, shards[0]["filled"]


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_masking_with_duplicated_captions_through_the_launcher_resumes_exactly(duplicated_data, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    deepspeed_train("tiny", settings(duplicated_data, full))
    run = metrics(full)
    steps = expected_ids(duplicated_data)

    # the duplicate share of step 2: its 8 queries against the queue holding step 1's 8 keys, from the data alone
    step1, step2 = steps[0], steps[1]
    shares = (step2[:, None, :] == step1[None, :, :]).any(-1).float().mean(1)
    assert 0 < shares.mean() < 1  # the data does hold duplicates, and not only duplicates
    assert run[1]["dup_share"] == pytest.approx(shares.mean().item(), abs=1e-6)
    assert run[0]["dup_share"] == 0.0  # the queue is empty at step 1

    # the checkpoint's queue holds the ids of the keys it holds: steps 1 and 2 (16 keys) written into K = 12
    ids, filled = queue_ids(full / "checkpoints" / f"step{N}")
    written = torch.cat(steps[:N])
    ring = torch.zeros(12, 2, dtype=torch.long)
    for i, row in enumerate(written):
        ring[i % 12] = row
    assert filled == 12 and torch.equal(ids, ring)

    # a resumed run masks what the uninterrupted one masked, bit for bit
    deepspeed_train("tiny", settings(duplicated_data, resumed, f"train.resume={full}/checkpoints/step{N}"))
    again = metrics(resumed)
    for key in ("loss", "grad_norm", "dup_share", "neg_lse"):
        assert [r[key] for r in again] == [r[key] for r in run[N:]], key


def _staleness_worker(rank, world, data, out_dir, momentum):
    from test_zero3 import make_config

    from brivl_ds.training.trainer import Trainer

    cfg = make_config(data, out_dir)
    cfg.moco.momentum, cfg.train.staleness_every = momentum, 2
    cfg.train.max_steps, cfg.train.eval_at_end = 4, False
    Trainer(cfg).fit()


@pytest.mark.slow
@pytest.mark.parametrize("momentum", [1.0, 0.5])
def test_staleness_probe_sees_drift_only_when_the_momentum_encoder_moves(momentum, shapes_data, tmp_path):
    """m = 1 freezes the momentum encoder: re-encoding the queue's samples gives its keys again (no drift, the same
    loss). m = 0.5 moves it: the re-encoded keys differ and so does the loss."""
    from conftest import run_distributed

    run_distributed(_staleness_worker, 2, shapes_data, str(tmp_path), momentum)
    probes = [r for r in metrics(tmp_path) if "stale_loss" in r]
    assert [r["step"] for r in probes] == [2, 4] and all(r["probe_coverage"] == 1.0 for r in probes)
    for r in probes:
        if momentum == 1.0:
            assert r["key_drift"] < 1e-6 and r["fresh_loss"] == pytest.approx(r["stale_loss"], rel=1e-5), r
        else:
            assert r["key_drift"] > 1e-3 and abs(r["fresh_loss"] - r["stale_loss"]) > 1e-3, r
