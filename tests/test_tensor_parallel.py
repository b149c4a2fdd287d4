"""Tensor parallelism (megatron-core) on CPU/gloo: TP=2 towers equal the TP=1 towers they were split from.

References are the unsplit towers in the same process: outputs must match, and every parameter's gradient must
equal the matching slice of the TP=1 gradient (row-parallel biases and replicated parameters whole).
"""
import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import run_distributed
from test_towers import random_batch, small_model_config


def test_megatron_core_imports_on_a_cpu_only_host():
    import megatron.core  # failed on CPU-only hosts in 0.15.0 (Megatron-LM issue 2715)
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: F401

    assert megatron.core.__version__


VOCAB = 51  # odd: the vocabulary-parallel embedding pads it to 52, and the padding row must never matter


def sliced_like(reference: torch.nn.Module, values: dict[str, torch.Tensor], tp: int, rank: int, group):
    """A copy of `reference` holding `values` (e.g. its gradients) in place of its weights, split like the model:
    the expected per-rank slice of every TP parameter, by the same rules, for free."""
    from brivl_ds.parallel.tensor_parallel import parallelize_towers

    holder = copy.deepcopy(reference)
    for name, p in holder.named_parameters():
        p.data = values[name].clone()
    return dict(parallelize_towers(holder, tp, rank, group, vocab_parallel=True).named_parameters())


