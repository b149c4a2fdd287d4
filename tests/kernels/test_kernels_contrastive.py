"""Queue-contrastive loss: the Triton kernel (interpreter on CPU, or CUDA) against a float64 oracle.

Tolerances (relative to the float64 reference computed from the same, already rounded, inputs):
  fp32 inputs: loss 1e-5, tau-grad 1e-4, dq 1e-4 of max|dq|  (fp32 accumulation over D and K)
  bf16/fp16:   loss 1e-4, tau-grad 1e-3, dq 1e-2 of max|dq| + 1e-2 of |dq| (dq is returned in bf16/fp16; on GPU
               the probabilities enter the dq matmul in the input dtype, as in flash attention)
"""
from kernel_testing import one_cpu_thread, triton_device  # noqa: F401  (fixtures; imported first)

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import brivl_kernels
from brivl_kernels import _dispatch
from brivl_kernels.contrastive import BwdConfig, FwdConfig, queue_contrastive_loss
from brivl_kernels.contrastive_reference import queue_contrastive_loss_reference

TOL = {
    torch.float32: dict(loss=1e-5, tau=1e-4, dq_abs=1e-4, dq_rel=0.0),
    torch.bfloat16: dict(loss=1e-4, tau=1e-3, dq_abs=1e-2, dq_rel=1e-2),
    torch.float16: dict(loss=1e-4, tau=1e-3, dq_abs=1e-2, dq_rel=1e-2),
}


def make_inputs(B, K, D, dtype, device, seed, normalize=True, masked_frac=0.0):
    g = torch.Generator().manual_seed(seed)

    def emb(n):
        x = torch.randn(n, D, generator=g, dtype=torch.float64)
        return torch.nn.functional.normalize(x, dim=1) if normalize else x

    q, k, queue = emb(B), emb(B), emb(K)
    mask = None
    if masked_frac:
        mask = torch.rand(K, generator=g) >= masked_frac
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(q), cast(k), cast(queue), (None if mask is None else mask.to(device))


def make_ids(B, K, seed, C=2, all_masked_row=None, device="cpu"):
    """Hash-like int64 content ids (column 0 the image, column C-1 the caption) with real duplicates: each query's
    image and caption copied into a few queue entries, an image and a caption shared by two rows of the batch, and
    near misses that must stay negatives (an id + 2^32, which int32 truncation would equate; a query's image id in
    the queue's caption column). `all_masked_row`: every queue entry shares that row's image (even j) or caption
    (odd j), so the row has no negatives left."""
    g = torch.Generator().manual_seed(seed)
    qid = torch.randint(-2**62, 2**62, (B, C), generator=g, dtype=torch.int64)
    kid = torch.randint(-2**62, 2**62, (K, C), generator=g, dtype=torch.int64)
    if B >= 3:
        qid[1, 0] = qid[0, 0]
        qid[2, C - 1] = qid[0, C - 1]
    for i in range(B if K else 0):
        j = torch.randint(0, K, (6,), generator=g)
        kid[j[:3], 0] = qid[i, 0]
        kid[j[3:5], C - 1] = qid[i, C - 1]
        kid[j[5], 0] = qid[i, 0] + 2**32
        if C > 1:
            kid[j[5], C - 1] = qid[i, 0]
    if all_masked_row is not None:
        kid[0::2, 0] = qid[all_masked_row, 0]
        kid[1::2, C - 1] = qid[all_masked_row, C - 1]
    return qid.to(device), kid.to(device)


def oracle(q, k, queue, tau, mask, ids=(None, None)):
    """float64 loss, dq, dtau from the (already rounded) inputs."""
    q64 = q.detach().double().requires_grad_()
    tau64 = torch.tensor(float(tau), dtype=torch.float64, device=q.device, requires_grad=True)
    loss = queue_contrastive_loss_reference(q64, k.double(), queue.double(), tau64, mask, *ids)
    loss.backward()
    return loss.detach(), q64.grad, tau64.grad


def run_triton(q, k, queue, tau_value, mask, ids=(None, None), **cfg):
    q = q.clone().requires_grad_()
    tau = torch.tensor(tau_value, device=q.device, requires_grad=True)
    loss = queue_contrastive_loss(q, k, queue, tau, mask, impl="triton", query_ids=ids[0], queue_ids=ids[1], **cfg)
    loss.backward()
    return loss.detach(), q.grad, tau.grad


