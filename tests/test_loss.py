"""The MoCo loss against a brute-force float64 reference written straight from the paper's equations 3-5."""
import math

import pytest
import torch
import torch.nn.functional as F

from brivl_ds.moco.loss import MocoOutputs, moco_loss, queue_contrastive_loss
from brivl_ds.moco.queue import KeyQueue


def brute_force(q, k, queue, tau):
    """mean_i -log(exp(q_i.k_i/tau) / (exp(q_i.k_i/tau) + sum_j exp(q_i.queue_j/tau))), by explicit loops."""
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i] @ k[i]) / tau)
        neg = sum(math.exp(float(q[i] @ queue[j]) / tau) for j in range(queue.shape[0]))
        total += -math.log(pos / (pos + neg))
    return total / q.shape[0]


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("b,k,d", [(5, 17, 8), (1, 3, 4), (4, 0, 6)])
def test_queue_contrastive_loss_matches_the_equation(b, k, d):
    q, key, queue = unit(b, d, seed=1), unit(b, d, seed=2), unit(k, d, seed=3)
    tau = torch.tensor(0.07, dtype=torch.float64)
    got = queue_contrastive_loss(q, key, queue, tau, impl="reference")
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(brute_force(q, key, queue, 0.07), rel=1e-12, abs=1e-12)


def test_gradients_flow_to_queries_and_tau_only():
    q = unit(4, 8, seed=1).requires_grad_()
    key, queue = unit(4, 8, seed=2), unit(9, 8, seed=3)
    tau = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    loss = queue_contrastive_loss(q, key, queue, tau, impl="reference")
    loss.backward()
    assert torch.autograd.gradcheck(lambda qq, tt: queue_contrastive_loss(qq, key, queue, tt, impl="reference"),
                                    (q.detach().clone().requires_grad_(), tau.detach().clone().requires_grad_()))
    assert q.grad is not None and tau.grad is not None and key.grad is None


def test_moco_loss_pairs_each_query_with_the_other_modalitys_queue():
    b, d = 3, 6
    out = MocoOutputs(unit(b, d, seed=1), unit(b, d, seed=2), unit(b, d, seed=3), unit(b, d, seed=4),
                      torch.tensor(0.05, dtype=torch.float64))
    image_queue, text_queue = KeyQueue(7, d, torch.float64), KeyQueue(7, d, torch.float64)
    image_queue.write(unit(7, d, seed=5))
    text_queue.write(unit(5, d, seed=6))  # partially filled: only its 5 valid rows are negatives
    loss, parts = moco_loss(out, image_queue, text_queue, impl="reference")
    i2t = brute_force(out.image_query, out.text_key, text_queue.keys[:5], 0.05)
    t2i = brute_force(out.text_query, out.image_key, image_queue.keys, 0.05)
    assert parts["loss_i2t"].item() == pytest.approx(i2t, rel=1e-12)
    assert parts["loss_t2i"].item() == pytest.approx(t2i, rel=1e-12)
    assert loss.item() == pytest.approx(i2t + t2i, rel=1e-12)


def test_temperature_is_clamped_and_excluded_from_weight_decay():
    from brivl_ds.config import MocoConfig
    from brivl_ds.moco.model import BriVLMoCo
    from brivl_ds.training.optim import param_groups

    from test_towers import small_model_config
    from brivl_ds.models.brivl import BriVL

    model = BriVLMoCo(BriVL(small_model_config(), 50), MocoConfig(tau_init=0.05, tau_min=0.01, tau_max=0.5))
    assert model.tau().item() == pytest.approx(0.05, rel=1e-6)
    with torch.no_grad():
        model.log_tau.fill_(math.log(1e-4))
    assert model.tau().item() == pytest.approx(0.01)
    with torch.no_grad():
        model.log_tau.fill_(math.log(3.0))
    assert model.tau().item() == pytest.approx(0.5)
    decay, no_decay = param_groups(model, 0.1)
    assert any(p is model.log_tau for p in no_decay["params"])
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert not any(p is q for p in decay["params"] + no_decay["params"] for q in model.momentum.parameters())
