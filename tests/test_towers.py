import re

import numpy as np
import pytest
import torch

from brivl_ds.config import ImageTowerConfig, ModelConfig, TextTowerConfig
from brivl_ds.models.batchnorm import FrozenStatistics, freeze_batchnorm_statistics
from brivl_ds.models.brivl import IMAGENET_MEAN, IMAGENET_STD, Batch, BriVL, normalize_images
from brivl_ds.models.image_tower import ImageTower
from brivl_ds.models.text_tower import TextTower


def small_model_config(backbone: str = "test_convnext") -> ModelConfig:
    return ModelConfig(image=ImageTowerConfig(backbone=backbone, image_size=64, max_boxes=5, width=32,
                                              num_layers=2, num_heads=2),
                       text=TextTowerConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                            max_length=16, sa_layers=2, sa_heads=2),
                       embed_dim=24)


def random_batch(b=3, n=6, t=9, vocab=50, size=64) -> Batch:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(b, n, 2, generator=g) * size * 0.6
    wh = torch.rand(b, n, 2, generator=g) * size * 0.4 + 2
    boxes = torch.cat([xy, xy + wh], -1)
    box_mask = torch.tensor([[True] * n, [True] * 2 + [False] * (n - 2), [True] + [False] * (n - 1)])[:b]
    ids = torch.randint(5, vocab, (b, t), generator=g)
    attn = torch.ones(b, t, dtype=torch.long)
    attn[1, 5:] = 0
    return Batch(torch.randn(b, 3, size, size, generator=g), boxes, box_mask, ids, attn)


def test_towers_give_unit_vectors_of_the_joint_size():
    torch.manual_seed(0)
    model = BriVL(small_model_config(), vocab_size=50).eval()
    image, text = model(random_batch())
    assert image.shape == (3, 24) and text.shape == (3, 24)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))


def test_padding_boxes_and_padding_tokens_are_ignored():
    torch.manual_seed(0)
    model = BriVL(small_model_config(), vocab_size=50).eval()
    batch = random_batch()
    image, text = model(batch)
    moved = Batch(batch.images, batch.boxes.clone(), batch.box_mask, batch.input_ids.clone(), batch.attention_mask)
    moved.boxes[~batch.box_mask] = torch.tensor([1.0, 2.0, 40.0, 50.0])  # change only the padded boxes
    moved.input_ids[batch.attention_mask == 0] = 7  # and only the padded tokens
    image2, text2 = model(moved)
    torch.testing.assert_close(image, image2)
    torch.testing.assert_close(text, text2)
    real = Batch(batch.images, batch.boxes.clone(), batch.box_mask, batch.input_ids, batch.attention_mask)
    real.boxes[0, 0] = torch.tensor([0.0, 0.0, 10.0, 10.0])  # a real box does matter
    assert not torch.allclose(model(real)[0][0], image[0])


