"""End to end through the real launcher: the quick start (train, checkpoint, evaluate: recall and zero-shot accuracy,
mid-run and at the end), the eval and zero-shot commands on its checkpoints, and resume equivalence after a kill -9
mid-save: the same losses as an uninterrupted run, exactly (fp32, CPU).

The runs train from shards made by the converter (`convert pairs`) out of image files and a JSONL, with DataLoader
workers, so the whole data path is the one a user's crawl takes."""
import json
import math

import pytest

from conftest import deepspeed_train, relative_error_to_spread
from test_presets_matrix import REDUCED

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
    """16 pairs of the built-in train split exported as image files + a pairs JSONL, then converted like a crawl
    would be. In global batches of 8 an epoch is 2 steps: the 6-step runs cross two epoch boundaries."""
    from brivl_ds.data.convert import main as convert
    from brivl_ds.data.shards import read_table

    root = tmp_path_factory.mktemp("crawl")
    (root / "images").mkdir()
    with open(root / "pairs.jsonl", "w") as f:
        for row in read_table(shapes_data["train"]).to_pylist()[:16]:
            (root / "images" / f"{row['id']}.jpg").write_bytes(row["image"])
            f.write(json.dumps({"image": f"{row['id']}.jpg", "caption": row["text"], "boxes": row["boxes"]},
                               ensure_ascii=False) + "\n")
    report = convert(["pairs", "--input", str(root / "pairs.jsonl"), "--image-root", str(root / "images"),
                      "--out", str(root / "shards"), "--rows-per-shard", "6", "--workers", "2", "--no-progress"])
    assert report["rows written"] == 16
    return {**shapes_data, "train": root / "shards"}


@pytest.fixture(scope="module")
def bench(converted):
    """The held-out pictures labelled by background colour (make_shapes_benchmark, the zero-shot command's
    make-shapes): the full run's zero-shot set, 4 classes; one more file, undecodable, to be skipped (49 files: the
    2 ranks' halves differ in length, so one pads its last batch)."""
    from brivl_ds.evaluation.zeroshot import make_shapes_benchmark

    out = converted["train"].parent / "zeroshot"
    assert sum(make_shapes_benchmark(converted["eval"], out).values()) == 48
    (out / "白色" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return out


@pytest.fixture(scope="module")
def full_run(converted, bench, tmp_path_factory):
    """The quick start on converted shards; it also evaluates at step N, just after its step-N checkpoint (which the
    zero-shot test exports), and classifies `bench` zero-shot at each evaluation. (The other runs of this module
    compare their losses with this one's: evaluating mid-run must not change training.)"""
    out = tmp_path_factory.mktemp("full")
    log = launch(out, converted, "data.num_workers=2", "train.save_eval_embeddings=true", f"train.save_every={N}",
                 f"train.eval_every={N}", f"data.zeroshot_path={bench}",
                 f"data.zeroshot_classes={bench / 'classes.txt'}")
    return out, log


@pytest.mark.slow
def test_quickstart_trains_checkpoints_and_evaluates(full_run):
    out, log = full_run
    assert "eval @ step 6 on 48 held-out pairs: R@1/5/10" in log
    assert "tiny: 2 ranks (2 data-parallel x 1 tensor-parallel) on cpu, float32, kernels: loss reference, " \
        "momentum reference" in log  # CPU without the interpreter: the references
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
    # eval.json holds what the run printed, and the recalls are the run's own embeddings' (saved beside it)
    import re

    import torch

    from brivl_ds.evaluation.recall import recall_at_k

    result = json.loads((out / "eval.json").read_text())
    assert result["skipped_rows"] == 0 and result["step"] == 2 * N
    printed = re.search(r"eval @ step 6 on 48 held-out pairs: R@1/5/10 image->text ([\d.]+)/([\d.]+)/([\d.]+), "
                        r"text->image ([\d.]+)/([\d.]+)/([\d.]+) \(chance R@1 2.08\)", log)
    assert printed, log[-3000:]
    keys = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert [float(x) for x in printed.groups()] == [round(100 * result[k], 1) for k in keys]  # fractions, printed in %
    embeddings = torch.load(out / "eval_embeddings.pt")
    zeroshot = {k: result.pop(k) for k in list(result) if k.startswith("zeroshot_")}  # test_zero_shot_accuracy_...
    assert set(zeroshot) == {"zeroshot_acc1", "zeroshot_n"}
    assert result == pytest.approx({"step": 2 * N, **recall_at_k(embeddings["image"], embeddings["text"]),
                                    "skipped_rows": 0.0})


@pytest.mark.slow
def test_eval_command_on_the_checkpoint_reproduces_the_run_eval(full_run, tmp_path):
    """The eval command (its main, in this process) on the 2-rank ZeRO-3 checkpoint: one process, batches of 64,
    the consolidated fp32 model. Its embeddings are the run's own final evaluation's (to fp32 rounding of other
    batches), and its recall is theirs. Recalls are not compared with each other: this barely trained model puts
    the pairs so close together that a 1e-7 difference may reorder two candidates on another CPU."""
    import torch

    from brivl_ds.eval import main as eval_command
    from brivl_ds.evaluation.recall import recall_at_k

    out, _ = full_run
    eval_command(["--checkpoint", str(out / "checkpoints"), "--out", str(tmp_path / "m.json"), "--save-embeddings",
                  str(tmp_path / "emb.pt")])
    offline, during = torch.load(tmp_path / "emb.pt"), torch.load(out / "eval_embeddings.pt")
    for modality in ("image", "text"):
        torch.testing.assert_close(offline[modality], during[modality], rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "m.json").read_text()) == pytest.approx(
        {**recall_at_k(offline["image"], offline["text"]), "skipped_rows": 0.0})


