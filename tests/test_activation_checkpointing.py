"""Activation checkpointing: the same outputs and gradients as without it, with dropout and frozen lower layers
(the presets' setting), and the checkpointed blocks really are recomputed."""
import copy

import pytest
import torch

from brivl_ds.models.brivl import BriVL
from brivl_ds.parallel.activation_checkpointing import apply_activation_checkpointing
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


@pytest.mark.parametrize("backbone, image_size", [
    ("vit_tiny_patch16_224", 64),  # 10b's family: timm VisionTransformer blocks (4 x 4 patches)
    ("eva02_tiny_patch14_224", 56),  # EVA-02: RoPE, SwiGLU, keyword arguments into each block (4 x 4 patches)
])
def test_checkpointed_vit_towers_equal_plain_towers_with_dropout_and_frozen_blocks(backbone, image_size):
    """The 10b setting shrunk: QK-norm and LayerScale on (1e-5, as the preset), 3 blocks of which the lowest is
    frozen (so the input of block 1, the lowest trainable one, needs no gradient: the case a reentrant checkpoint
    gets wrong), dropout in the box and text layers (timm's blocks have none here: create_backbone sets none)."""
    torch.manual_seed(0)
    cfg = small_model_config(backbone)
    cfg.image.image_size, cfg.image.backbone_depth, cfg.image.qk_norm, cfg.image.layer_scale = image_size, 3, True, 1e-5
    cfg.image.dropout = cfg.text.dropout = cfg.text.encoder_dropout = 0.3
    cfg.text.trainable_top_layers, cfg.image.trainable_backbone_groups = 1, 2  # blocks 1-2 (and norm) train
    cfg.image.grad_checkpointing = cfg.text.grad_checkpointing = True
    plain = BriVL(cfg, vocab_size=50).train()
    checkpointed = copy.deepcopy(plain)
    apply_activation_checkpointing(checkpointed, cfg)
    blocks = [f"image.backbone.blocks.{i}" for i in range(3)]
    paths, calls = blocks + ["image.encoder.layers.0.attn", "text.encoder.encoder.layer.1.attention"], {}
    for path in paths:
        checkpointed.get_submodule(path).register_forward_pre_hook(
            lambda *_, path=path: calls.__setitem__(path, calls.get(path, 0) + 1))
    batch = random_batch(size=image_size)
    expected, got = _step(plain, batch, seed=3), _step(checkpointed, batch, seed=3)
    # trainable blocks are recomputed in the backward; the frozen block 0 saves nothing, so nothing to recompute
    assert calls == {**dict.fromkeys(paths, 2), blocks[0]: 1}, calls
    torch.testing.assert_close(got[:2], expected[:2], rtol=0, atol=0)
    assert got[2].keys() == expected[2].keys()
    assert f"{blocks[1]}.attn.qkv.weight" in got[2] and f"{blocks[2]}.mlp.fc2.weight" in got[2]
    assert not any(n.startswith((blocks[0], "image.backbone.patch_embed")) for n in got[2])
    for name, grad in expected[2].items():
        # the recompute runs the same kernels on the same inputs; allow a few fp32 ulps of each tensor's scale
        # (LayerScale 1e-5 makes the blocks' gradients ~1e-6, so a fixed atol would hide a wrong one)
        torch.testing.assert_close(got[2][name], grad, rtol=1e-6, atol=1e-6 * grad.abs().max().item(),
                                   msg=f"{backbone}: {name}")
    calls.clear()
    with torch.no_grad():
        checkpointed(batch)
    assert calls == dict.fromkeys(paths, 1), calls


def test_timm_reentrant_checkpointing_is_refused(monkeypatch):
    """TIMM_REENTRANT_CKPT=1 would make timm's checkpointed blocks above a frozen one silently lose their gradients
    (reentrant checkpointing builds no graph when the block's input needs no gradient)."""
    import timm.layers

    cfg = small_model_config()
    cfg.image.grad_checkpointing = True
    monkeypatch.setattr(timm.layers.config, "_USE_REENTRANT_CKPT", True)
    with pytest.raises(ValueError, match="TIMM_REENTRANT_CKPT"):
        apply_activation_checkpointing(BriVL(cfg, vocab_size=50), cfg)
