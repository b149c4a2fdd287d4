"""End to end through the real launcher: the quick start (train, checkpoint, evaluate), the eval command on its
checkpoint, and resume equivalence after a kill -9 mid-save: the same losses as an uninterrupted run, exactly (fp32, CPU).

The runs train from shards made by the converter (`convert pairs`) out of image files and a JSONL, with DataLoader
workers, so the whole data path is the one a user's crawl takes."""
import json
import math

import pytest

from conftest import deepspeed_train
from test_presets_matrix import REDUCED

pytestmark = pytest.mark.slow
N = 3


def quickstart_settings(out_dir, data) -> list[str]:
    """The preset matrix's reduced `tiny` variant (this module is the matrix's run of `tiny`) on `data`."""
    return [f"train.output_dir={out_dir}", f"data.train_path={data['train']}", f"data.eval_path={data['eval']}",
            f"model.text.tokenizer_path={data['tokenizer']}", *REDUCED["tiny"], f"train.max_steps={2 * N}",
            "optim.warmup_steps=2", "train.progress_bar=false"]


def launch(out_dir, data, *overrides, world=2):
    """`deepspeed --num_gpus 2 brivl_ds/train.py --preset tiny ...` (CPU processes here)."""
    return deepspeed_train("tiny", [*quickstart_settings(out_dir, data), *overrides], world)


def losses(out_dir):
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def converted(shapes_data, tmp_path_factory):
    """The built-in train split exported as image files + a pairs JSONL, then converted like a crawl would be."""
    from brivl_ds.data.convert import main as convert
    from brivl_ds.data.shards import read_table

    root = tmp_path_factory.mktemp("crawl")
    (root / "images").mkdir()
    with open(root / "pairs.jsonl", "w") as f:
        for row in read_table(shapes_data["train"]).to_pylist():
            (root / "images" / f"{row['id']}.jpg").write_bytes(row["image"])
            f.write(json.dumps({"image": f"{row['id']}.jpg", "caption": row["text"], "boxes": row["boxes"]},
                               ensure_ascii=False) + "\n")
    report = convert(["pairs", "--input", str(root / "pairs.jsonl"), "--image-root", str(root / "images"),
                      "--out", str(root / "shards"), "--rows-per-shard", "100", "--workers", "2", "--no-progress"])
    assert report["rows written"] == 256
    return {**shapes_data, "train": root / "shards"}


@pytest.fixture(scope="module")
def full_run(converted, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    log = launch(out, converted, "data.num_workers=2", "train.save_eval_embeddings=true")
    return out, log


def test_quickstart_trains_checkpoints_and_evaluates(full_run):
    out, log = full_run
    assert "eval @ step 6 on 48 held-out pairs: R@1/5/10" in log
    assert (out / "checkpoints" / "latest").read_text().strip() == "step6"
    assert sorted(p.name for p in (out / "checkpoints" / "step6").glob("zero_pp_rank_*_model_states.pt")) == \
        ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 2 * N + 1))
    assert all(k in steps[-1] for k in ("loss_i2t", "loss_t2i", "tau", "lr", "grad_norm", "samples_per_s",
                                         "step_time", "queue_fill", "skipped_rows"))
    assert steps[-1]["skipped_rows"] == 0  # the converter let no undecodable image through
    assert steps[-1]["queue_fill"] == 1.0  # 6 steps x 8 keys > K = 16
    assert steps[0]["loss"] == 0.0 and len({s["loss"] for s in steps[1:]}) > 1  # empty queues at step 1, then real
    assert all(math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) for s in steps)
    result = json.loads((out / "eval.json").read_text())
    assert result["skipped_rows"] == 0
    assert result["n"] == 48 and 0 <= result["i2t_r1"] <= result["i2t_r5"] <= result["i2t_r10"] <= 100


def test_eval_command_on_the_checkpoint_reproduces_the_run_eval(full_run, tmp_path):
    from brivl_ds.eval import main as eval_command  # its main, in this process (a process start saved)

    out, _ = full_run
    eval_command(["--checkpoint", str(out / "checkpoints"), "--out", str(tmp_path / "m.json")])
    offline = json.loads((tmp_path / "m.json").read_text())
    during = json.loads((out / "eval.json").read_text())
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "n"):
        assert offline[key] == pytest.approx(during[key]), key


@pytest.fixture(scope="module")
def exported(full_run, tmp_path_factory):
    """`python -m brivl_ds.export` (its main, in this process) on the quick start's ZeRO-3 checkpoint (2 ranks)."""
    from brivl_ds.export import main as export_command

    out, _ = full_run
    folder = tmp_path_factory.mktemp("exported") / "fp32"
    return export_command(["--checkpoint", str(out / "checkpoints"), "--out", str(folder)])