@pytest.mark.slow
def test_zero_shot_accuracy_at_each_evaluation_equals_the_zero_shot_command(full_run, exported, bench, tmp_path):
    """The run's zero-shot accuracy (2 ZeRO-3 ranks, each encoding half of the prompts and of the pictures; at step N
    and at the end) is in that step's metrics.jsonl record next to the recalls, in TensorBoard, eval.json and the
    printed line, and equals what the zero-shot command (its main, in this process) finds with the export of that
    step's checkpoint. Tolerance: fp32 embeddings of one input in batches of another composition move by about
    1e-7 (recall.TIE_TOLERANCE), so only a picture whose two best classes score within 1e-5 of each other (100x
    that) could be classified differently; the run's count of correct pictures may differ from the command's by
    the number of such pictures and no more."""
    import functools
    import re

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import brivl_ds
    from brivl_ds.evaluation.zeroshot import ZH_TEMPLATES, class_embeddings, read_classes, read_image_folder
    from brivl_ds.export import export
    from brivl_ds.inference.encode import embed_image_sources, embed_texts_batched
    from brivl_ds.zeroshot import main as zeroshot

    out, log = full_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 2 * N + 1))  # one record per step, evaluated or not
    evaluated = {r["step"]: r["eval"] for r in records if "eval" in r}
    assert sorted(evaluated) == [N, 2 * N]
    for step, result in evaluated.items():
        assert result["zeroshot_n"] == 48 and "zeroshot_acc5" not in result  # 4 classes: top-5 would be 1
        assert {"n", "i2t_r1", "t2i_r10", "skipped_rows"} <= set(result)  # the recalls beside it
        printed = re.search(rf"eval @ step {step} on 48 held-out pairs: R@1/5/10 .*; zero-shot top-1 ([\d.]+)% "
                            r"\(48 images\)", log)
        assert printed and float(printed.group(1)) == round(100 * result["zeroshot_acc1"], 1), log[-3000:]
    assert log.count("skipping zero-shot image") == 2  # the undecodable file, once per evaluation, by one rank
    assert json.loads((out / "eval.json").read_text()) == {"step": 2 * N, **evaluated[2 * N]}
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for key in ("zeroshot_acc1", "i2t_r1"):
        scalars = events.Scalars(f"eval/{key}")
        assert [e.step for e in scalars] == [N, 2 * N]
        assert [e.value for e in scalars] == pytest.approx([evaluated[s][key] for s in (N, 2 * N)], rel=1e-6)

    classes = read_classes(bench / "classes.txt")
    pictures = read_image_folder(bench, classes).images
    for step in (N, 2 * N):
        folder = exported if step == 2 * N else export(out / "checkpoints", tmp_path / f"step{step}", f"step{step}")
        report = zeroshot(["--model", str(folder), "--data", str(bench), "--classes", str(bench / "classes.txt"),
                           "--out", str(tmp_path / f"zeroshot{step}"), "--no-progress"])
        assert (report["n"], report["skipped"], report["templates"]) == (48, 1, list(ZH_TEMPLATES))
        model = brivl_ds.load_model(folder)  # the margins of its decisions, computed as the command computes them
        weights = class_embeddings(functools.partial(embed_texts_batched, model), classes, list(ZH_TEMPLATES))
        best_two = (embed_image_sources(model, pictures)[0].double() @ weights.double().t()).topk(2).values
        margins = best_two[:, 0] - best_two[:, 1]
        near = int((margins < 1e-5).sum())
        print(f"step {step}: run {evaluated[step]['zeroshot_acc1']:.4f}, command {report['metrics']['acc1']:.4f}; "
              f"smallest margin {margins.min():.2e}, {near} pictures within 1e-5")
        assert abs(round(48 * evaluated[step]["zeroshot_acc1"]) - round(48 * report["metrics"]["acc1"])) <= near