def fp32_floors(q, k, queue, tau):
    """Absolute error floors of fp32 arithmetic. Logits of size L (base 2: L log2 e) carry an absolute error of
    ~ulp(L log2 e); exp() turns it into a relative error of the probabilities, and when the loss saturates
    (p_+ ~ 1, gradients cancelling to ~0) that is all that is left. A float32 PyTorch loss has the same floor."""
    B = q.shape[0]
    x = max(k.double().norm(dim=1).max().item(), queue.double().norm(dim=1).max().item() if queue.numel() else 0.0)
    L = q.double().norm(dim=1).max().item() * x / tau
    ulps = 8 * 2.0**-24 * (1 + L * math.log2(math.e))
    return dict(dq=ulps * x / (B * tau), tau=ulps * L / tau)


def assert_matches(got, want, dtype, inputs, **override):
    (loss, dq, dtau), (loss64, dq64, dtau64) = got, want
    tol = {**TOL[dtype], **override}
    floor = fp32_floors(*inputs)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert dq.dtype == dtype and dq.shape == dq64.shape
    assert math.isclose(loss.item(), loss64.item(), rel_tol=tol["loss"], abs_tol=tol["loss"])
    assert math.isclose(dtau.item(), dtau64.item(), rel_tol=tol["tau"], abs_tol=floor["tau"])
    err = (dq.double() - dq64).abs()
    bound = tol["dq_abs"] * dq64.abs().max() + tol["dq_rel"] * dq64.abs() + floor["dq"]
    assert (err <= bound).all(), f"max dq error {err.max().item():.3e}, max |dq| {dq64.abs().max().item():.3e}"


SHAPES = [  # (B, K, D): none a multiple of the block sizes, plus the edge cases
    (7, 1000, 72),
    (1, 1000, 72),
    (1, 1, 16),
    (19, 77, 130),
    (40, 300, 33),
]


@pytest.mark.parametrize("B,K,D", SHAPES)
def test_fp32_matches_float64(triton_device, B, K, D):
    q, k, queue, _ = make_inputs(B, K, D, torch.float32, triton_device, seed=B * 1000 + K)
    assert_matches(run_triton(q, k, queue, 0.05, None), oracle(q, k, queue, 0.05, None), torch.float32,
                   (q, k, queue, 0.05))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_match_float64(triton_device, dtype):
    q, k, queue, _ = make_inputs(7, 1000, 72, dtype, triton_device, seed=3)
    assert_matches(run_triton(q, k, queue, 0.05, None), oracle(q, k, queue, 0.05, None), dtype, (q, k, queue, 0.05))


def test_partially_filled_queue_mask(triton_device):
    q, k, queue, mask = make_inputs(7, 1000, 72, torch.float32, triton_device, seed=5, masked_frac=0.6)
    got = run_triton(q, k, queue, 0.07, mask)
    assert_matches(got, oracle(q, k, queue, 0.07, mask), torch.float32, (q, k, queue, 0.07))
    # Masking rows out is the same as leaving them out of the queue.
    assert_matches(got, oracle(q, k, queue[mask], 0.07, None), torch.float32, (q, k, queue, 0.07))


def test_queue_filled_from_the_front(triton_device):
    """A queue with only its first 100 of 1000 slots written (the warm-up phase of MoCo)."""
    q, k, queue, _ = make_inputs(5, 1000, 40, torch.float32, triton_device, seed=6)
    mask = torch.zeros(1000, dtype=torch.bool, device=triton_device)
    mask[:100] = True
    assert_matches(run_triton(q, k, queue, 0.05, mask), oracle(q, k, queue[:100], 0.05, None), torch.float32,
                   (q, k, queue, 0.05))


@pytest.mark.parametrize("how", ["K=0", "all masked"])
def test_empty_queue_gives_zero_loss_and_grads(triton_device, how):
    q, k, queue, _ = make_inputs(3, 0 if how == "K=0" else 50, 24, torch.float32, triton_device, seed=7)
    mask = None if how == "K=0" else torch.zeros(50, dtype=torch.bool, device=triton_device)
    loss, dq, dtau = run_triton(q, k, queue, 0.05, mask)
    assert loss.item() == 0.0
    assert torch.count_nonzero(dq) == 0 and dtau.item() == 0.0