def test_exported_model_embeds_the_held_out_pairs_as_the_training_run_did(full_run, exported):
    """`brivl_ds.load_model` of the export in this process (no engine, no process group): the held-out embeddings
    from the raw image bytes, boxes and captions equal those the run computed in its final evaluation; a bf16
    export within bf16 rounding."""
    import torch
    from safetensors import safe_open

    import brivl_ds
    from brivl_ds.data.shards import read_table
    from brivl_ds.export import export

    out, _ = full_run
    assert sorted(p.name for p in exported.iterdir()) == [
        "config.json", "export.json", "model.safetensors", "preprocess.json", "tokenizer"]
    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        assert not any(k.startswith(("momentum.", "log_tau")) for k in f.keys())  # the online towers only
    model = brivl_ds.load_model(exported)
    provenance = json.loads((exported / "export.json").read_text())
    assert provenance["tag"] == "step6" and provenance["eval"]["n"] == 48
    rows = read_table(converted_eval(out), columns=["image", "text", "boxes"]).to_pylist()
    image = model.embed_images([r["image"] for r in rows], [r["boxes"] for r in rows])
    text = model.embed_texts([r["text"] for r in rows])
    during = torch.load(out / "eval_embeddings.pt")
    torch.testing.assert_close(image, during["image"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(text, during["text"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(image.norm(dim=1), torch.ones(len(rows)))
    half = brivl_ds.load_model(export(out / "checkpoints", exported.parent / "bf16", dtype="bf16"))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.embed_texts([r["text"] for r in rows]), during["text"], rtol=0, atol=0.05)


def test_embed_command_writes_resumable_sharded_embeddings(full_run, exported, tmp_path, monkeypatch, capsys):
    """The embed command (its main, in this process) over the held-out shards as two launcher ranks (RANK /
    WORLD_SIZE), 20 rows per shard: fp16 embeddings equal to the run's own, ids beside them; a restart redoes only
    a missing shard; a text file and an image directory (no boxes: the fallback layout; one undecodable file
    skipped and counted)."""
    import numpy as np
    import torch

    from brivl_ds.data.shards import read_table
    from brivl_ds.embed import load_embeddings, main as embed

    out, _ = full_run
    emb = tmp_path / "emb"
    args = ["--model", str(exported), "--shards", str(converted_eval(out)), "--out", str(emb), "--rows-per-shard",
            "20", "--batch-size", "8", "--no-progress"]

    def run(rank, world, *extra):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        embed(list(extra))
        return capsys.readouterr().out

    run(0, 2, *args)
    run(1, 2, *args)
    during = torch.load(out / "eval_embeddings.pt")
    for modality in ("image", "text"):
        values, ids = load_embeddings(emb, modality)
        assert values.dtype == np.float16 and ids.column("row").to_pylist() == list(range(48))
        torch.testing.assert_close(torch.from_numpy(values).float(), during[modality], rtol=0, atol=2e-3)
    assert ids.column("id").to_pylist() == read_table(converted_eval(out), columns=["id"]).column("id").to_pylist()
    (emb / "ids" / "part-00002.parquet").unlink()  # rank 0 holds shards 0 and 2: only 2 is redone
    assert "rank 0: 1 of its 2 shards are finished already" in run(0, 2, *args)
    assert load_embeddings(emb, "text")[0].shape == (48, during["text"].shape[1])

    rows = read_table(converted_eval(out), columns=["image", "text"]).to_pylist()[:5]
    (tmp_path / "texts.txt").write_text("\n".join(r["text"] for r in rows), encoding="utf-8")
    run(0, 1, "--model", str(exported), "--texts", str(tmp_path / "texts.txt"), "--out", str(tmp_path / "t"))
    torch.testing.assert_close(torch.from_numpy(load_embeddings(tmp_path / "t", "text")[0]).float(),
                               during["text"][:5], rtol=0, atol=2e-3)
    (tmp_path / "img").mkdir()
    for i, r in enumerate(rows):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(r["image"])
    (tmp_path / "img" / "9-broken.jpg").write_bytes(rows[0]["image"][:100])
    run(0, 1, "--model", str(exported), "--images", str(tmp_path / "img"), "--out", str(tmp_path / "i"))
    values, ids = load_embeddings(tmp_path / "i", "image")
    assert ids.column("id").to_pylist() == [f"{i}.jpg" for i in range(5)] and values.shape[0] == 5
    assert json.loads((tmp_path / "i" / "embed.json").read_text())["skipped"] == {"part-00000": 1}
    np.testing.assert_allclose(np.linalg.norm(values.astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_after_training_readme_flow_zero_shot_index_and_search(full_run, exported, tmp_path):
    """The README's "Using a trained model" commands on the quick start's export (their mains, in this process):
    the trained temperature travels with the export, zero-shot classification by background colour with the
    built-in templates, the held-out captions embedded and indexed, and a picture's MatchSoul search whose hits
    are the exact top k of the indexed captions."""
    import numpy as np

    import brivl_ds
    from brivl_ds.data.shards import read_table
    from brivl_ds.embed import load_embeddings, main as embed
    from brivl_ds.index import VectorIndex, main as index
    from brivl_ds.zeroshot import main as zeroshot

    out, _ = full_run
    eval_shards = converted_eval(out)
    tau = json.loads((exported / "export.json").read_text())["tau"]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["tau"]
    assert tau == pytest.approx(last, rel=0.05) and brivl_ds.load_model(exported).tau == tau  # one more step after

    counts = zeroshot(["make-shapes", "--shards", eval_shards, "--out", str(tmp_path / "bench")])
    assert sum(counts.values()) == 48
    result = zeroshot(["--model", str(exported), "--data", str(tmp_path / "bench"), "--classes",
                       str(tmp_path / "bench" / "classes.txt"), "--out", str(tmp_path / "zs"), "--no-progress"])
    assert result["n"] == 48 and result["skipped"] == 0 and 0 <= result["metrics"]["acc1"] <= 1
    assert (tmp_path / "zs" / "confusion.png").stat().st_size > 0

    embed(["--model", str(exported), "--shards", eval_shards, "--out", str(tmp_path / "emb"), "--no-progress"])
    index(["--emb", str(tmp_path / "emb"), "--modality", "text", "--out", str(tmp_path / "index")])
    corpus = VectorIndex.load(tmp_path / "index")
    model = brivl_ds.load_model(exported)
    picture = read_table(eval_shards, columns=["image"]).column("image")[0].as_py()
    hits = corpus.search(model.embed_images([picture]).numpy(), 5)[0]
    vectors, ids = load_embeddings(tmp_path / "emb", "text")
    exact = vectors.astype(np.float64) @ model.embed_images([picture])[0].double().numpy()
    np.testing.assert_allclose([h.score for h in hits], np.sort(exact)[::-1][:5], atol=1e-5)
    captions = dict(zip(ids.column("id").to_pylist(), read_table(eval_shards, columns=["text"]).column("text").to_pylist()))
    assert all(h.text == captions[h.id] for h in hits)


def converted_eval(out):
    """The held-out shards the run evaluated on (its saved config)."""
    import torch

    state = torch.load(out / "checkpoints" / "step6" / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)
    return state["config"]["data"]["eval_path"]


def test_restart_after_a_kill_mid_save_gives_the_same_losses(full_run, converted, tmp_path):
    """kill -9 of rank 1 while it writes step 4's checkpoint (after step 2's was published): the job ends at once;
    the torn checkpoint is never loaded, the restart resumes from step 2, trains and logs steps 3..6 again, and
    every step appears once in metrics.jsonl and TensorBoard, with exactly the uninterrupted run's losses."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import deepspeed_launch

    out, _ = full_run
    settings = ["train.save_every=2", "train.log_every=1", "data.num_workers=2"]
    code, first, seconds = deepspeed_launch("tiny", [*quickstart_settings(tmp_path, converted), *settings,
                                                     "drill.crash_at_step=4", "drill.crash_during=save",
                                                     "drill.crash_rank=1"])
    assert code != 0 and "exits with return code = -9" in first and "--local_rank=1" in first
    assert "fault drill: rank 1 killed (SIGKILL) after writing" in first and "eval @" not in first
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step2" and (ckpt / "step4.partial").is_dir()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
        [1, 2, 3, 4]  # logged past the last checkpoint
    # a new process, with a different number of DataLoader workers: resumes mid-epoch
    second = launch(tmp_path, converted, "train.save_every=2", "train.log_every=1", "data.num_workers=0")
    assert f"removing {ckpt}/step4.partial: a save that never finished" in second
    assert f"resumed from {ckpt}/step2 at step 2" in second
    assert losses(tmp_path) == losses(out)  # each step once, and exactly the same: fp32 on CPU
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 2 * N + 1))
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step2", "step4", "step6"]


def test_restart_cuts_metrics_back_to_the_checkpoint_and_drops_a_torn_record(tmp_path, capsys):
    """What a crash leaves behind: steps after the resumed checkpoint and a half-written last line."""
    from brivl_ds.trainer import drop_metrics_after

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    drop_metrics_after(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert "dropped an unreadable record" in capsys.readouterr().out
    drop_metrics_after(tmp_path / "absent.jsonl", 3)  # a fresh output directory: nothing to cut
