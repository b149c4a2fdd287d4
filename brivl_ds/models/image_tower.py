"""Image tower f^I: CNN feature map -> RoIAlign per detector box -> box self-attention -> MLP -> unit sphere."""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from timm.models import group_parameters
from torch import nn
from torchvision.ops import roi_align

from brivl_ds.config import ImageTowerConfig
from brivl_ds.models.batchnorm import freeze_batchnorm_statistics
from brivl_ds.models.layers import ProjectionHead, SelfAttentionBlock, masked_mean
from brivl_ds.models.tower_init import EAGER_INIT, TowerInit, forked_rng


def create_backbone(cfg: ImageTowerConfig, init: TowerInit = EAGER_INIT) -> nn.Module:
    """A timm model without classifier or pooling; weights only from a local file, never from a hub. Created by
    `init` (plain, or deferred and replayed under partitioned construction: models/tower_init.py)."""
    kwargs = dict(num_classes=0, global_pool="")
    if is_vit(cfg.backbone):  # built for our input size; stabilisers for large ViTs from the config
        kwargs.update(img_size=cfg.image_size, qk_norm=cfg.qk_norm, init_values=cfg.layer_scale)
        if cfg.backbone_depth is not None:
            kwargs.update(depth=cfg.backbone_depth)
    elif cfg.qk_norm or cfg.layer_scale is not None or cfg.backbone_depth is not None:
        raise ValueError(f"model.image.qk_norm / layer_scale / backbone_depth apply to ViT backbones, not "
                         f"{cfg.backbone}")
    if cfg.pretrained_path:
        with forked_rng():  # the loader's draws must not shift what is built after it
            return init.timm_create(cfg.backbone, cfg.pretrained_path, **kwargs)
    return init.timm_create(cfg.backbone, None, **kwargs)


def is_vit(backbone: str) -> bool:
    """timm's VisionTransformer and EVA families (EVA / EVA-02: RoPE, SwiGLU, ViT-style patch tokens)."""
    return timm.models.is_model_in_modules(backbone, ["vision_transformer", "eva"])


def feature_map(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The backbone's last feature map [B, C, h, w]: a CNN's as it is; a ViT's patch tokens (class and register
    tokens dropped) laid out on the patch grid, so RoIAlign pools boxes from either the same way."""
    features = backbone.forward_features(images)
    if features.ndim == 4:
        return features
    tokens = features[:, backbone.num_prefix_tokens:]
    h, w = (size // patch for size, patch in zip(images.shape[-2:], backbone.patch_embed.patch_size))
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], h, w)


def freeze_lower_groups(backbone: nn.Module, trainable_groups: int) -> None:
    """Freeze all but the top `trainable_groups` of timm's coarse parameter groups (stem, stages, head)."""
    if trainable_groups < 0:
        return
    groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
    ordered = [groups[k] for k in sorted(groups)]
    trainable = {name for names in ordered[len(ordered) - trainable_groups:] for name in names} \
        if trainable_groups else set()
    for name, param in backbone.named_parameters():
        param.requires_grad_(name in trainable)


class ImageTower(nn.Module):
    def __init__(self, cfg: ImageTowerConfig, embed_dim: int, head_hidden_dim: int | None = None,
                 init: TowerInit = EAGER_INIT):
        super().__init__()
        self.cfg = cfg
        self.backbone = create_backbone(cfg, init)
        if cfg.frozen_bn_stats:
            freeze_batchnorm_statistics(self.backbone)  # running statistics only, in fp32 (models/batchnorm.py)
        freeze_lower_groups(self.backbone, cfg.trainable_backbone_groups)
        channels = self.backbone.num_features
        r = cfg.roi_output_size
        self.box_proj = nn.Linear(channels * r * r, cfg.width)
        self.box_pos = nn.Linear(4, cfg.width) if cfg.box_position_embedding else None
        self.encoder = SelfAttentionBlock(cfg.width, cfg.num_layers, cfg.num_heads, cfg.mlp_ratio, cfg.dropout)
        self.head = ProjectionHead(cfg.width, head_hidden_dim or embed_dim, embed_dim)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor, box_mask: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S]; boxes [B, N, 4] as x1, y1, x2, y2 in input pixels; box_mask [B, N] (True = real).

        Returns L2-normalised embeddings [B, D].
        """
        fmap = feature_map(self.backbone, images)
        b, n, _ = boxes.shape
        batch_index = torch.arange(b, device=boxes.device, dtype=torch.float32).repeat_interleave(n)
        rois = torch.cat([batch_index[:, None], boxes.reshape(-1, 4).float()], dim=1)
        # One vectorised RoIAlign over every (padded) box of the batch; padded boxes are masked later.
        # fp32 because torchvision's CPU kernel has no bf16 path (on CUDA, autocast does the same).
        r = self.cfg.roi_output_size
        pooled = roi_align(fmap.float(), rois, output_size=(r, r), spatial_scale=fmap.shape[-1] / images.shape[-1],
                           sampling_ratio=2, aligned=True).to(fmap.dtype)
        tokens = self.box_proj(pooled.reshape(b, n, -1))
        if self.box_pos is not None:
            tokens = tokens + self.box_pos((boxes / images.shape[-1]).to(tokens.dtype))
        tokens = self.encoder(tokens, box_mask)
        return F.normalize(self.head(masked_mean(tokens, box_mask)), dim=-1)
