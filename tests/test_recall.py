"""Recall@K: chunked computation equals the official convention (dot-product scores, rank of the true pair), as
fractions; only the trainer's printed line shows percent."""
import json

import numpy as np
import pytest
import torch

from brivl_ds.evaluation.recall import format_recall, recall_at_k


def official_style_recall(image: np.ndarray, text: np.ndarray, k: int) -> tuple[float, float]:
    """Full score matrix, argsort per query, position of the true pair (the official evaluation's recipe)."""
    scores = image @ text.T
    i2t = [int(np.where(np.argsort(-scores[i], kind="stable") == i)[0][0]) for i in range(len(scores))]
    t2i = [int(np.where(np.argsort(-scores[:, j], kind="stable") == j)[0][0]) for j in range(len(scores))]
    return np.mean(np.array(i2t) < k), np.mean(np.array(t2i) < k)


def test_official_embeddings_give_the_official_recall(official_fixture):
    image = np.load(official_fixture / "np_img.npy")
    text = np.load(official_fixture / "np_text.npy")
    result = recall_at_k(torch.from_numpy(image), torch.from_numpy(text))
    for k in (1, 5, 10):
        i2t, t2i = official_style_recall(image, text, k)
        assert result[f"i2t_r{k}"] == pytest.approx(i2t) and result[f"t2i_r{k}"] == pytest.approx(t2i)
    assert result["i2t_r1"] == 1.0 and result["t2i_r1"] == 1.0  # each official pair is its own best match


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunking_does_not_change_the_result(chunk):
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(53, 16, generator=g), dim=-1)
    text = torch.nn.functional.normalize(image + 0.8 * torch.randn(53, 16, generator=g), dim=-1)
    result = recall_at_k(image, text, chunk=chunk)
    for k in (1, 5, 10):
        i2t, t2i = official_style_recall(image.double().numpy(), text.double().numpy(), k)
        assert result[f"i2t_r{k}"] == pytest.approx(i2t) and result[f"t2i_r{k}"] == pytest.approx(t2i)
    assert 0 < result["i2t_r1"] < 1


def test_eval_cli_on_embeddings_writes_json(official_fixture, tmp_path):
    from brivl_ds.eval import main

    out = tmp_path / "metrics.json"
    main(["--embeddings", str(official_fixture / "np_img.npy"), str(official_fixture / "np_text.npy"),
          "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["i2t_r1"] == 1.0 and saved["n"] == 3


def test_printed_line_shows_the_fractions_in_percent():
    result = {"n": 48.0, "chance_r1": 1 / 48, "i2t_r1": 0.0625, "t2i_r1": 0.125, "i2t_r5": 0.25, "t2i_r5": 0.5,
              "i2t_r10": 0.40625, "t2i_r10": 1.0}
    assert format_recall(result, 6) == ("eval @ step 6 on 48 held-out pairs: R@1/5/10 image->text 6.2/25.0/40.6, "
                                        "text->image 12.5/50.0/100.0 (chance R@1 2.08)")
