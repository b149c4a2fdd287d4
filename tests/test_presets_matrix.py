"""Every shipped preset trains: a reduced variant of each, through the `deepspeed` launcher on 2 CPU ranks.

A variant keeps every code path of its preset and shrinks only sizes (depth, width, resolution, batch, K, steps):
the same timm backbone family with its BatchNorm and TF padding, the same frozen lower backbone groups and text
layers, dropout, augmentation, the preset's optimizer (`adamw_half` for paper-1b) and its ds_config as shipped
(bf16, ZeRO-3 thresholds). base and paper-1b start from pretrained weights through the real loaders, as users start
from Chinese RoBERTa and the noisy-student EfficientNets: a small random BERT saved with `save_pretrained` next to
its tokenizer (`model.text.pretrained_path`) and a timm checkpoint file (`model.image.pretrained_path`).

Each variant trains 2N steps (checkpoint at N), evaluates, and a second launch resumes from step N in a new process
and must reproduce steps N+1..2N exactly. Frozen parameters must stay bit-equal, and equal to the pretrained file.
A preset without a variant here fails `test_every_preset_has_a_reduced_variant`: a new preset must join to ship.
`tiny`'s variant is trained by tests/test_quickstart.py (the quick start's tests, with the converter, DataLoader
workers and a resume with another worker count), so it is not launched twice.
"""
import dataclasses
import json
import math

import pytest
import torch

from brivl_ds.config import PRESETS, build_config
from conftest import REPO, deepspeed_train, relative_error_to_spread

N = 3  # steps before the checkpoint the resumed run starts from; 2N steps in all

# The only fields a variant may change: sizes. Anything else differing from the preset fails the test below.
SIZE_FIELDS = {
    "model.image.backbone",  # to a smaller member of the same family; checked separately
    "model.image.backbone_depth",
    "model.image.image_size", "model.image.width", "model.image.num_layers", "model.image.num_heads",
    "model.image.max_boxes", "model.text.hidden_size", "model.text.num_layers", "model.text.num_heads",
    "model.text.intermediate_size", "model.text.max_length", "model.text.sa_layers", "model.text.sa_heads",
    "model.embed_dim", "model.head_hidden_dim", "moco.queue_size", "data.batch_size",
}
# Sizes of the small pretrained text encoders (layers, width, heads): heads as in the preset's encoder.
PRETRAINED_BERT = {"base": (6, 96, 12), "paper-1b": (6, 128, 16)}
REDUCED: dict[str, list[str]] = {
    "tiny": ["model.image.image_size=64", "data.batch_size=4", "moco.queue_size=16"],
    # B5 / B7 -> B0: the same timm EfficientNet family (Conv2dSame, BatchNormAct2d with eps 1e-3, SiLU)
    "base": ["model.image.backbone=tf_efficientnet_b0", "model.image.image_size=64", "model.image.width=64",
             "model.embed_dim=64", "moco.queue_size=16", "data.batch_size=4",
             *[f"model.text.{k}={v}" for k, v in zip(("num_layers", "hidden_size", "num_heads"),
                                                     PRETRAINED_BERT["base"])], "model.text.intermediate_size=192"],
    "paper-1b": ["model.image.backbone=tf_efficientnet_b0", "model.image.image_size=64", "model.image.width=64",
                 "model.embed_dim=64", "moco.queue_size=16", "data.batch_size=4",
                 *[f"model.text.{k}={v}" for k, v in zip(("num_layers", "hidden_size", "num_heads"),
                                                         PRETRAINED_BERT["paper-1b"])],
                 "model.text.intermediate_size=256"],
    # ViT-G/14 -> ViT-Ti/16 (the same timm VisionTransformer blocks; QK-norm and LayerScale stay on), 36 x 2560
    # text -> 2 x 64; trained from scratch with activation checkpointing, as the preset is
    "10b": ["model.image.backbone=vit_tiny_patch16_224", "model.image.image_size=64", "model.image.width=64",
            "model.image.num_heads=4", "model.embed_dim=64", "moco.queue_size=16", "data.batch_size=4",
            "model.text.num_layers=2", "model.text.hidden_size=64", "model.text.num_heads=4",
            "model.text.intermediate_size=256", "model.text.sa_heads=4"],
}
# Each choice of negatives runs through the launcher on some preset, with its exact resume (tiny, in the quick
# start's tests, and paper-1b keep the paper's queue). Not sizes, but the objective's alternatives: the only other
# fields a variant may set.
OBJECTIVE = {"base": ["moco.negatives=queue+batch", "moco.mask_false_negatives=true"], "10b": ["moco.negatives=batch"]}
OBJECTIVE_FIELDS = {"moco.negatives", "moco.mask_false_negatives"}
# Steps and schedule length are run sizes too; the run also evaluates at step N, just after the checkpoint the
# resumed run starts from, so an evaluation must not change what training does next. The rest: data and weights.
RUN = [f"train.max_steps={2 * N}", f"train.save_every={N}", f"train.eval_every={N}", "optim.warmup_steps=2",
       "train.progress_bar=false", "train.save_eval_embeddings=true"]


