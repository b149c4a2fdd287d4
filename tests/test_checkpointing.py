"""Activation checkpointing: the same outputs and gradients as without it, with dropout and frozen lower layers
(the presets' setting), and the checkpointed blocks really are recomputed."""
import copy

import torch

from brivl_ds.models.brivl import BriVL
from brivl_ds.models.checkpointing import apply_activation_checkpointing
from test_towers import random_batch, small_model_config


def _step(model, batch, seed):
    torch.manual_seed(seed)
    image, text = model(batch)
    weights = torch.randn(2, *image.shape, generator=torch.Generator().manual_seed(9))
    ((image * weights[0]).sum() + (text * weights[1]).sum()).backward()
    return image.detach(), text.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointed_towers_equal_plain_towers_with_dropout_and_frozen_layers():
    last_block = {"convnext_atto": "image.backbone.stages.3.blocks.1", "tf_efficientnet_b0": "image.backbone.blocks.6"}
    for backbone in ("convnext_atto", "tf_efficientnet_b0"):  # tiny's CNN family, and base / paper-1b's
        torch.manual_seed(0)
        cfg = small_model_config(backbone)
        cfg.image.dropout = cfg.text.dropout = cfg.text.encoder_dropout = 0.3
        cfg.text.trainable_top_layers, cfg.image.trainable_backbone_groups = 1, 2
        cfg.image.grad_checkpointing = cfg.text.grad_checkpointing = True
        plain = BriVL(cfg, vocab_size=50).train()
        checkpointed = copy.deepcopy(plain)
        apply_activation_checkpointing(checkpointed, cfg)
        calls = {}
        for path in ("text.self_attention.layers.0.attn", "image.encoder.layers.0.attn", last_block[backbone],
                     "text.encoder.encoder.layer.1.attention"):
            checkpointed.get_submodule(path).register_forward_pre_hook(
                lambda *_, path=path: calls.__setitem__(path, calls.get(path, 0) + 1))
        batch = random_batch()
        expected, got = _step(plain, batch, seed=3), _step(checkpointed, batch, seed=3)
        # forward, then the recompute in the backward (a pre-hook: torch stops a recompute once it has what the
        # backward needs, which may be before a block returns)
        assert set(calls.values()) == {2}, calls
        torch.testing.assert_close(got[:2], expected[:2], rtol=0, atol=0)
        assert got[2].keys() == expected[2].keys()
        assert not any("encoder.embeddings" in n for n in got[2])  # frozen layers stay without gradients
        for name, grad in expected[2].items():
            torch.testing.assert_close(got[2][name], grad, rtol=1e-6, atol=1e-7, msg=f"{backbone}: {name}")
        # without a graph (evaluation, the momentum towers) nothing is recomputed
        calls.clear()
        with torch.no_grad():
            checkpointed(batch)
        assert set(calls.values()) == {1}, calls