def _tp_worker(rank, world, pretrained_dir, backbone):
    import torch.distributed as dist

    from brivl_ds.models.brivl import BriVL
    from brivl_ds.parallel.groups import init_tensor_parallel
    from brivl_ds.parallel.tp_plan import parameters_per_tp_rank
    from brivl_ds.parallel.rng import init_tensor_parallel_rng
    from brivl_ds.parallel.tensor_parallel import parallelize_towers

    dist.init_process_group("gloo")
    groups = init_tensor_parallel(2)
    assert (groups.tp, groups.dp, groups.tp_rank) == (2, 1, rank)
    init_tensor_parallel_rng(0, groups.tp_rank, torch.device("cpu"))
    torch.manual_seed(0)  # the same whole model on both ranks, as every TP rank builds it
    cfg = small_model_config(backbone)
    cfg.text.num_heads, cfg.text.sa_heads, cfg.image.num_heads = 4, 4, 4
    cfg.text.trainable_top_layers = 1  # frozen layers stay frozen in their TP form
    vit = backbone.startswith(("vit", "eva"))
    if vit:  # the 10b preset's image tower: a ViT with QK-norm and LayerScale, split too
        cfg.image.qk_norm, cfg.image.layer_scale, cfg.image.trainable_backbone_groups = True, 0.1, 6
    if backbone.startswith("eva"):  # EVA-02 (RoPE, SwiGLU, q / v bias vectors) at 2 blocks, the lower one frozen
        cfg.image.image_size, cfg.image.backbone_depth, cfg.image.trainable_backbone_groups = 56, 2, 2
    if pretrained_dir:
        cfg.text.pretrained_path = pretrained_dir
    reference = BriVL(cfg, vocab_size=VOCAB).train()
    for name, p in reference.named_parameters():  # EVA inits its q / v biases to zero: make their split matter
        if name.endswith(("attn.q_bias", "attn.v_bias")):
            p.data.normal_(0, 0.5)
    reference.text.encoder.embeddings.word_embeddings.weight.requires_grad_(True)  # to compare its gradient slices
    model = parallelize_towers(copy.deepcopy(reference), 2, groups.tp_rank, groups.tp_group, vocab_parallel=True)
    split = [n for n, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False)]
    held = {t: sum(p.numel() for p in model.get_submodule(t).parameters()) for t in ("image", "text")}
    assert held == parameters_per_tp_rank(reference, 2, vocab_parallel=True)  # the planner's exact count
    assert any(".query." in n for n in split) and any("attn.qkv" in n for n in split) and any("head.fc1" in n
                                                                                                for n in split)
    assert any(n.startswith("image.backbone.blocks.1.attn.qkv") for n in split) == vit
    assert any(n.endswith("attn.q_bias") for n in split) == backbone.startswith("eva")
    assert model.text.encoder.embeddings.word_embeddings.weight.shape[0] == 26  # (51 + 1 padding row) / 2
    batch = random_batch(vocab=VOCAB, size=cfg.image.image_size)
    batch.input_ids[:, -1] = 0  # the padding token (padding_idx: no gradient on its row, on rank 0 only)
    weights = torch.randn(2, 3, cfg.embed_dim, generator=torch.Generator().manual_seed(3))
    outputs = {}
    for name, m in (("tp1", reference), ("tp2", model)):
        image, text = m(batch)
        ((image * weights[0]).sum() + (text * weights[1]).sum()).backward()
        outputs[name] = (image.detach(), text.detach())
    torch.testing.assert_close(outputs["tp2"], outputs["tp1"], rtol=1e-5, atol=1e-6)
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in reference.named_parameters()}
    expected = sliced_like(reference, grads, 2, groups.tp_rank, groups.tp_group)
    for name, p in model.named_parameters():
        if p.requires_grad:  # (timm's unused head norm has no gradient in either)
            got = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(got, expected[name], rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert p.grad is None, name
    # consolidation puts the TP shards back together by the same plan: every split style, EVA's vectors included
    from brivl_ds.checkpointing.consolidate import merge_tp_shards

    shards = [None, None]
    local = {n: t.detach().float() for n, t in model.state_dict().items() if torch.is_tensor(t)}
    dist.all_gather_object(shards, local, group=groups.tp_group)
    merged = merge_tp_shards(shards, reference, prefixes=("",), vocab_parallel=True)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(merged[name], value.float(), rtol=0, atol=0, msg=name)
    frozen = {n for n, p in reference.named_parameters() if not p.requires_grad}
    # the trainer's per-step check that the TP ranks of a group were given the same batch
    from brivl_ds.parallel.groups import check_same_batch

    check_same_batch(batch, groups.tp_group, torch.device("cpu"))
    if rank == 1:
        batch.input_ids[0, 0] += 1
    with pytest.raises(RuntimeError, match="different batches"):
        check_same_batch(batch, groups.tp_group, torch.device("cpu"))
    assert frozen == {n for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.slow
def test_tp2_towers_equal_tp1_outputs_and_gradients(tmp_path):
    """With a text encoder loaded from a `save_pretrained` directory: q, k and v must split by whole heads."""
    from brivl_ds.models.text_tower import TextTower

    torch.manual_seed(5)
    cfg = small_model_config().text
    cfg.num_heads = 4
    TextTower(cfg, 24, vocab_size=VOCAB).encoder.save_pretrained(tmp_path / "bert")
    run_distributed(_tp_worker, 2, str(tmp_path / "bert"), "test_convnext")


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["vit_small_patch16_224", "eva02_small_patch14_224"])
def test_tp2_vit_image_tower_equals_tp1(backbone):
    """A ViT or EVA-02 backbone (6 heads, QK-norm, LayerScale, lower blocks frozen) is split like the text
    encoder; EVA's own attention forward cannot run split, so it runs ours (eva_attention_forward)."""
    run_distributed(_tp_worker, 2, None, backbone)


def _captured_core_outputs(model, batch) -> dict[str, torch.Tensor]:
    """Run `model` and return, per attention core, what it hands to its row-parallel output projection: the
    rank's own heads after attention dropout."""
    captured, hooks = {}, []
    for core, out in (("image.encoder.layers.0.attn", "image.encoder.layers.0.attn.out"),
                      ("text.encoder.encoder.layer.0.attention.self",
                       "text.encoder.encoder.layer.0.attention.output.dense")):
        hooks.append(model.get_submodule(out).register_forward_pre_hook(
            lambda m, args, core=core: captured.setdefault(core, args[0].detach().clone())))
    model(batch)
    for h in hooks:
        h.remove()
    return captured


def _dropout_worker(rank, world):
    import torch.distributed as dist

    from brivl_ds.checkpointing.rng_state import rng_state, set_rng_state
    from brivl_ds.models.brivl import BriVL
    from brivl_ds.parallel.groups import init_tensor_parallel
    from brivl_ds.parallel.rng import init_tensor_parallel_rng
    from brivl_ds.parallel.tensor_parallel import parallelize_towers

    dist.init_process_group("gloo")
    groups = init_tensor_parallel(2)
    torch.manual_seed(0)
    cfg = small_model_config()
    cfg.text.num_heads, cfg.image.num_heads = 4, 4
    cfg.image.dropout = cfg.text.dropout = cfg.text.encoder_dropout = 0.5
    model = parallelize_towers(BriVL(cfg, vocab_size=50), 2, groups.tp_rank, groups.tp_group).train()
    # q = k = 0 and v = 1 in every local head: each head's output is its dropout mask averaged over the keys
    for path in ("image.encoder.layers.0.attn.qkv",):
        layer = model.get_submodule(path)
        with torch.no_grad():
            layer.weight.zero_()
            layer.bias.zero_()
            layer.bias[2 * layer.bias.numel() // 3:] = 1.0
    attention = model.text.encoder.encoder.layer[0].attention.self
    with torch.no_grad():
        for layer in (attention.query, attention.key, attention.value):
            layer.weight.zero_()
            layer.bias.zero_()
        attention.value.bias.fill_(1.0)
    batch = random_batch()

    def gathered(tensor):
        out = [torch.empty_like(tensor) for _ in range(2)]
        dist.all_gather(out, tensor.contiguous())
        return out

    for shared_stream in (False, True):  # per-TP-rank streams, then (the control) one stream on both ranks
        init_tensor_parallel_rng(0, 0 if shared_stream else groups.tp_rank, torch.device("cpu"))
        torch.manual_seed(1)
        captured = _captured_core_outputs(model, batch)
        for core, local in captured.items():
            assert not torch.allclose(local, torch.ones_like(local)), core  # dropout did act
            mine, theirs = gathered(local)
            assert torch.equal(mine, theirs) == shared_stream, core
        # replicated activations: one dropout mask on every TP rank, so the embeddings are the same tensor
        image, text = model(batch)
        for tensor in (image, text):
            mine, theirs = gathered(tensor.detach())
            assert torch.equal(mine, theirs)

    # the per-TP-rank stream is part of the checkpointed RNG state: after restoring it, the same masks again
    init_tensor_parallel_rng(0, groups.tp_rank, torch.device("cpu"))
    model(batch)  # advance the streams
    saved = rng_state()
    first = _captured_core_outputs(model, batch)
    set_rng_state(saved)
    again = _captured_core_outputs(model, batch)
    for core in first:
        assert torch.equal(first[core], again[core]), core
    set_rng_state(saved)
    init_tensor_parallel_rng(0, groups.tp_rank, torch.device("cpu"))  # the control: the stream restarted instead
    fresh = _captured_core_outputs(model, batch)
    assert not all(torch.equal(first[c], fresh[c]) for c in first)

    # activation checkpointing: the recompute must draw the per-TP-rank masks its forward drew
    from brivl_ds.parallel.activation_checkpointing import apply_activation_checkpointing

    cfg.image.grad_checkpointing = cfg.text.grad_checkpointing = True
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        tower = parallelize_towers(BriVL(cfg, vocab_size=50), 2, groups.tp_rank, groups.tp_group).train()
        if checkpointing:
            apply_activation_checkpointing(tower, cfg)
        init_tensor_parallel_rng(0, groups.tp_rank, torch.device("cpu"))
        torch.manual_seed(1)
        image, text = tower(batch)
        (image.sum() + 2 * text.sum()).backward()
        grads.append({n: p.grad for n, p in tower.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_split_activations_get_per_rank_dropout_masks_and_resume_exactly():
    """Attention dropout on a rank's own heads draws from a per-TP-rank stream (megatron's tracker, or its CPU
    counterpart), the rest of the dropout from the stream shared by the TP ranks; both are checkpointed, and an
    activation-checkpointed recompute replays both."""
    run_distributed(_dropout_worker, 2)


def test_heads_must_split_over_tp():
    from brivl_ds.parallel.tp_plan import head_rows

    assert head_rows(8, 4, 2, 1, fused=3).tolist() == [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]
    with pytest.raises(ValueError, match="heads % TP"):
        head_rows(12, 3, 2, 0)


# ------------------------------------------------------------------ through the launcher: TP=2 x DP=2 vs TP=1 x DP=2
N = 3


def launch_tiny(out_dir, data, tp, *extra):
    from conftest import deepspeed_train

    settings = [f"train.output_dir={out_dir}", f"data.train_path={data['train']}", f"data.eval_path={data['eval']}",
                f"model.text.tokenizer_path={data['tokenizer']}", "model.image.image_size=64", "data.batch_size=4",
                "moco.queue_size=12", f"train.max_steps={2 * N}", f"train.save_every={N}", "optim.warmup_steps=2",
                "train.progress_bar=false", f"parallel.tensor_parallel={tp}", "moco.negatives=queue+batch",
                "moco.mask_false_negatives=true", *extra]
    return deepspeed_train("tiny", settings, world=2 * tp)


def metric(out_dir, key):
    return [json.loads(line)[key] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def assembled_queue(checkpoint: Path, key: str) -> torch.Tensor:
    """The queue rebuilt from every rank's saved slice (each rank saves the rows of its global rank)."""
    shards = [torch.load(f, map_location="cpu", weights_only=False)[key]
              for f in sorted(checkpoint.glob("zero_pp_rank_*_model_states.pt"))]
    queue = torch.zeros(shards[0]["size"], shards[0]["rows"].shape[1])
    for shard in shards:
        queue[shard["start"]:shard["start"] + shard["rows"].shape[0]] = shard["rows"]
    return queue


@pytest.mark.slow
def test_tp2_dp2_matches_tp1_dp2_step_for_step_and_resumes_exactly(shapes_data, tmp_path):
    """`deepspeed --num_gpus 4 ... --set parallel.tensor_parallel=2` against `--num_gpus 2` (the same data-parallel
    layout, so the same batches), fp32: the same losses, gradient norms, queues, recall and zero-shot accuracy; then
    TP=2 resumes from step N in a new process bit for bit, and TP=2's checkpoint resumes at TP=1 (resharded). The
    objective is queue+batch with false negatives masked: the queue, and the batch's keys and content ids gathered
    over the data-parallel group only (the TP ranks of a group hold the same batch)."""
    from brivl_ds.evaluation.zeroshot import make_shapes_benchmark

    tp1, tp2, resumed, tp_to_1 = tmp_path / "tp1", tmp_path / "tp2", tmp_path / "resumed", tmp_path / "tp2-to-tp1"
    bench = tmp_path / "zeroshot"  # the held-out pictures by background colour, classified at the evaluation
    make_shapes_benchmark(shapes_data["eval"], bench)
    zeroshot = [f"data.zeroshot_path={bench}", f"data.zeroshot_classes={bench / 'classes.txt'}"]
    launch_tiny(tp1, shapes_data, 1, "train.save_eval_embeddings=true", *zeroshot)
    log = launch_tiny(tp2, shapes_data, 2, "parallel.vocab_parallel=true", "train.save_eval_embeddings=true", *zeroshot)
    assert f"eval @ step {2 * N}" in log
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor(metric(tp2, key)), torch.tensor(metric(tp1, key)), rtol=1e-5,
                                   atol=1e-6, msg=key)
    assert sorted(p.name for p in (tp2 / "checkpoints" / f"step{2 * N}").glob("*model_states.pt")) == [
        f"zero_pp_rank_{d}_mp_rank_0{m}_model_states.pt" for d in (0, 1) for m in (0, 1)]  # one set per TP rank
    for key in ("image_queue", "text_queue"):  # every rank of the world holds the same queue as TP=1's
        torch.testing.assert_close(assembled_queue(tp2 / "checkpoints" / f"step{2 * N}", key),
                                   assembled_queue(tp1 / "checkpoints" / f"step{2 * N}", key), rtol=1e-5, atol=1e-6)
    # the weights, online and momentum, consolidated from each run's checkpoint (every DP and TP shard)
    from brivl_ds.config import build_config
    from brivl_ds.data.tokenizer import load_tokenizer
    from brivl_ds.models.brivl import BriVL
    from brivl_ds.moco.model import BriVLMoCo
    from brivl_ds.checkpointing.consolidate import consolidate

    cfg = build_config("tiny", ["model.image.image_size=64"])
    whole = BriVLMoCo(BriVL(cfg.model, vocab_size=len(load_tokenizer(shapes_data["tokenizer"]))), cfg.moco)
    weights = [consolidate(d / "checkpoints" / f"step{2 * N}", whole, vocab_parallel=d == tp2) for d in (tp1, tp2)]
    names = [n for n, _ in whole.named_parameters()]
    assert all(n in weights[0] and n in weights[1] for n in names)
    for name in names:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-4, atol=1e-5, msg=name)
    # The evaluation: TP=2's held-out embeddings (gathered over its data-parallel group) are TP=1's, to fp32
    # rounding of another summation order. Recalls are compared through the embeddings, not with each other: this
    # barely trained model puts the pairs so close together that a 1e-6 difference may reorder two candidates
    # on another CPU. Each run's recall is its own embeddings' recall.
    from brivl_ds.evaluation.recall import recall_at_k

    embeddings = [torch.load(d / "eval_embeddings.pt") for d in (tp1, tp2)]
    evaluations = [json.loads((d / "eval.json").read_text()) for d in (tp1, tp2)]
    zeroshot_results = [{k: e.pop(k) for k in list(e) if k.startswith("zeroshot_")} for e in evaluations]
    for evaluation, emb in zip(evaluations, embeddings):
        assert evaluation == pytest.approx({"step": 2 * N, **recall_at_k(emb["image"], emb["text"]),
                                            "skipped_rows": 0.0})
    for modality in ("image", "text"):
        torch.testing.assert_close(embeddings[1][modality], embeddings[0][modality], rtol=1e-4, atol=1e-5)
    # Zero-shot with the towers split over TP ranks: prompts and pictures sharded over the data-parallel groups, TP
    # ranks encoding the same rows together. TP=2's accuracy is TP=1's and the zero-shot command's on TP=2's
    # export. Only a picture whose two best classes are within 1e-5 (a near-tie: the runs' weights agree to 1e-5)
    # may be decided differently, so the accuracies may differ by at most that many pictures.
    import functools

    import brivl_ds
    from brivl_ds.evaluation.zeroshot import ZH_TEMPLATES, class_embeddings, read_classes, read_image_folder
    from brivl_ds.export import export
    from brivl_ds.inference.encode import embed_image_sources, embed_texts_batched
    from brivl_ds.zeroshot import main as zeroshot_command

    folder = export(tp2 / "checkpoints", tmp_path / "exported")
    report = zeroshot_command(["--model", str(folder), "--data", str(bench), "--classes", str(bench / "classes.txt"),
                               "--out", str(tmp_path / "zeroshot-out"), "--no-progress"])
    model, classes = brivl_ds.load_model(folder), read_classes(bench / "classes.txt")
    weights_zs = class_embeddings(functools.partial(embed_texts_batched, model), classes, list(ZH_TEMPLATES))
    scores = embed_image_sources(model, read_image_folder(bench, classes).images)[0].double() @ weights_zs.double().t()
    best_two = scores.topk(2).values
    near_ties = int(((best_two[:, 0] - best_two[:, 1]) <= 1e-5).sum())
    assert near_ties <= 12, near_ties  # most decisions are clear, else the comparison below would say little
    for result in zeroshot_results:
        assert result["zeroshot_n"] == 48.0
        assert abs(result["zeroshot_acc1"] - report["metrics"]["acc1"]) * 48 <= near_ties + 1e-9, (result, report)

    # the eval command consolidates the TP shards (both data-parallel and tensor-parallel) into the whole model
    from brivl_ds.eval import main as eval_command  # its main, in this process (a process start saved)

    eval_command(["--checkpoint", str(tp2 / "checkpoints"), "--out", str(tp2 / "offline.json"),
                  "--save-embeddings", str(tp2 / "offline.pt")])
    offline = torch.load(tp2 / "offline.pt")
    for modality in ("image", "text"):
        torch.testing.assert_close(offline[modality], embeddings[0][modality], rtol=1e-4, atol=1e-5)

    launch_tiny(resumed, shapes_data, 2, "parallel.vocab_parallel=true", f"train.resume={tp2}/checkpoints/step{N}")
    assert metric(resumed, "loss") == metric(tp2, "loss")[N:]
    assert metric(resumed, "grad_norm") == metric(tp2, "grad_norm")[N:]

    # across TP sizes: TP=2's step-N checkpoint (vocab-parallel embedding too) resumed with TP=1 on the same 2
    # data-parallel ranks follows TP=1's own run, as closely as TP=2 itself does
    log = launch_tiny(tp_to_1, shapes_data, 1, f"train.resume={tp2}/checkpoints/step{N}")
    assert "(2 data-parallel x 2 tensor-parallel ranks) onto 2 x 1" in log
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor(metric(tp_to_1, key)), torch.tensor(metric(tp1, key)[N:]),
                                   rtol=1e-5, atol=1e-6, msg=key)


def test_sequence_parallel_is_refused_before_anything_starts():
    from brivl_ds.config import build_config
    from brivl_ds.training.trainer import Trainer

    with pytest.raises(ValueError, match="sequence_parallel"):
        Trainer(build_config("tiny", ["parallel.sequence_parallel=true"]))


@pytest.mark.parametrize("change, reason", [
    ({"proj_drop_rate": 0.1}, "projection dropout"),
    ({"scale_attn_norm": True}, "attention with scale-norm or a gate"),
    ("gated attention", "attention with scale-norm or a gate"),
    ({"attn_layer": "diff"}, "DiffAttention attention is not split by the plan"),
    ({"scale_mlp_norm": True}, "Mlp with a norm over its hidden features"),
])
def test_vit_blocks_that_cannot_split_are_refused_at_tp2(change, reason):
    """What tensor parallelism cannot split in a timm ViT is refused with the reason (before anything is built or
    launched), never replicated or cut wrongly; the same backbone passes at TP = 1, the plain one at TP = 2."""
    import timm
    from timm.models.vision_transformer import Attention

    from brivl_ds.parallel.tp_plan import check_backbone_splits

    def vit(**kwargs):
        return timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=0, device="meta", **kwargs)

    check_backbone_splits(vit(), 2)
    if change == "gated attention":
        backbone = vit()
        backbone.blocks[0].attn = Attention(192, 3, qkv_bias=True, gated=True, device="meta")
    else:
        backbone = vit(**change)
    check_backbone_splits(backbone, 1)
    with pytest.raises(ValueError, match=f"blocks.0: tensor parallelism cannot split {reason}"):
        check_backbone_splits(backbone, 2)


def test_per_depth_mixed_rope_is_refused_at_tp2():
    import timm

    from brivl_ds.parallel.tp_plan import check_backbone_splits

    backbone = timm.create_model("vit_small_patch16_rope_mixed_224", depth=1, num_classes=0, device="meta")
    check_backbone_splits(backbone, 1)
    with pytest.raises(ValueError, match="mixed RoPE does not split"):
        check_backbone_splits(backbone, 2)