@pytest.fixture(scope="module")
def exported(full_run, tmp_path_factory):
    """`python -m brivl_ds.export` (its main, in this process) on the quick start's ZeRO-3 checkpoint (2 ranks)."""
    from brivl_ds.export import main as export_command

    out, _ = full_run
    folder = tmp_path_factory.mktemp("exported") / "fp32"
    return export_command(["--checkpoint", str(out / "checkpoints"), "--out", str(folder)])


@pytest.mark.slow
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
    # bf16 export: the fp32 weights rounded once (bit-equal to rounding the fp32 export), then run in bf16
    half_dir = export(out / "checkpoints", exported.parent / "bf16", dtype="bf16")
    from safetensors.torch import load_file

    fp32_weights, bf16_weights = load_file(str(exported / "model.safetensors")), load_file(str(half_dir / "model.safetensors"))
    assert all(torch.equal(bf16_weights[k], v.bfloat16()) for k, v in fp32_weights.items())
    half = brivl_ds.load_model(half_dir)
    assert half.dtype == torch.bfloat16
    # computed in bf16 end to end (8 significant bits per rounding, through both towers). Measured on the 6-step
    # model: 0.0003 for images, 0.04 for texts (its captions sit closer together); dropping the boxes gives 0.07,
    # misaligned rows 2.2
    half_image = half.embed_images([r["image"] for r in rows], [r["boxes"] for r in rows])
    assert relative_error_to_spread(half_image, image) < 0.01, relative_error_to_spread(half_image, image)
    half_text = half.embed_texts([r["text"] for r in rows])
    assert relative_error_to_spread(half_text, text) < 0.1, relative_error_to_spread(half_text, text)