def _bn_layers(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def as_engine_holds_it(tower: ImageTower, dtype: torch.dtype) -> ImageTower:
    """Cast parameters only, buffers stay fp32: what DeepSpeed 0.19.8 does to a module under a bf16 config."""
    for p in tower.parameters():
        p.data = p.data.to(dtype)
    return tower


@pytest.mark.parametrize("backbone,dtype,tol", [
    ("test_resnet", torch.float32, 1e-6),  # nn.BatchNorm2d
    ("tf_efficientnet_b0", torch.float32, 1e-6),  # timm BatchNormAct2d, TF padding: base and paper-1b's family
    ("tf_efficientnet_b0", torch.bfloat16, 2e-2),  # ... as a bf16 engine runs it
])
def test_frozen_batchnorm_statistics_make_embeddings_batch_independent(backbone, dtype, tol):
    """The BN choice (see README): running statistics only, even while training, so a key cannot see its batch;
    the statistics never change and stay fp32 in a bf16 model, whose BN gain/bias are bf16."""
    torch.manual_seed(0)
    cfg = small_model_config(backbone).image
    cfg.trainable_backbone_groups = -1  # every BN gain and bias trains
    tower = as_engine_holds_it(ImageTower(cfg, embed_dim=24), dtype).train()
    bns = _bn_layers(tower.backbone)
    assert bns and all(isinstance(m, FrozenStatistics) for m in bns)
    for m in bns:  # non-trivial statistics, as in a pretrained checkpoint
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    batch = random_batch()
    images = batch.images.to(dtype)
    alone = tower(images[:1], batch.boxes[:1], batch.box_mask[:1])
    together = tower(images, batch.boxes, batch.box_mask)
    torch.testing.assert_close(alone[0].float(), together[0].float(), atol=tol, rtol=0)
    together.float().sum().backward()  # a training step's backward through every BN
    assert all(m.weight.grad is not None and m.weight.grad.dtype == dtype for m in bns)
    for m, (mean, var) in zip(bns, stats):
        assert m.running_mean.dtype == torch.float32 and m.running_var.dtype == torch.float32
        assert torch.equal(mean, m.running_mean) and torch.equal(var, m.running_var)
    # with ordinary train-mode BN the same sample's embedding depends on its batch-mates (far beyond tol)
    cfg.frozen_bn_stats = False
    torch.manual_seed(0)
    plain = ImageTower(cfg, embed_dim=24).train()
    assert (plain(batch.images[:1], batch.boxes[:1], batch.box_mask[:1])[0]
            - plain(batch.images, batch.boxes, batch.box_mask)[0]).abs().max() > 10 * tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_frozen_batchnorm_matches_float64_and_rounds_once(dtype):
    """Output = the float64 formula with the fp32 statistics, rounded to the compute dtype (within one
    unit in the last place: the fp32 math rounds before the final rounding)."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(8, eps=1e-3)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.01, 4.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    assert freeze_batchnorm_statistics(torch.nn.Sequential(bn)) == 1
    bn.weight.data, bn.bias.data = bn.weight.data.to(dtype), bn.bias.data.to(dtype)
    x = torch.randn(4, 8, 5, 5).to(dtype)
    y = bn.train()(x)
    shape = (1, -1, 1, 1)
    ref = ((x.double() - bn.running_mean.double().view(shape)) / (bn.running_var.double().view(shape) + 1e-3).sqrt()
           * bn.weight.double().view(shape) + bn.bias.double().view(shape))
    assert y.dtype == dtype
    if dtype == torch.float32:  # fp32 arithmetic itself, with cancellation in x - mean: relative to the scale
        torch.testing.assert_close(y.double(), ref, rtol=torch.finfo(dtype).eps, atol=1e-6)
        return
    # bf16 / fp16: computed in fp32 and rounded once, so within one unit in the last place of each element (the
    # spacing of `dtype` at the correctly rounded result), and nearly always that value itself
    nearest = ref.to(dtype)
    ulp = (torch.nextafter(nearest, torch.full_like(nearest, float("inf"))) - nearest).double()
    assert ((y.double() - ref).abs() <= ulp).all(), ((y.double() - ref).abs() / ulp).max()
    assert (y != nearest).float().mean() < 0.05


def test_unknown_batchnorm_kinds_are_refused():
    with pytest.raises(TypeError, match="frozen-statistics"):
        freeze_batchnorm_statistics(torch.nn.Sequential(torch.nn.SyncBatchNorm(4)))


def test_freezing_lower_layers():
    cfg = small_model_config()
    cfg.text.trainable_top_layers = 1
    cfg.image.trainable_backbone_groups = 1
    model = BriVL(cfg, vocab_size=50)
    enc = model.text.encoder
    assert not any(p.requires_grad for p in enc.embeddings.parameters())
    assert not any(p.requires_grad for p in enc.encoder.layer[0].parameters())
    assert all(p.requires_grad for p in enc.encoder.layer[1].parameters())
    flags = [p.requires_grad for p in model.image.backbone.parameters()]
    assert any(flags) and not all(flags)
    assert all(p.requires_grad for p in model.image.encoder.parameters())  # the new blocks always train


def test_text_tower_loads_local_pretrained_weights(tmp_path):
    torch.manual_seed(0)
    cfg = small_model_config().text
    tower = TextTower(cfg, 24, vocab_size=50)
    tower.encoder.save_pretrained(tmp_path / "enc")
    cfg.pretrained_path = str(tmp_path / "enc")
    loaded = TextTower(cfg, 24, vocab_size=50)
    for (name, a), b in zip(tower.encoder.state_dict().items(), loaded.encoder.state_dict().values()):
        assert torch.equal(a, b), name


def pretrained_encoder_and_tokenizers(tmp_path, text_cfg: TextTowerConfig):
    """A local pretrained BERT with a 20-token embedding (save_pretrained), its own 20-token tokenizer, and a
    31-token one: what a user pairs by mistake."""
    from brivl_ds.data.tokenizer import write_char_tokenizer

    torch.manual_seed(0)
    TextTower(text_cfg, 24, vocab_size=20).encoder.save_pretrained(tmp_path / "enc")
    write_char_tokenizer(["abcdefghijklmno"], tmp_path / "enc")  # 5 special tokens + 15 characters
    return tmp_path / "enc", write_char_tokenizer(["abcdefghijklmnopqrstuvwxyz"], tmp_path / "big")


def refusal(encoder) -> str:
    return rf"the tokenizer has 31 tokens but {re.escape(str(encoder))} embeds only 20; use the tokenizer saved"


def test_a_tokenizer_larger_than_the_pretrained_embedding_is_refused(tmp_path):
    """Token ids past the embedding would fail mid-run (or read another row on a GPU): refused when the towers
    are built from the files, as eval and export build them; the model's own tokenizer loads."""
    from brivl_ds.data.tokenizer import load_tokenizer

    cfg = small_model_config()
    encoder, big = pretrained_encoder_and_tokenizers(tmp_path, cfg.text)
    cfg.text.pretrained_path = str(encoder)
    assert len(load_tokenizer(encoder)) == 20 and len(load_tokenizer(big)) == 31
    assert BriVL(cfg, vocab_size=len(load_tokenizer(encoder))).text.encoder.config.vocab_size == 20
    with pytest.raises(ValueError, match=refusal(encoder)):
        BriVL(cfg, vocab_size=len(load_tokenizer(big)))


def _start_trainer(rank, world, settings):
    from brivl_ds.config import build_config
    from brivl_ds.training.trainer import Trainer

    cfg = build_config("tiny", settings)
    with pytest.raises(ValueError, match=refusal(cfg.model.text.pretrained_path)):
        Trainer(cfg)


@pytest.mark.slow
def test_the_trainer_refuses_a_tokenizer_larger_than_the_pretrained_embedding_at_start_up(shapes_data, tmp_path):
    """The training path: the tokenizer from model.text.tokenizer_path, the encoder built under zero.Init (its
    config read first, the weights later): refused before DeepSpeed starts, on one gloo rank."""
    from brivl_ds.config import build_config
    from conftest import run_distributed

    encoder, big = pretrained_encoder_and_tokenizers(tmp_path, build_config("tiny").model.text)
    run_distributed(_start_trainer, 1, [
        f"model.text.pretrained_path={encoder}", f"model.text.tokenizer_path={big}", "model.image.image_size=64",
        f"data.train_path={shapes_data['train']}", f"data.eval_path={shapes_data['eval']}", "data.num_workers=0",
        f"train.output_dir={tmp_path / 'out'}", "train.progress_bar=false"])


def test_image_tower_loads_local_timm_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = small_model_config().image
    tower = ImageTower(cfg, 24)
    torch.save(tower.backbone.state_dict(), tmp_path / "backbone.pth")
    cfg.pretrained_path = str(tmp_path / "backbone.pth")
    torch.manual_seed(1)
    loaded = ImageTower(cfg, 24)
    for (name, a), b in zip(tower.backbone.state_dict().items(), loaded.backbone.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_frozen_batchnorm_in_bf16_on_cuda():
    """The same mixed-type kernel on CUDA (cuDNN/native): a bf16 EfficientNet with fp32 statistics runs forward
    and backward, is batch independent, leaves the statistics untouched and matches float64 within bf16's ulp."""
    torch.manual_seed(0)
    cfg = small_model_config("tf_efficientnet_b0").image
    cfg.trainable_backbone_groups = -1
    tower = as_engine_holds_it(ImageTower(cfg, embed_dim=24), torch.bfloat16).cuda().train()
    bns = _bn_layers(tower.backbone)
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    batch = random_batch()
    images, boxes, mask = batch.images.cuda().bfloat16(), batch.boxes.cuda(), batch.box_mask.cuda()
    together = tower(images, boxes, mask)
    torch.testing.assert_close(tower(images[:1], boxes[:1], mask[:1])[0].float(), together[0].float(),
                               atol=2e-2, rtol=0)
    together.float().sum().backward()
    assert all(torch.equal(m.running_mean, a) and torch.equal(m.running_var, b) for m, (a, b) in zip(bns, stats))
    bn = bns[0]
    x = torch.randn(4, bn.num_features, 8, 8, device="cuda").bfloat16()
    shape = (1, -1, 1, 1)
    ref = ((x.double() - bn.running_mean.double().view(shape)) / (bn.running_var.double().view(shape) + bn.eps)
           .sqrt() * bn.weight.double().view(shape) + bn.bias.double().view(shape))
    torch.testing.assert_close(bn._normalize(x).double(), ref, rtol=torch.finfo(torch.bfloat16).eps, atol=1e-6)


def test_batch_statistics_bn_is_refused_under_bf16_before_any_step():
    from brivl_ds.config import Config, MocoConfig
    from brivl_ds.moco.model import BriVLMoCo
    from brivl_ds.training.setup import check_batchnorm_precision

    cfg = Config(model=small_model_config("test_resnet"))
    cfg.model.image.frozen_bn_stats = False
    model = BriVLMoCo(BriVL(cfg.model, vocab_size=50), MocoConfig())
    check_batchnorm_precision(model, cfg, {"bf16": {"enabled": False}})  # fp32: fine
    with pytest.raises(ValueError, match="frozen_bn_stats"):
        check_batchnorm_precision(model, cfg, {"bf16": {"enabled": True}})


def test_vit_patch_tokens_become_the_feature_map_boxes_are_pooled_from():
    """A ViT backbone: class token dropped, patch (i, j) at feature-map cell (i, j); the tower runs end to end."""
    from brivl_ds.models.image_tower import feature_map

    torch.manual_seed(0)
    cfg = small_model_config("vit_tiny_patch16_224")
    cfg.image.qk_norm, cfg.image.layer_scale = True, 1e-5
    model = BriVL(cfg, vocab_size=50).eval()
    backbone = model.image.backbone
    images = torch.randn(2, 3, 64, 64)
    tokens = backbone.forward_features(images)
    fmap = feature_map(backbone, images)
    assert backbone.num_prefix_tokens == 1 and fmap.shape == (2, backbone.num_features, 4, 4)
    torch.testing.assert_close(fmap[:, :, 2, 3], tokens[:, 1 + 2 * 4 + 3], rtol=0, atol=0)
    assert type(backbone.blocks[0].attn.q_norm).__name__ == "LayerNorm" and hasattr(backbone.blocks[0], "ls1")
    image, text = model(random_batch())
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))


