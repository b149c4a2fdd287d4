"""Retrieval metrics, computed in chunks so memory stays O(chunk x N), not O(N^2)."""
from __future__ import annotations

import torch

TIE_TOLERANCE = 1e-6
"""Scores within this of the true candidate's count as ties, in its favour. The same input embedded in fp32 within
batches of another composition moves by about 1e-7 (different kernel blocking; measured on x86 CPUs), so exact
comparisons would let batching decide ties between identical captions or images; a real score gap is far larger."""


def true_pair_ranks(queries: torch.Tensor, keys: torch.Tensor, chunk: int = 1024,
                    tie_tolerance: float = TIE_TOLERANCE) -> torch.Tensor:
    """0-based rank of key i among all keys for query i, by dot-product score (row i of each is pair i).

    rank = number of keys scoring more than `tie_tolerance` above the true one (ties resolved in the true pair's
    favour).
    """
    if queries.shape != keys.shape:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must pair row by row")
    keys_t = keys.t()
    ranks = []
    for start in range(0, queries.shape[0], chunk):
        q = queries[start:start + chunk]
        scores = q @ keys_t  # [chunk, N]
        true = scores[torch.arange(q.shape[0]), torch.arange(start, start + q.shape[0])]
        ranks.append((scores > true[:, None] + tie_tolerance).sum(1))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def recall_at_k(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10),
                chunk: int = 1024, tie_tolerance: float = TIE_TOLERANCE) -> dict[str, float]:
    """Image-to-text and text-to-image Recall@K in percent, plus chance level R@1 (100 / N)."""
    image_emb, text_emb = image_emb.double(), text_emb.double()
    i2t = true_pair_ranks(image_emb, text_emb, chunk, tie_tolerance)
    t2i = true_pair_ranks(text_emb, image_emb, chunk, tie_tolerance)
    n = image_emb.shape[0]
    out: dict[str, float] = {"n": float(n), "chance_r1": 100.0 / max(n, 1)}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * (i2t < k).double().mean().item()
        out[f"t2i_r{k}"] = 100.0 * (t2i < k).double().mean().item()
    return out