def test_multiple_d_chunks_and_tiny_tiles(triton_device):
    """Tiles smaller than every dimension: many queue splits, ragged D tiles, three D chunks in the backward."""
    q, k, queue, mask = make_inputs(21, 200, 72, torch.float32, triton_device, seed=8, masked_frac=0.3)
    got = run_triton(q, k, queue, 0.05, mask, fwd_config=FwdConfig(16, 16, 16), bwd_config=BwdConfig(16, 16, 16, 32))
    assert_matches(got, oracle(q, k, queue, 0.05, mask), torch.float32, (q, k, queue, 0.05))


def test_strided_views(triton_device):
    """Rows of wider tensors (row stride > D), e.g. a slice of a queue buffer or of a concatenated projection."""
    q, k, queue, _ = make_inputs(9, 300, 72, torch.float32, triton_device, seed=15)
    wide_q = torch.zeros(9, 100, device=triton_device)
    wide_queue = torch.zeros(300, 90, device=triton_device)
    wide_q[:, 3:75], wide_queue[:, 10:82] = q, queue
    got = run_triton(wide_q[:, 3:75], k, wide_queue[:, 10:82], 0.05, None)
    assert_matches(got, oracle(q, k, queue, 0.05, None), torch.float32, (q, k, queue, 0.05))


def test_large_logits_are_stable(triton_device):
    """Unnormalised embeddings and a small tau: logits in the thousands, no overflow. An fp32 logit of size L
    carries an absolute error ~ L * 1e-7 that exp() turns into a relative error: tolerances scale with L."""
    q, k, queue, _ = make_inputs(6, 500, 64, torch.float32, triton_device, seed=9, normalize=False)
    got = run_triton(q, k, queue, 0.01, None)
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
    assert_matches(got, oracle(q, k, queue, 0.01, None), torch.float32, (q, k, queue, 0.01), tau=1e-3, dq_abs=1e-3)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 40), K=st.integers(0, 300), D=st.integers(1, 100), masked=st.sampled_from([0.0, 0.5]),
       seed=st.integers(0, 2**31 - 1))
@example(B=1, K=2, D=1, masked=0.0, seed=1)  # saturated losses that hypothesis found: gradients at the fp32 floor
@example(B=1, K=1, D=2, masked=0.0, seed=1)
@example(B=1, K=17, D=1, masked=0.0, seed=1)
def test_random_shapes(triton_device, B, K, D, masked, seed):
    q, k, queue, mask = make_inputs(B, K, D, torch.float32, triton_device, seed, masked_frac=masked if K else 0.0)
    assert_matches(run_triton(q, k, queue, 0.05, mask), oracle(q, k, queue, 0.05, mask), torch.float32,
                   (q, k, queue, 0.05))


def test_grad_flows_only_to_q_and_tau(triton_device):
    q, k, queue, _ = make_inputs(4, 64, 32, torch.float32, triton_device, seed=10)
    q.requires_grad_()
    k.requires_grad_()
    queue.requires_grad_()
    tau = torch.tensor(0.05, device=triton_device)  # a plain tensor: no grad wanted
    queue_contrastive_loss(q, k, queue, tau, impl="triton").backward()
    assert q.grad is not None and k.grad is None and queue.grad is None


def test_forward_only_without_grad(triton_device):
    q, k, queue, _ = make_inputs(4, 64, 32, torch.float32, triton_device, seed=11)
    with torch.no_grad():
        loss = queue_contrastive_loss(q, k, queue, torch.tensor(0.05, device=triton_device), impl="triton")
    loss64, _, _ = oracle(q, k, queue, 0.05, None)
    assert math.isclose(loss.item(), loss64.item(), rel_tol=1e-5)


def test_in_place_queue_update_before_backward_is_caught(triton_device):
    q, k, queue, _ = make_inputs(4, 64, 32, torch.float32, triton_device, seed=12)
    q.requires_grad_()
    loss = queue_contrastive_loss(q, k, queue, torch.tensor(0.05, device=triton_device), impl="triton")
    queue[:4] = k  # an enqueue before backward would make the recomputed logits wrong
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_public_names():
    assert brivl_kernels.queue_contrastive_loss is queue_contrastive_loss
    assert brivl_kernels.queue_contrastive_loss_reference is queue_contrastive_loss_reference


