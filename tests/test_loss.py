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
    image_queue.write(unit(7, d, seed=5), torch.arange(14).view(7, 2))
    text_queue.write(unit(5, d, seed=6), torch.arange(10).view(5, 2))  # partially filled: only its 5 valid rows are negatives
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


# ---------------------------------------------------------------------------------------------------------------
# The choice of negatives, false-negative masking and the diagnostics (one process; brivl_ds.moco.loss)

def brute_force_kept(q, k, negatives, tau, kept):
    """Like brute_force, with row i's negatives the j where kept(i, j)."""
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i] @ k[i]) / tau)
        neg = sum(math.exp(float(q[i] @ negatives[j]) / tau) for j in range(negatives.shape[0]) if kept(i, j))
        total += -math.log(pos / (pos + neg))
    return total / q.shape[0]


def contrastive_case(b=4, k=9, d=6):
    """Outputs and full queues in which some queue entries repeat a query's image id or caption id."""
    out = MocoOutputs(unit(b, d, seed=1), unit(b, d, seed=2), unit(b, d, seed=3), unit(b, d, seed=4),
                      torch.tensor(0.07, dtype=torch.float64))
    ids = torch.stack([torch.arange(b) * 10, torch.arange(b) * 10 + 1], 1)  # image ids 0, 10.. captions 1, 11..
    queue_ids = torch.stack([torch.arange(k) * 10 + 1000, torch.arange(k) * 10 + 1001], 1)
    queue_ids[2, 0] = ids[0, 0]  # the image of query 0 again (with another caption)
    queue_ids[5, 1] = ids[0, 1]  # the caption of query 0 again (another image)
    queue_ids[7] = ids[3]  # query 3's whole pair again
    queues = KeyQueue(k, d, torch.float64), KeyQueue(k, d, torch.float64)
    queues[0].write(unit(k, d, seed=5), queue_ids)
    queues[1].write(unit(k, d, seed=6), queue_ids)
    return out, ids, queues


def loss_fn(negatives, mask):
    from brivl_ds.config import MocoConfig
    from brivl_ds.moco.loss import ContrastiveLoss

    return ContrastiveLoss(MocoConfig(negatives=negatives, mask_false_negatives=mask, loss_impl="reference"))


@pytest.mark.parametrize("mask", [False, True])
def test_queue_negatives_leave_out_the_querys_own_image_and_caption_when_masking(mask):
    out, ids, (image_queue, text_queue) = contrastive_case()
    loss, parts = loss_fn("queue", mask)(out, ids, image_queue, text_queue)
    duplicates = {(0, 2), (0, 5), (3, 7)}

    def kept(i, j):
        return not (mask and (i, j) in duplicates)

    i2t = brute_force_kept(out.image_query, out.text_key, text_queue.keys, 0.07, kept)
    t2i = brute_force_kept(out.text_query, out.image_key, image_queue.keys, 0.07, kept)
    assert parts["loss_i2t"].item() == pytest.approx(i2t, rel=1e-12)
    assert loss.item() == pytest.approx(i2t + t2i, rel=1e-12)
    # 3 of the 4 x 9 query-entry pairs share an id, masked or not
    assert parts["dup_share"].item() == pytest.approx((2 / 9 + 1 / 9) / 4)
    assert parts["pos_cos"].item() == pytest.approx(
        ((out.image_query * out.text_key).sum(1).mean() + (out.text_query * out.image_key).sum(1).mean()).item() / 2)


def test_masked_and_unmasked_differ_only_where_duplicates_are():
    out, ids, queues = contrastive_case()
    _, plain = loss_fn("queue", False)(out, ids, *queues)
    _, masked = loss_fn("queue", True)(out, ids, *queues)
    assert masked["loss_i2t"] < plain["loss_i2t"]  # a false negative only ever adds to the loss
    ids_elsewhere = ids + 555  # no queue entry shares an id now: masking changes nothing
    _, unaffected = loss_fn("queue", True)(out, ids_elsewhere, *queues)
    assert unaffected["loss_i2t"].item() == pytest.approx(plain["loss_i2t"].item(), rel=1e-14)