def _leaves(node, prefix=""):
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def test_every_preset_has_a_reduced_variant():
    assert set(REDUCED) == set(PRESETS), "a new preset joins the matrix (REDUCED) before it ships"


@pytest.mark.parametrize("preset", sorted(REDUCED))
def test_variants_change_only_sizes_and_keep_the_backbone_family(preset):
    import timm

    real, small = build_config(preset), build_config(preset, REDUCED[preset])
    changed = {k for (k, a), (_, b) in zip(_leaves(real), _leaves(small)) if a != b}
    assert changed <= SIZE_FIELDS, changed - SIZE_FIELDS
    # same family: the same module types (model class, conv with TF padding, BN + act) at another width/depth
    with torch.device("meta"):
        kinds = [{type(m) for m in timm.create_model(c.model.image.backbone, num_classes=0).modules()}
                 for c in (real, small)]
    assert kinds[0] == kinds[1]


# ------------------------------------------------------------------------------------------------ the matrix
@pytest.fixture(scope="module")
def pretrained(shapes_data, tmp_path_factory):
    """What a user downloads beforehand: a BERT directory (weights + tokenizer) and a timm checkpoint file. The BN
    statistics are made non-trivial, as a trained checkpoint's are, so a change to them would show."""
    import timm
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("pretrained")
    tokenizer = AutoTokenizer.from_pretrained(str(shapes_data["tokenizer"]))
    out = {}
    for preset, (layers, width, heads) in PRETRAINED_BERT.items():
        torch.manual_seed(1)
        bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=layers,
                                    num_attention_heads=heads, intermediate_size=2 * width),
                         add_pooling_layer=False)
        bert.save_pretrained(root / preset)
        tokenizer.save_pretrained(root / preset)
        out[preset] = root / preset
    torch.manual_seed(2)
    cnn = timm.create_model("tf_efficientnet_b0")  # with its classifier, like a released ImageNet checkpoint
    for m in cnn.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    torch.save(cnn.state_dict(), root / "tf_efficientnet_b0.pth")
    out["cnn"] = root / "tf_efficientnet_b0.pth"
    return out


