"""Text tower f^T: a Hugging Face encoder (BERT/RoBERTa) -> token self-attention -> MLP -> unit sphere."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel

from brivl_ds.config import TextTowerConfig
from brivl_ds.models.layers import ProjectionHead, SelfAttentionBlock, masked_mean
from brivl_ds.models.partitioned import deferred_hf_init, forked_rng, replay_hf_init, under_zero_init


def create_encoder(cfg: TextTowerConfig, vocab_size: int) -> nn.Module:
    """AutoModel from a local directory, or randomly initialised from the config fields (no hub access).

    Under zero.Init (partitioned construction) Hugging Face's own loaders cannot run (they write whole tensors
    into partitioned ones, and refuse to nest zero.Init): the encoder is built from its config and its init
    replayed one module at a time, or, with a pretrained path, left for `load_pretrained_towers` to fill after
    the zero.Init context (models/partitioned.py)."""
    partitioned = under_zero_init()
    if cfg.pretrained_path:
        # How a loader draws random numbers must not shift what is built after it: a forked generator.
        with forked_rng():
            if partitioned:
                config = AutoConfig.from_pretrained(cfg.pretrained_path, local_files_only=True)
                with deferred_hf_init():  # every value comes from the file, in load_pretrained_towers
                    encoder = AutoModel.from_config(config, add_pooling_layer=False)
            else:
                encoder = AutoModel.from_pretrained(cfg.pretrained_path, add_pooling_layer=False,
                                                    local_files_only=True)
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
    if not partitioned:
        return AutoModel.from_config(config, add_pooling_layer=False)
    with deferred_hf_init():
        encoder = AutoModel.from_config(config, add_pooling_layer=False)
    replay_hf_init(encoder)  # the draws post_init would have made, in its order
    return encoder


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
    def __init__(self, cfg: TextTowerConfig, embed_dim: int, vocab_size: int, head_hidden_dim: int | None = None):
        super().__init__()
        self.encoder = create_encoder(cfg, vocab_size)
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
