"""Retrieval metrics, computed in chunks so memory stays O(chunk x N), not O(N^2): paired Recall@K (row i of each
side is pair i; the trainer's and the eval command's) and multi-caption Recall@K (CLIP_benchmark's keys; the
retrieval command's), and the line the trainer prints. Recalls are fractions in [0, 1]; only the printed line
shows percent."""
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
    """Image-to-text and text-to-image Recall@K as fractions in [0, 1], plus chance level R@1 (1 / N)."""
    image_emb, text_emb = image_emb.double(), text_emb.double()
    i2t = true_pair_ranks(image_emb, text_emb, chunk, tie_tolerance)
    t2i = true_pair_ranks(text_emb, image_emb, chunk, tie_tolerance)
    n = image_emb.shape[0]
    out: dict[str, float] = {"n": float(n), "chance_r1": 1.0 / max(n, 1)}
    for k in ks:
        out[f"i2t_r{k}"] = (i2t < k).double().mean().item()
        out[f"t2i_r{k}"] = (t2i < k).double().mean().item()
    return out


def _hits(ranks: torch.Tensor, ks: tuple[int, ...]) -> dict[int, int]:
    return {k: int((ranks < k).sum()) for k in ks}


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5, 10), chunk: int = 256,
                      tie_tolerance: float = TIE_TOLERANCE) -> dict[str, float]:
    """Recall@K both ways for M captions of N images; `text_image[j]` is the index of caption j's image.

    Scores are dot products; a query's rank is the number of wrong candidates scoring more than `tie_tolerance`
    above its (best) true one, so ties go to the true candidate (as in true_pair_ranks, whose TIE_TOLERANCE
    keeps batching from deciding ties between identical captions or images). Queries are taken `chunk` at a time:
    memory is O(chunk x max(N, M)), never the whole N x M matrix. Images without captions only serve as distractors
    for the caption queries (they have nothing to find as queries themselves).
    """
    n, m = image_emb.shape[0], text_emb.shape[0]
    text_image = torch.as_tensor(text_image, dtype=torch.long)
    if text_emb.shape[1] != image_emb.shape[1] or text_image.shape != (m,):
        raise ValueError(f"image {tuple(image_emb.shape)}, text {tuple(text_emb.shape)} and text_image "
                         f"{tuple(text_image.shape)} do not fit together")
    if m and not 0 <= int(text_image.min()) <= int(text_image.max()) < n:
        raise ValueError(f"text_image indices must lie in [0, {n})")
    # float64 so that the rank comparisons are not decided by fp32 rounding of the sums
    image_emb, text_emb = image_emb.double(), text_emb.double()
    image_hits, text_hits = dict.fromkeys(ks, 0), dict.fromkeys(ks, 0)

    for start in range(0, m, chunk):  # caption queries
        scores = text_emb[start:start + chunk] @ image_emb.t()  # [c, N]
        true = scores.gather(1, text_image[start:start + chunk, None])
        for k, hits in _hits((scores > true + tie_tolerance).sum(1), ks).items():
            image_hits[k] += hits

    captioned = torch.zeros(n, dtype=torch.bool)
    captioned[text_image] = True
    queries = captioned.nonzero().squeeze(1)
    for start in range(0, len(queries), chunk):  # image queries
        rows = queries[start:start + chunk]
        scores = image_emb[rows] @ text_emb.t()  # [c, M]
        positive = text_image[None, :] == rows[:, None]
        best = scores.masked_fill(~positive, float("-inf")).amax(1, keepdim=True)
        for k, hits in _hits((scores > best + tie_tolerance).sum(1), ks).items():  # none of its own beats `best`
            text_hits[k] += hits

    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = image_hits[k] / max(m, 1)
        metrics[f"text_retrieval_recall@{k}"] = text_hits[k] / max(len(queries), 1)
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics


def format_recall(result: dict[str, float], step: int) -> str:
    """The line the trainer prints for `recall_at_k`'s fractions, and the zero-shot accuracy when the evaluation
    has one (held_out.evaluate_zeroshot's keys): in percent, the one place percent is used."""
    line = f"eval @ step {step}"
    if "n" in result:
        ks = sorted(int(k[5:]) for k in result if k.startswith("i2t_r"))
        i2t = "/".join(f"{100 * result[f'i2t_r{k}']:.1f}" for k in ks)
        t2i = "/".join(f"{100 * result[f't2i_r{k}']:.1f}" for k in ks)
        line += (f" on {int(result['n'])} held-out pairs: R@{'/'.join(map(str, ks))} image->text {i2t}, "
                 f"text->image {t2i} (chance R@1 {100 * result['chance_r1']:.2f})")
    if "zeroshot_acc1" in result:
        top5 = f", top-5 {100 * result['zeroshot_acc5']:.1f}%" if "zeroshot_acc5" in result else ""
        line += (f"{'; ' if 'n' in result else ': '}zero-shot top-1 {100 * result['zeroshot_acc1']:.1f}%{top5} "
                 f"({int(result['zeroshot_n'])} images)")
    return line