def test_eva_patch_tokens_become_the_feature_map():
    """An EVA-02 backbone (RoPE, SwiGLU): patch (i, j) at feature-map cell (i, j), the tower runs end to end with
    gradients. (Its tensor-parallel split: tests/test_tensor_parallel.py.)"""
    from brivl_ds.models.image_tower import feature_map
    from brivl_ds.parallel.tp_plan import local_numels

    torch.manual_seed(0)
    cfg = small_model_config("eva02_tiny_patch14_224")
    cfg.image.image_size, cfg.image.backbone_depth, cfg.image.qk_norm = 56, 2, True
    model = BriVL(cfg, vocab_size=50)
    backbone = model.image.backbone
    assert type(backbone).__name__ == "Eva" and len(backbone.blocks) == 2 and backbone.rope is not None
    images = torch.randn(2, 3, 56, 56)
    backbone.eval()
    tokens = backbone.forward_features(images)
    fmap = feature_map(backbone, images)
    assert fmap.shape == (2, backbone.num_features, 4, 4)
    torch.testing.assert_close(fmap[:, :, 3, 1], tokens[:, backbone.num_prefix_tokens + 3 * 4 + 1], rtol=0, atol=0)
    image, _ = model.train()(random_batch(size=56))
    image.sum().backward()
    assert backbone.blocks[0].attn.proj.weight.grad.abs().sum() > 0
    assert sum(local_numels(model, 1).values()) == sum(p.numel() for p in model.parameters())