def test_reference_tau_gradient_formula():
    """d/dtau mean_i(LSE_i - s_i+) = -(1/tau) mean_i(E_p[s_i] - s_i+), checked against autograd and gradcheck."""
    q, k, queue, mask = make_inputs(5, 40, 8, torch.float64, "cpu", seed=13, masked_frac=0.3)
    tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda qq, tt: queue_contrastive_loss_reference(qq, k, queue, tt, mask),
                             (q.clone().requires_grad_(), tau))
    logits = torch.cat([(q * k).sum(1, keepdim=True), (q @ queue.t()).masked_fill(~mask, -math.inf)], 1) / tau
    p = logits.softmax(1)
    expected = -((p * logits.nan_to_num(neginf=0.0)).sum(1) - logits[:, 0]).mean() / tau
    loss = queue_contrastive_loss_reference(q, k, queue, tau, mask)
    (got,) = torch.autograd.grad(loss, tau)
    assert torch.allclose(got, expected, rtol=1e-12)


def test_auto_falls_back_to_reference_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(_dispatch, "is_interpreted", lambda kernel: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, queue, _ = make_inputs(3, 20, 8, torch.float32, "cpu", seed=14)
    tau = torch.tensor(0.05)
    assert torch.equal(queue_contrastive_loss(q, k, queue, tau),
                       queue_contrastive_loss_reference(q, k, queue, tau))
    with pytest.raises(RuntimeError, match="needs a CUDA device or the Triton interpreter"):
        queue_contrastive_loss(q, k, queue, tau, impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # set, but too late for the kernels
    with pytest.raises(RuntimeError, match="before starting Python"):
        queue_contrastive_loss(q, k, queue, tau)


def test_bad_inputs_are_rejected():
    q = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"q and k must both be \[B, D\]; got \(2, 4\) and \(3, 4\)"):
        queue_contrastive_loss(q, torch.zeros(3, 4), torch.zeros(5, 4), torch.tensor(0.1))
    with pytest.raises(ValueError, match=r"queue must be \[K, D\] with D=4; got \(5, 3\)"):
        queue_contrastive_loss(q, q, torch.zeros(5, 3), torch.tensor(0.1))
    with pytest.raises(ValueError, match="tau must be a tensor with one element"):
        queue_contrastive_loss(q, q, torch.zeros(5, 4), torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match=r"queue_mask must be a bool tensor of shape \[K\]=5"):
        queue_contrastive_loss(q, q, torch.zeros(5, 4), torch.tensor(0.1), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'triton', 'reference'\), got 'cuda'"):
        queue_contrastive_loss(q, q, torch.zeros(5, 4), torch.tensor(0.1), impl="cuda")


# ---- false-negative masking by content ids ---------------------------------------------------------------------

def per_row_loop_loss(q, k, queue, tau, mask, qid, kid):
    """The definition spelled out: for each row, -log softmax over [positive, kept negatives], then the mean."""
    losses = []
    for i in range(q.shape[0]):
        kept = [j for j in range(queue.shape[0]) if (mask is None or bool(mask[j]))
                and all(int(qid[i, c]) != int(kid[j, c]) for c in range(qid.shape[1]))]
        logits = torch.cat([(q[i] * k[i]).sum().reshape(1), queue[kept] @ q[i]]) / tau
        losses.append(torch.logsumexp(logits, 0) - logits[0])
    return torch.stack(losses).mean()


def masked_pairs(mask, qid, kid):
    """[B, K] bool: queue entry j left out of row i's negatives."""
    same = (qid[:, None, :] == kid[None, :, :]).any(2)
    return same if mask is None else same | ~mask[None, :]


@pytest.mark.parametrize("C,masked_frac", [(2, 0.0), (2, 0.4), (1, 0.0), (3, 0.3)])
def test_ids_reference_equals_per_row_loop(C, masked_frac):
    q, k, queue, mask = make_inputs(6, 40, 8, torch.float64, "cpu", seed=20 + C, masked_frac=masked_frac)
    full = 5 if C > 1 else None  # with one column a row without negatives would leave the others no duplicates
    qid, kid = make_ids(6, 40, seed=C, C=C, all_masked_row=full)
    pairs = masked_pairs(mask, qid, kid)
    assert 0 < pairs[:5].sum() < pairs[:5].numel()  # duplicates, but not everything masked
    assert full is None or pairs[full].all()
    results = []
    for fn in (lambda qq, tt: queue_contrastive_loss_reference(qq, k, queue, tt, mask, qid, kid),
               lambda qq, tt: per_row_loop_loss(qq, k, queue, tt, mask, qid, kid)):
        qq = q.clone().requires_grad_()
        tt = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        loss = fn(qq, tt)
        loss.backward()
        results.append((loss.detach(), qq.grad, tt.grad))
    (loss, dq, dtau), (loss_loop, dq_loop, dtau_loop) = results
    assert torch.isfinite(loss) and torch.isfinite(dq).all() and torch.isfinite(dtau)
    torch.testing.assert_close(loss, loss_loop, rtol=1e-12, atol=0)
    torch.testing.assert_close(dq, dq_loop, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(dtau, dtau_loop, rtol=1e-12, atol=0)
    assert full is None or torch.count_nonzero(dq[full]) == 0  # the row without negatives
    # The ids change the loss: without them the duplicates count as negatives.
    assert loss < queue_contrastive_loss_reference(q, k, queue, torch.tensor(0.1, dtype=torch.float64), mask)


TINY = dict(fwd_config=FwdConfig(16, 16, 16), bwd_config=BwdConfig(16, 16, 16, 32))
ID_CASES = [  # (B, K, D, dtype, masked_frac, all_masked_row, cfg)
    (7, 300, 40, torch.float32, 0.0, 3, {}),           # default tiles; K not a multiple of BLOCK_K
    (21, 77, 24, torch.float32, 0.4, 20, TINY),        # two row tiles, the last one ragged; with queue_mask
    (5, 100, 32, torch.bfloat16, 0.3, 4, {}),
    (19, 45, 16, torch.bfloat16, 0.0, 0, TINY),
    (3, 0, 16, torch.float32, 0.0, None, {}),          # K = 0
]


@pytest.mark.parametrize("B,K,D,dtype,masked_frac,all_masked_row,cfg", ID_CASES)
def test_ids_kernel_matches_float64(triton_device, B, K, D, dtype, masked_frac, all_masked_row, cfg):
    q, k, queue, mask = make_inputs(B, K, D, dtype, triton_device, seed=B * 100 + K, masked_frac=masked_frac)
    ids = make_ids(B, K, seed=B + K, all_masked_row=all_masked_row, device=triton_device)
    if K:
        pairs = masked_pairs(mask, *ids)
        assert pairs[all_masked_row].all()
        shared = (ids[0][:, None, :] == ids[1][None, :, :])  # [B, K, C]: image-only and caption-only copies
        assert (shared[..., 0] & ~shared[..., 1]).any() and (shared[..., 1] & ~shared[..., 0]).any()
    got = run_triton(q, k, queue, 0.05, mask, ids, **cfg)
    assert all(torch.isfinite(t).all() for t in got)
    assert_matches(got, oracle(q, k, queue, 0.05, mask, ids), dtype, (q, k, queue, 0.05))
    if all_masked_row is not None:
        assert torch.count_nonzero(got[1][all_masked_row]) == 0


def test_ids_near_misses_are_kept(triton_device):
    """Ids that differ only above bit 31, and a query's image id in the queue's caption column, mask nothing."""
    q, k, queue, _ = make_inputs(5, 60, 24, torch.float32, triton_device, seed=21)
    qid = torch.arange(5, dtype=torch.int64).repeat(2, 1).t().contiguous() * 1000 + torch.tensor([1, 2])
    kid = torch.stack([qid[torch.arange(60) % 5, 0] + 2**32, qid[torch.arange(60) % 5, 0]], dim=1)
    ids = (qid.to(triton_device), kid.to(triton_device))
    assert not masked_pairs(None, *ids).any()
    assert_matches(run_triton(q, k, queue, 0.05, None, ids, **TINY), oracle(q, k, queue, 0.05, None),
                   torch.float32, (q, k, queue, 0.05))


@pytest.mark.parametrize("how", ["ids", "ids and queue_mask"])
def test_ids_masking_every_negative_gives_zero_loss_and_grads(triton_device, how):
    """One image with three captions in the batch; the queue holds only copies of that image, or (with the mask)
    copies in its first half and another image in invalid slots: neither the ids nor the mask alone mask all."""
    q, k, queue, _ = make_inputs(3, 50, 24, torch.float32, triton_device, seed=22)
    qid = torch.tensor([[7, 1], [7, 2], [7, 3]])
    kid = torch.stack([torch.full((50,), 7), torch.arange(50) + 100], dim=1)
    mask = None
    if how == "ids and queue_mask":
        kid[25:, 0] = 8
        mask = torch.ones(50, dtype=torch.bool)
        mask[25:] = False
        mask = mask.to(triton_device)
    ids = (qid.to(triton_device), kid.to(triton_device))
    loss, dq, dtau = run_triton(q, k, queue, 0.05, mask, ids)
    assert loss.item() == 0.0
    assert torch.count_nonzero(dq) == 0 and dtau.item() == 0.0
    ref = oracle(q, k, queue, 0.05, mask, ids)
    assert ref[0].item() == 0.0 and torch.count_nonzero(ref[1]) == 0 and ref[2].item() == 0.0


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 20), K=st.integers(0, 100), D=st.integers(1, 40), C=st.integers(1, 3),
       alphabet=st.integers(1, 12), masked=st.sampled_from([0.0, 0.5]), seed=st.integers(0, 2**31 - 1))