@pytest.mark.slow
def test_embed_command_writes_resumable_sharded_embeddings(full_run, exported, tmp_path):
    """The embed command as two real ranks (`deepspeed --num_gpus 2 --module brivl_ds.embed`) over the held-out
    shards with an undecodable image in each 20-row shard: fp16 embeddings equal to the run's own, ids beside them,
    and embed.json counting every rank's skipped images; a restart redoes only a missing shard and keeps the
    reused shards' counts. Then (its main, in this process) a text file and an image directory (no boxes: the
    fallback layout; one undecodable file skipped and counted)."""
    import subprocess

    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from brivl_ds.data.shards import read_table
    from brivl_ds.embed import load_embeddings, main as embed
    from conftest import REPO, free_port

    out, _ = full_run
    table = read_table(converted_eval(out))
    broken = {3, 25, 45}  # one in each shard: shards 0 and 2 are rank 0's, shard 1 is rank 1's
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", [
        [b"\xff\xd8 not a jpeg" if r in broken else image for r, image in enumerate(table.column("image").to_pylist())]]),
        tmp_path / "eval-with-broken.parquet")
    emb = tmp_path / "emb"

    def launch():
        proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                               "brivl_ds.embed", "--model", str(exported), "--shards",
                               str(tmp_path / "eval-with-broken.parquet"), "--out", str(emb), "--rows-per-shard",
                               "20", "--batch-size", "8", "--no-progress"], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        return proc.stdout + proc.stderr

    log = launch()
    assert "rank 0: embedded 2 shards" in log and "rank 1: embedded 1 shards" in log
    report = json.loads((emb / "embed.json").read_text())
    assert report["skipped"] == {"part-00000": 1, "part-00001": 1, "part-00002": 1} and report["rows"] == 48
    kept = [r for r in range(48) if r not in broken]
    during = torch.load(out / "eval_embeddings.pt")
    for modality in ("image", "text"):
        values, ids = load_embeddings(emb, modality)
        assert values.dtype == np.float16 and ids.column("row").to_pylist() == kept
        # float16 storage: 2^-11 relative rounding of entries below 1 in magnitude
        torch.testing.assert_close(torch.from_numpy(values).float(), during[modality][kept], rtol=0, atol=2e-3)
    assert ids.column("id").to_pylist() == [table.column("id")[r].as_py() for r in kept]
    (emb / "embed.json").unlink()
    (emb / "ids" / "part-00001.parquet").unlink()  # rank 1's shard: only it is redone
    log = launch()
    assert "rank 0: 2 of its 2 shards are finished already" in log and "rank 1: embedded 1 shards" in log
    assert json.loads((emb / "embed.json").read_text())["skipped"] == report["skipped"]
    assert load_embeddings(emb, "text")[0].shape == (45, during["text"].shape[1])

    rows = read_table(converted_eval(out), columns=["image", "text"]).to_pylist()[:5]
    (tmp_path / "texts.txt").write_text("\n".join(r["text"] for r in rows), encoding="utf-8")
    embed(["--model", str(exported), "--texts", str(tmp_path / "texts.txt"), "--out", str(tmp_path / "t")])
    torch.testing.assert_close(torch.from_numpy(load_embeddings(tmp_path / "t", "text")[0]).float(),
                               during["text"][:5], rtol=0, atol=2e-3)
    (tmp_path / "img").mkdir()
    for i, r in enumerate(rows):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(r["image"])
    (tmp_path / "img" / "9-broken.jpg").write_bytes(rows[0]["image"][:100])
    embed(["--model", str(exported), "--images", str(tmp_path / "img"), "--out", str(tmp_path / "i")])
    values, ids = load_embeddings(tmp_path / "i", "image")
    assert ids.column("id").to_pylist() == [f"{i}.jpg" for i in range(5)] and values.shape[0] == 5
    assert json.loads((tmp_path / "i" / "embed.json").read_text())["skipped"] == {"part-00000": 1}
    np.testing.assert_allclose(np.linalg.norm(values.astype(np.float32), axis=1), 1.0, atol=2e-3)


@pytest.mark.slow
def test_after_training_readme_flow_zero_shot_index_and_search(full_run, exported, tmp_path):
    """The README's "Using a trained model" commands on the quick start's export (their mains, in this process):
    the trained temperature travels with the export, zero-shot classification by background colour with the
    built-in templates, the held-out captions embedded and indexed, and a picture's MatchSoul search whose hits
    are the exact top k of the indexed captions."""
    import numpy as np

    import brivl_ds
    from brivl_ds.data.shards import read_table
    from brivl_ds.embed import load_embeddings, main as embed
    from brivl_ds.index import main as index
    from brivl_ds.inference.vector_index import VectorIndex
    from brivl_ds.zeroshot import main as zeroshot

    out, _ = full_run
    eval_shards = converted_eval(out)
    # the trained temperature of the exported checkpoint, as DeepSpeed's own consolidation reads it (step 6's update
    # included: metrics.jsonl logs the tau each step's forward used, one update earlier)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    log_tau = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step6")["log_tau"]
    tau = json.loads((exported / "export.json").read_text())["tau"]
    assert tau == pytest.approx(log_tau.exp().item(), rel=1e-6) and brivl_ds.load_model(exported).tau == tau
    assert tau != json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["tau"]  # it did train

    counts = zeroshot(["make-shapes", "--shards", eval_shards, "--out", str(tmp_path / "bench")])
    assert sum(counts.values()) == 48
    result = zeroshot(["--model", str(exported), "--data", str(tmp_path / "bench"), "--classes",
                       str(tmp_path / "bench" / "classes.txt"), "--out", str(tmp_path / "zs"), "--no-progress"])
    assert result["n"] == 48 and result["skipped"] == 0
    confusion = np.array(result["confusion"])  # rows: true background, columns: predicted
    assert confusion.sum() == 48 and result["metrics"]["acc1"] == pytest.approx(np.trace(confusion) / 48)
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


