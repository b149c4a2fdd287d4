import json

import pytest

from brivl_ds.config import Config, apply_override, build_config, get_preset
from brivl_ds.ds_config import load_ds_config


def test_overrides_are_typed():
    cfg = build_config("tiny", ["optim.lr=3e-4", "model.image.backbone=resnet18", "moco.learn_tau=false",
                                "model.text.pretrained_path=none", "train.max_steps=7"])
    assert cfg.optim.lr == 3e-4 and cfg.model.image.backbone == "resnet18"
    assert cfg.moco.learn_tau is False and cfg.model.text.pretrained_path is None and cfg.train.max_steps == 7


@pytest.mark.parametrize("bad", ["optim.lrr=1", "nosection.x=1", "optim=3", "model.image=1", "optim.lr"])
def test_unknown_or_malformed_overrides_fail_loudly(bad):
    with pytest.raises((KeyError, ValueError)):
        apply_override(Config(), bad)


def test_presets_match_the_paper_and_official_config():
    base, paper = get_preset("base"), get_preset("paper-1b")
    assert (base.model.embed_dim, base.moco.queue_size, base.moco.tau_init, base.model.image.image_size) == \
        (2048, 9600, 0.07, 380)
    assert (paper.model.embed_dim, paper.moco.queue_size, paper.moco.tau_init, paper.moco.momentum) == \
        (2560, 16384, 0.05, 0.99)
    assert (paper.model.text.num_layers, paper.model.text.hidden_size, paper.model.text.num_heads) == (24, 1024, 16)
    assert paper.model.image.backbone.startswith("tf_efficientnet_b7") and paper.model.image.image_size == 600
    assert paper.train.epochs == 15 and paper.data.batch_size == 16


def test_paper_1b_builds_on_meta_and_counts_about_a_billion():
    from brivl_ds.presets import parameter_report

    report = parameter_report("paper-1b")
    assert report["momentum"] == report["online"]
    assert 0.9e9 < report["total"] < 1.2e9, report
    assert report["online_trainable"] < report["online"]  # lower RoBERTa layers and CNN stages frozen


def test_ds_config_refuses_settings_the_trainer_owns(tmp_path):
    cfg = get_preset("tiny")
    ds = load_ds_config(cfg)
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == cfg.optim.grad_clip
    assert ds["train_micro_batch_size_per_gpu"] == cfg.data.batch_size
    bad = tmp_path / "bad.json"
    cfg.train.ds_config = str(bad)
    # each value the trainer config owns, set differently in the JSON: refused, naming the --set to use
    for key, value, setting in (("train_micro_batch_size_per_gpu", 7, "data.batch_size"),
                                ("gradient_accumulation_steps", 3, "train.grad_accum_steps"),
                                ("gradient_clipping", 5.0, "optim.grad_clip")):
        bad.write_text(json.dumps({"zero_optimization": {"stage": 3}, key: value}))
        with pytest.raises(ValueError, match=f"{key}={value}.*use --set {setting}="):
            load_ds_config(cfg)
    for key in ("train_batch_size", "optimizer", "scheduler"):
        bad.write_text(json.dumps({"zero_optimization": {"stage": 3}, key: {"type": "x"} if key != "train_batch_size"
                                   else 64}))
        with pytest.raises(ValueError, match=f"sets '{key}'; the trainer owns it"):
            load_ds_config(cfg)
    bad.write_text('{"zero_optimization": {"stage": 2}}')
    with pytest.raises(ValueError, match="stage 3"):
        load_ds_config(cfg)
    for offload in ("offload_optimizer", "offload_param"):  # ZeRO-Offload: refused with the reason and alternatives
        bad.write_text(json.dumps({"zero_optimization": {"stage": 3, offload: {"device": "cpu"}}}))
        with pytest.raises(ValueError, match=f"{offload}: ZeRO-Offload is not supported.*adamw_half"):
            load_ds_config(cfg)
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"}}}))
    assert "offload_optimizer" in load_ds_config(cfg)["zero_optimization"]  # "none" is no offload


def test_presets_command_prints_the_config_and_the_parameter_count(capsys):
    from brivl_ds.presets import main

    main(["base", "--set", "moco.queue_size=123"])
    out = capsys.readouterr().out
    assert '"queue_size": 123' in out and '"embed_dim": 2048' in out
    assert "momentum" in out and "445,855,841" in out  # online + momentum + tau, built on the meta device


@pytest.mark.parametrize("preset,text_layers", [("base", {8, 9, 10, 11}), ("paper-1b", {20, 21, 22, 23})])
def test_presets_train_the_top_text_layers_and_cnn_stages_the_readme_names(preset, text_layers):
    import torch

    from brivl_ds.models.brivl import BriVL

    cfg = get_preset(preset)
    with torch.device("meta"):
        model = BriVL(cfg.model, vocab_size=21128)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {int(n.split(".")[4]) for n in trainable if n.startswith("text.encoder.encoder.layer.")} == text_layers
    assert not any(n.startswith("text.encoder.embeddings.") for n in trainable)
    cnn = {".".join(n.split(".")[2:4]) if ".blocks." in n else n.split(".")[2]
           for n in trainable if n.startswith("image.backbone.")}
    assert cnn == {"blocks.5", "blocks.6", "conv_head", "bn2"}  # the last two stages and the head convolution
