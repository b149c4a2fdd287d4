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


def oracle(q, k, queue, tau, mask):
    """float64 loss, dq, dtau from the (already rounded) inputs."""
    q64 = q.detach().double().requires_grad_()
    tau64 = torch.tensor(float(tau), dtype=torch.float64, device=q.device, requires_grad=True)
    loss = queue_contrastive_loss_reference(q64, k.double(), queue.double(), tau64, mask)
    loss.backward()
    return loss.detach(), q64.grad, tau64.grad


def run_triton(q, k, queue, tau_value, mask, **cfg):
    q = q.clone().requires_grad_()
    tau = torch.tensor(tau_value, device=q.device, requires_grad=True)
    loss = queue_contrastive_loss(q, k, queue, tau, mask, impl="triton", **cfg)
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
