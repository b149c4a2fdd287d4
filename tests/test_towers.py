import torch

from brivl_ds.config import ImageTowerConfig, ModelConfig, TextTowerConfig
from brivl_ds.models.brivl import Batch, BriVL
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


def test_frozen_batchnorm_statistics_make_embeddings_batch_independent():
    """The BN choice (see README): eval-mode BN in the CNN even while training, so a key cannot see its batch."""
    torch.manual_seed(0)
    cfg = small_model_config("test_resnet").image
    tower = ImageTower(cfg, embed_dim=24).train()
    bns = [m for m in tower.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    stats = [m.running_mean.clone() for m in bns]
    batch = random_batch()
    alone = tower(batch.images[:1], batch.boxes[:1], batch.box_mask[:1])
    together = tower(batch.images, batch.boxes, batch.box_mask)
    torch.testing.assert_close(alone[0], together[0])
    assert all(torch.equal(s, m.running_mean) for s, m in zip(stats, bns))
    # with ordinary train-mode BN the same sample's embedding would depend on its batch-mates
    cfg.frozen_bn_stats = False
    torch.manual_seed(0)
    plain = ImageTower(cfg, embed_dim=24).train()
    assert not torch.allclose(plain(batch.images[:1], batch.boxes[:1], batch.box_mask[:1])[0],
                              plain(batch.images, batch.boxes, batch.box_mask)[0])


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
