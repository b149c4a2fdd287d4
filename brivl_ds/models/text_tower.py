"""Text tower f^T: a Hugging Face encoder (BERT/RoBERTa) -> token self-attention -> MLP -> unit sphere."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig

from brivl_ds.config import TextTowerConfig
from brivl_ds.models.layers import ProjectionHead, SelfAttentionBlock, masked_mean
from brivl_ds.models.tower_init import EAGER_INIT, TowerInit, forked_rng


def create_encoder(cfg: TextTowerConfig, vocab_size: int, init: TowerInit = EAGER_INIT) -> nn.Module:
    """AutoModel from a local directory, or randomly initialised from the config fields (no hub access). Created by
    `init` (plain, or deferred and replayed under partitioned construction: models/tower_init.py)."""
    if cfg.pretrained_path:
        # How a loader draws random numbers must not shift what is built after it: a forked generator.
        with forked_rng():
            encoder = init.hf_from_pretrained(cfg.pretrained_path, add_pooling_layer=False)
        if vocab_size > encoder.config.vocab_size:  # token ids past the embedding would fail mid-run
            raise ValueError(f"the tokenizer has {vocab_size} tokens but {cfg.pretrained_path} embeds only "
                             f"{encoder.config.vocab_size}; use the tokenizer saved with the model")
        return encoder
    config = AutoConfig.for_model(
        cfg.model_type, vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=max(512, cfg.max_length + 2), hidden_dropout_prob=cfg.encoder_dropout,
        attention_probs_dropout_prob=cfg.encoder_dropout,
    )
    return init.hf_from_config(config, add_pooling_layer=False)


def freeze_lower_layers(encoder: nn.Module, trainable_top_layers: int) -> None:
    """Train only the top N transformer layers (the official code trains the top 4 of RoBERTa)."""
    if trainable_top_layers < 0:
        return
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if layers is None:
        raise ValueError(f"{type(encoder).__name__} has no encoder.layer list; set trainable_top_layers=-1")
    for param in encoder.parameters():
        param.requires_grad_(False)
    for layer in list(layers)[len(layers) - trainable_top_layers:] if trainable_top_layers else []:
        for param in layer.parameters():
            param.requires_grad_(True)


class TextTower(nn.Module):
    def __init__(self, cfg: TextTowerConfig, embed_dim: int, vocab_size: int, head_hidden_dim: int | None = None,
                 init: TowerInit = EAGER_INIT):
        super().__init__()
        self.encoder = create_encoder(cfg, vocab_size, init)
        freeze_lower_layers(self.encoder, cfg.trainable_top_layers)
        width = self.encoder.config.hidden_size
        self.self_attention = SelfAttentionBlock(width, cfg.sa_layers, cfg.sa_heads, 4.0, cfg.dropout)
        self.head = ProjectionHead(width, head_hidden_dim or embed_dim, embed_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [B, T]. Returns L2-normalised embeddings [B, D]."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.bool()
        hidden = self.self_attention(hidden, mask)
        return F.normalize(self.head(masked_mean(hidden, mask)), dim=-1)