def test_eva02_scale_mlp_is_refused_at_tp2_not_silently_replicated():
    """EVA-02 B/L normalise the MLP's hidden features (scale_mlp): a norm over features TP would split. TP = 1
    is fine; TP = 2 is refused with the reason, before anything is built or launched."""
    from brivl_ds.parallel.tp_plan import local_numels

    cfg = small_model_config("eva02_base_patch14_224")
    cfg.image.image_size, cfg.image.backbone_depth = 56, 1
    with torch.device("meta"):
        model = BriVL(cfg, vocab_size=50)
    assert type(model.image.backbone.blocks[0].mlp.norm).__name__ == "LayerNorm"
    local_numels(model, 1)
    with pytest.raises(ValueError, match="blocks.0: tensor parallelism cannot split .*scale_mlp"):
        local_numels(model, 2)


def test_normalize_images_and_batch_to():
    images = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (2, 3, 8, 8), dtype=np.uint8))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = (images.float() / 255 - mean) / std
    assert torch.allclose(normalize_images(images, torch.float32), expected, atol=1e-6)
    assert normalize_images(images, torch.bfloat16).dtype == torch.bfloat16
    channels_last = images.contiguous(memory_format=torch.channels_last)
    assert normalize_images(channels_last, torch.float32).is_contiguous()
    rest = (torch.zeros(2, 5, 4), torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 3, dtype=torch.long),
            torch.ones(2, 3))
    moved = Batch(images, *rest).to("cpu", torch.float32)
    assert moved.images.dtype == torch.float32 and torch.allclose(moved.images, expected, atol=1e-6)
    floats = torch.randn(2, 3, 8, 8)
    assert torch.equal(Batch(floats, *rest).to("cpu", torch.float32).images, floats)  # float images: unchanged
    assert Batch(floats, *rest).to("cpu", torch.bfloat16).images.dtype == torch.bfloat16