@pytest.mark.parametrize("mask", [False, True])
def test_batch_negatives_are_clips_infonce(mask):
    out, ids, queues = contrastive_case()
    ids[2] = ids[1]  # a duplicated pair inside the batch
    loss, parts = loss_fn("batch", mask)(out, ids, *queues)
    b = ids.shape[0]
    logits = out.image_query @ out.text_query.t() / out.tau
    if mask:
        same = torch.zeros(b, b, dtype=torch.bool)
        same[1, 2] = same[2, 1] = True
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(b)
    want_i2t = F.cross_entropy(logits, labels)
    want_t2i = F.cross_entropy(logits.t(), labels)
    assert parts["loss_i2t"].item() == pytest.approx(want_i2t.item(), rel=1e-12)
    assert loss.item() == pytest.approx((want_i2t + want_t2i).item(), rel=1e-12)
    assert parts["dup_share"].item() == pytest.approx(2 / (b * (b - 1)))  # 2 of the b x (b-1) negatives


@pytest.mark.parametrize("mask", [False, True])
def test_queue_plus_batch_joins_the_batchs_momentum_keys_to_the_queue(mask):
    out, ids, (image_queue, text_queue) = contrastive_case()
    loss, parts = loss_fn("queue+batch", mask)(out, ids, image_queue, text_queue)
    b = ids.shape[0]
    duplicates = {(0, b + 2), (0, b + 5), (3, b + 7)}  # the queue's entries come after the batch's b keys

    def kept(i, j):
        return j != i and not (mask and (i, j) in duplicates)  # never its own key (the positive)

    negatives = torch.cat([out.text_key, text_queue.keys])
    i2t = brute_force_kept(out.image_query, out.text_key, negatives, 0.07, kept)
    t2i = brute_force_kept(out.text_query, out.image_key, torch.cat([out.image_key, image_queue.keys]), 0.07, kept)
    assert parts["loss_i2t"].item() == pytest.approx(i2t, rel=1e-12)
    assert loss.item() == pytest.approx(i2t + t2i, rel=1e-12)


def test_diagnostics_match_their_definitions():
    out, ids, (image_queue, text_queue) = contrastive_case()
    _, parts = loss_fn("queue", False)(out, ids, image_queue, text_queue)
    lse, hardest = [], []
    for q, negatives in ((out.image_query, text_queue.keys), (out.text_query, image_queue.keys)):
        cos = q @ negatives.t()
        lse.append(torch.logsumexp(cos / 0.07, 1).mean())
        hardest.append(cos.max(1).values.mean())
    assert parts["neg_lse"].item() == pytest.approx((sum(lse) / 2).item(), rel=1e-6)
    assert parts["hardest_neg_cos"].item() == pytest.approx((sum(hardest) / 2).item(), rel=1e-6)


def test_unknown_negatives_mode_is_refused():
    with pytest.raises(ValueError, match="moco.negatives must be one of"):
        loss_fn("memory-bank", False)


@pytest.mark.parametrize("negatives", ["queue", "queue+batch"])
def test_the_fused_kernel_masks_as_the_reference_does(negatives):
    """The trainer's path through the Triton kernel (interpreted on CPU): its per-row id compare, with the two
    content-id columns and, for queue+batch, the column that skips each query's own key, gives the reference's
    loss and gradients."""
    from brivl_ds.config import MocoConfig
    from brivl_ds.moco.loss import ContrastiveLoss

    out, ids, queues = contrastive_case()
    out = MocoOutputs(*(t.float() for t in (out.image_query, out.text_query, out.image_key, out.text_key, out.tau)))
    for queue in queues:
        queue.keys = queue.keys.float()
    results = {}
    for impl in ("triton", "reference"):
        image_q = out.image_query.clone().requires_grad_()
        tau = out.tau.clone().requires_grad_()
        cfg = MocoConfig(negatives=negatives, mask_false_negatives=True, loss_impl=impl)
        loss, _ = ContrastiveLoss(cfg)(MocoOutputs(image_q, out.text_query, out.image_key, out.text_key, tau),
                                       ids, *queues)
        results[impl] = (loss.detach(), *torch.autograd.grad(loss, (image_q, tau)))
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