@pytest.mark.slow
def test_restart_after_a_kill_mid_save_gives_the_same_losses(full_run, converted, tmp_path):
    """kill -9 of rank 1 while it writes step 4's checkpoint (after step 2's was published): the job ends at once;
    the torn checkpoint is never loaded, the restart (with another number of DataLoader workers) resumes from step
    2, exactly at the end of the first epoch, trains and logs steps 3..6 again, and every step appears once in
    metrics.jsonl and TensorBoard, with exactly the uninterrupted run's losses."""
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
    # a new process, with a different number of DataLoader workers: resumes at the epoch boundary
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
    from brivl_ds.training.metrics_log import drop_metrics_after

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    drop_metrics_after(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert "dropped an unreadable record" in capsys.readouterr().out
    drop_metrics_after(tmp_path / "absent.jsonl", 3)  # a fresh output directory: nothing to cut


@pytest.mark.slow
def test_torchrun_equals_the_deepspeed_launcher_and_zero_offload_is_refused(full_run, converted, tmp_path):
    """README: "`torchrun` works as a launcher too": the quick-start test run through torchrun gives the deepspeed
    launcher's losses bit for bit (fp32, CPU). A ds_config with ZeRO-Offload is refused before anything is built,
    with the reason and what to do instead."""
    import subprocess

    from conftest import REPO, child_env, free_port

    def torchrun(out_dir, *overrides):
        cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "brivl_ds/train.py",
               "--preset", "tiny"]
        for setting in [*quickstart_settings(out_dir, converted), "data.num_workers=2", *overrides]:
            cmd += ["--set", setting]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=child_env())
        return proc.returncode, proc.stdout + proc.stderr

    out, _ = full_run
    code, log = torchrun(tmp_path / "torchrun")
    assert code == 0, log[-6000:]
    assert losses(tmp_path / "torchrun") == losses(out)

    ds = json.loads((REPO / "ds_configs" / "tiny.json").read_text())
    ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    (tmp_path / "offload.json").write_text(json.dumps(ds))
    code, log = torchrun(tmp_path / "offload", f"train.ds_config={tmp_path / 'offload.json'}")
    assert code == 1 and "sets zero_optimization.offload_optimizer: ZeRO-Offload is not supported" in log, log[-4000:]
    assert not (tmp_path / "offload" / "checkpoints").exists()


@pytest.mark.slow
def test_builtin_dataset_run_crosses_epochs_and_resumes_just_after_a_boundary(tmp_path):
    """README command 1's own path, sizes shrunk: no `data.train_path`, so rank 0 generates the built-in dataset
    while the other rank waits, and both train on it. 32 pairs in global batches of 16: an epoch is 2 steps, so 6
    steps cross two epoch boundaries, each epoch dealt anew. A run resumed from the step-3 checkpoint (just after
    the first boundary) with another number of DataLoader workers gives the uninterrupted run's losses and
    evaluation bit for bit, its zero-shot accuracy on the benchmark made next to the data included. (Resuming
    exactly at a boundary: test_restart_after_a_kill_mid_save_...)"""
    import re

    data = tmp_path / "data"
    builtin = [f"data.synthetic_dir={data}", "data.synthetic_train=32", "data.synthetic_eval=16",
               "model.image.image_size=64", "data.batch_size=8", "moco.queue_size=16", "train.max_steps=6",
               "optim.warmup_steps=2", "train.save_every=3", "train.progress_bar=false"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    log = deepspeed_train("tiny", [*builtin, f"train.output_dir={full}", "data.num_workers=2"])
    # the zero-shot benchmark made from the held-out split, next to it: on by default for the built-in dataset
    assert sorted(p.name for p in data.iterdir()) == ["DONE.json", "eval", "tokenizer", "train", "zeroshot"]
    assert re.search(r"eval @ step 6 on 16 held-out pairs: .*; zero-shot top-1 [\d.]+% \(16 images\)", log)
    run = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in run] == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 2), (6, 2)]

    log = deepspeed_train("tiny", [*builtin, f"train.output_dir={resumed}", "data.num_workers=0",
                                   f"train.resume={full}/checkpoints/step3"])
    assert f"resumed from {full}/checkpoints/step3 at step 3" in log
    assert losses(resumed) == [r["loss"] for r in run[3:]]
    evaluation = json.loads((full / "eval.json").read_text())
    assert json.loads((resumed / "eval.json").read_text()) == evaluation and evaluation["zeroshot_n"] == 16
