"""Building blocks shared by both towers.

The transformer layer is written with plain nn.Linear projections (not nn.MultiheadAttention, whose input
projection is a bare Parameter) so that a tensor-parallel `parallelize` step can swap the Linears for
column/row-parallel ones without touching this file.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, N, C] over the positions where mask [B, N] is True."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        # Boolean attn_mask: True = may attend. Padding keys are masked for every query.
        attn_mask = mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


class TransformerLayer(nn.Module):
    """Pre-norm transformer encoder layer."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), mask))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class SelfAttentionBlock(nn.Module):
    """The paper's self-attention block: a few transformer layers over a masked sequence (boxes or tokens)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(width, heads, mlp_ratio, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)


class ProjectionHead(nn.Module):
    """The 2-layer MLP (ReLU) that maps a tower's pooled feature into the joint space."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))