def settings_for(preset, data, pretrained, out_dir):
    paths = [f"data.train_path={data['train']}", f"data.eval_path={data['eval']}", f"train.output_dir={out_dir}"]
    if preset in PRETRAINED_BERT:
        paths += [f"model.text.pretrained_path={pretrained[preset]}",
                  f"model.image.pretrained_path={pretrained['cnn']}"]
    else:
        paths += [f"model.text.tokenizer_path={data['tokenizer']}"]
    return REDUCED[preset] + OBJECTIVE.get(preset, []) + RUN + paths


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_state(out_dir, tag):
    """Consolidated parameters and buffers of a ZeRO-3 checkpoint, and the names DeepSpeed saved as frozen."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    states = torch.load(out_dir / "checkpoints" / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)
    return get_fp32_state_dict_from_zero_checkpoint(str(out_dir / "checkpoints"), tag=tag), \
        set(states["frozen_param_shapes"]), states["buffer_names"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(set(REDUCED) - {"tiny"}))  # tiny's run: tests/test_quickstart.py
def test_preset_trains_checkpoints_resumes_exactly_and_evaluates(preset, shapes_data, pretrained, tmp_path):
    from brivl_ds.data.tokenizer import load_tokenizer
    from brivl_ds.models.brivl import BriVL

    cfg = build_config(preset, settings_for(preset, shapes_data, pretrained, tmp_path / "run"))
    full, resumed = tmp_path / "run", tmp_path / "resumed"
    log = deepspeed_train(preset, settings_for(preset, shapes_data, pretrained, full))
    assert f"eval @ step {2 * N} on 48 held-out pairs" in log

    # the preset's precision and optimizer ran (bf16 + adamw_half for paper-1b), and the losses are real
    run = metrics(full)
    assert [r["step"] for r in run] == list(range(1, 2 * N + 1))
    # the queue is empty at step 1; in-batch negatives exist from the start
    assert (run[0]["loss"] == 0.0) == (cfg.moco.negatives == "queue"), (cfg.moco.negatives, run[0]["loss"])
    later = [r["loss"] for r in run[1:]]
    assert all(math.isfinite(x) and x > 0 for x in later) and len(set(later)) > 1, later
    assert all(math.isfinite(r["grad_norm"]) for r in run)

    # ... with the shipped ds_config's precision and the preset's optimizer: bf16 ZeRO-3 files, and the Adam
    # moments in bf16 for adamw_half (paper-1b) or fp32 for torch AdamW
    bf16 = json.loads((REPO / "ds_configs" / f"{preset}.json").read_text())["bf16"]["enabled"]
    optim_file = full / "checkpoints" / f"step{N}" / ("bf16_" * bf16 + "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    moments = torch.load(optim_file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    moment_dtypes = {s["exp_avg"].dtype for s in moments["optimizer_state_dict"]["state"].values()}
    assert moment_dtypes == {torch.bfloat16 if cfg.optim.name == "adamw_half" else torch.float32}

    # exact resume: a new process from the step-N checkpoint reproduces steps N+1..2N and the evaluation
    deepspeed_train(preset, settings_for(preset, shapes_data, pretrained, resumed) +
                    [f"train.resume={full}/checkpoints/step{N}"])
    again = metrics(resumed)
    assert [r["step"] for r in again] == list(range(N + 1, 2 * N + 1))
    assert [r["loss"] for r in again] == [r["loss"] for r in run[N:]]
    assert [r["grad_norm"] for r in again] == [r["grad_norm"] for r in run[N:]]
    assert json.loads((resumed / "eval.json").read_text()) == json.loads((full / "eval.json").read_text())

    # frozen parameters: the ones the preset freezes, bit-equal across training (and to the pretrained file)
    at_n, frozen, buffers = checkpoint_state(full, f"step{N}")
    at_end, _, _ = checkpoint_state(full, f"step{2 * N}")
    model = BriVL(cfg.model, vocab_size=len(load_tokenizer(cfg.model.text.tokenizer_path or
                                                           cfg.model.text.pretrained_path)))
    expected_frozen = {f"online.{n}" for n, p in model.named_parameters() if not p.requires_grad}
    assert bool(expected_frozen) == (preset in PRETRAINED_BERT)  # base and paper-1b freeze; tiny, 10b train all
    assert {n for n in frozen if n.startswith("online.")} == expected_frozen
    assert all(torch.equal(at_n[n], at_end[n]) for n in expected_frozen)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if preset in PRETRAINED_BERT:  # as the README says: the top 4 text layers and the top 2 CNN groups
        text_layers = {int(n.split(".")[4]) for n in trainable if n.startswith("text.encoder.encoder.layer.")}
        cnn_parts = {".".join(n.split(".")[2:4]) if ".blocks." in n else n.split(".")[2]
                     for n in trainable if n.startswith("image.backbone.")}
        assert text_layers == {2, 3, 4, 5} and cnn_parts == {"blocks.5", "blocks.6", "conv_head", "bn2"}, \
            (text_layers, cnn_parts)
    assert sum(not torch.equal(at_n[f"online.{n}"], at_end[f"online.{n}"]) for n in trainable) > len(trainable) // 2
    bn_stats = [b for b in buffers if b.startswith("online.image.backbone.") and "running_" in b]
    assert all(torch.equal(at_n[b], at_end[b]) for b in bn_stats)
    if preset in PRETRAINED_BERT:
        assert bn_stats  # EfficientNet BatchNorm
        dtype = torch.bfloat16  # the shipped config: the engine holds parameters in bf16
        cnn = torch.load(pretrained["cnn"], weights_only=True)
        for b in bn_stats:  # the statistics are the pretrained ones, exactly (fp32, never rounded)
            assert torch.equal(at_end[b], cnn[b.removeprefix("online.image.backbone.")]), b
        from transformers import AutoModel
        bert = AutoModel.from_pretrained(str(pretrained[preset])).state_dict()
        loaded = {**{f"online.image.backbone.{k}": v for k, v in cnn.items()},
                  **{f"online.text.encoder.{k}": v for k, v in bert.items()}}
        checked = [n for n in expected_frozen if n in loaded]
        assert len(checked) == len(expected_frozen)  # every frozen parameter came from a pretrained file
        for n in checked:
            assert torch.equal(at_end[n], loaded[n].to(dtype).float()), n

    # The eval command and the export read the bf16 ZeRO-3 checkpoint (EfficientNet with frozen BN statistics,
    # pretrained BERT, frozen layers): once, for the largest preset (base's checkpoint takes the same path; the
    # suite's time is precious). Checked against what they do not share code with: DeepSpeed's own zero_to_fp32
    # consolidation, the pretrained files, and the run's own bf16 evaluation.
    if preset != "paper-1b":
        return
    import brivl_ds
    from brivl_ds.data.shards import read_table
    from brivl_ds.eval import main as eval_command  # its main, in this process (a process start saved)
    from brivl_ds.export import export
    from brivl_ds.evaluation.recall import recall_at_k
    from safetensors.torch import load_file

    folder = export(full / "checkpoints", tmp_path / "exported")
    weights = load_file(str(folder / "model.safetensors"))
    assert set(weights) == {k.removeprefix("online.") for k in at_end if k.startswith("online.")}
    for name, value in weights.items():  # every weight and buffer, exactly: bf16 values widened to fp32 both ways
        assert torch.equal(value, at_end[f"online.{name}"]), name
    stats = [n for n in weights if n.startswith("image.backbone.") and n.endswith("running_var")]
    assert stats and all(torch.equal(weights[n], cnn[n.removeprefix("image.backbone.")]) for n in stats)

    rows = read_table(shapes_data["eval"], columns=["image", "text", "boxes"]).to_pylist()
    images, boxes, texts = [r["image"] for r in rows], [r["boxes"] for r in rows], [r["text"] for r in rows]
    # The run evaluated in bf16 under ZeRO-3, 4 pairs per rank and batch; the export, run in bf16 here on all 48 at
    # once, must agree up to bf16 rounding, far below how the held-out pairs differ from each other. (Measured:
    # 0.009 for images, 0.003 for texts; fp32 against bf16 is 0.3 and 0.09 on this barely trained model, whose
    # pairs sit close together; misaligned rows give about 2.)
    during = torch.load(full / "eval_embeddings.pt")
    in_bf16 = brivl_ds.load_model(folder, dtype=torch.bfloat16)
    for ours, theirs in ((in_bf16.embed_images(images, boxes), during["image"]),
                         (in_bf16.embed_texts(texts), during["text"])):
        assert relative_error_to_spread(ours, theirs) < 0.05, relative_error_to_spread(ours, theirs)
    exported = brivl_ds.load_model(folder)
    image, text = exported.embed_images(images, boxes), exported.embed_texts(texts)
    eval_command(["--checkpoint", str(full / "checkpoints"), "--out", str(tmp_path / "eval.json"),
                  "--save-embeddings", str(tmp_path / "offline.pt")])
    offline = torch.load(tmp_path / "offline.pt")  # fp32 both, batched differently
    torch.testing.assert_close(offline["image"], image, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(offline["text"], text, rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "eval.json").read_text()) == pytest.approx(
        {**recall_at_k(offline["image"], offline["text"]), "skipped_rows": 0.0})  # its own embeddings' recall