def test_ids_random_shapes(triton_device, B, K, D, C, alphabet, masked, seed):
    """Ids drawn from a small alphabet, so rows collide with the queue (and each other) at random rates."""
    q, k, queue, mask = make_inputs(B, K, D, torch.float32, triton_device, seed, masked_frac=masked if K else 0.0)
    g = torch.Generator().manual_seed(seed)
    ids = tuple(torch.randint(0, alphabet, (n, C), generator=g).to(triton_device) for n in (B, K))
    assert_matches(run_triton(q, k, queue, 0.05, mask, ids, **TINY), oracle(q, k, queue, 0.05, mask, ids),
                   torch.float32, (q, k, queue, 0.05))


def test_bad_ids_are_rejected():
    """Checked before the path is chosen: the same errors from both implementations."""
    q, queue, tau = torch.zeros(2, 4), torch.zeros(5, 4), torch.tensor(0.1)
    qid, kid = torch.zeros(2, 2, dtype=torch.int64), torch.ones(5, 2, dtype=torch.int64)
    for impl in ("reference", "triton"):
        def loss(query_ids, queue_ids):
            return queue_contrastive_loss(q, q, queue, tau, impl=impl, query_ids=query_ids, queue_ids=queue_ids)

        with pytest.raises(ValueError, match="query_ids and queue_ids must be given together; queue_ids is missing"):
            loss(qid, None)
        with pytest.raises(ValueError, match="query_ids and queue_ids must be given together; query_ids is missing"):
            loss(None, kid)
        with pytest.raises(ValueError, match="query_ids must be an int64 tensor, got torch.int32"):
            loss(qid.int(), kid)
        with pytest.raises(ValueError, match="queue_ids must be an int64 tensor, got torch.float32"):
            loss(qid, kid.float())
        with pytest.raises(ValueError, match=r"query_ids must be \[B, C\] with B=2 and C >= 1; got \(3, 2\)"):
            loss(torch.zeros(3, 2, dtype=torch.int64), kid)
        with pytest.raises(ValueError, match=r"queue_ids must be \[K, C\] with K=5 and C >= 1; got \(5,\)"):
            loss(qid, kid[:, 0])
        with pytest.raises(ValueError, match=r"query_ids must be \[B, C\] with B=2 and C >= 1; got \(2, 0\)"):
            loss(qid[:, :0], kid[:, :0])
        with pytest.raises(ValueError, match="the same number of id columns C; got 2 and 1"):
            loss(qid, kid[:, :1])
    with pytest.raises(ValueError, match="query_ids and queue_ids must be given together"):
        queue_contrastive_loss_reference(q, q, queue, tau, None, qid)


def test_ids_on_another_device_are_rejected_by_the_triton_path(triton_device):
    q, queue, tau = torch.zeros(2, 4), torch.zeros(5, 4), torch.tensor(0.1)
    qid, kid = torch.zeros(2, 2, dtype=torch.int64), torch.ones(5, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=f"queue_ids is on meta, q on {triton_device.type}"):
        queue_contrastive_loss(q.to(triton_device), q.to(triton_device), queue.to(triton_device),
                               tau.to(triton_device), impl="triton", query_ids=qid.to(triton_device),
                               queue_ids=kid.to("meta"))
