"""Recall@K: chunked computation equals the official convention (dot-product scores, rank of the true pair)."""
import json

import numpy as np
import pytest
import torch

from brivl_ds.evaluation.recall import recall_at_k


def official_style_recall(image: np.ndarray, text: np.ndarray, k: int) -> tuple[float, float]:
    """Full score matrix, argsort per query, position of the true pair (the official evaluation's recipe)."""
    scores = image @ text.T
    i2t = [int(np.where(np.argsort(-scores[i], kind="stable") == i)[0][0]) for i in range(len(scores))]
    t2i = [int(np.where(np.argsort(-scores[:, j], kind="stable") == j)[0][0]) for j in range(len(scores))]
    return 100 * np.mean(np.array(i2t) < k), 100 * np.mean(np.array(t2i) < k)


def test_official_embeddings_give_the_official_recall(official_fixture):
    image = np.load(official_fixture / "np_img.npy")
    text = np.load(official_fixture / "np_text.npy")
    result = recall_at_k(torch.from_numpy(image), torch.from_numpy(text))
    for k in (1, 5, 10):
        i2t, t2i = official_style_recall(image, text, k)
        assert result[f"i2t_r{k}"] == pytest.approx(i2t) and result[f"t2i_r{k}"] == pytest.approx(t2i)
    assert result["i2t_r1"] == 100.0 and result["t2i_r1"] == 100.0  # each official pair is its own best match


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunking_does_not_change_the_result(chunk):
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(53, 16, generator=g), dim=-1)
    text = torch.nn.functional.normalize(image + 0.8 * torch.randn(53, 16, generator=g), dim=-1)
    result = recall_at_k(image, text, chunk=chunk)
    for k in (1, 5, 10):
        i2t, t2i = official_style_recall(image.double().numpy(), text.double().numpy(), k)
        assert result[f"i2t_r{k}"] == pytest.approx(i2t) and result[f"t2i_r{k}"] == pytest.approx(t2i)
    assert 0 < result["i2t_r1"] < 100


def test_eval_cli_on_embeddings_writes_json(official_fixture, tmp_path):
    from brivl_ds.eval import main

    out = tmp_path / "metrics.json"
    main(["--embeddings", str(official_fixture / "np_img.npy"), str(official_fixture / "np_text.npy"),
          "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["i2t_r1"] == 100.0 and saved["n"] == 3
