"""GPU-only: bf16 correctness at the paper's sizes and the benchmark. `pytest -m gpu -s` is how to benchmark:
the table is printed, and written as markdown to $BRIVL_BENCH_MARKDOWN (default: pytest's tmp dir, path printed).
Skipped without CUDA. Tolerances as in test_kernels_contrastive.py (bf16 row)."""
from kernel_testing import one_cpu_thread  # noqa: F401  (fixture; imported first)

import os

import pytest
import torch

from brivl_ds.bench import kernels as bench
from brivl_kernels import AdamWHalfStates, momentum_update_, momentum_update_reference_

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _paper_inputs(masked):
    from test_kernels_contrastive import make_inputs

    return make_inputs(16, 16384, 2560, torch.bfloat16, torch.device("cuda"), seed=0,
                       masked_frac=0.25 if masked else 0.0)


@pytest.mark.parametrize("masked", [False, True])
def test_contrastive_bf16_paper_size(masked):
    from test_kernels_contrastive import assert_matches, oracle, run_triton

    q, k, queue, mask = _paper_inputs(masked)
    assert_matches(run_triton(q, k, queue, 0.05, mask), oracle(q, k, queue, 0.05, mask), torch.bfloat16,
                   (q, k, queue, 0.05))


@pytest.mark.parametrize("all_masked_row", [None, 15])
def test_contrastive_bf16_paper_size_with_content_ids(all_masked_row):
    """False-negative masking at the paper's size: image and caption ids (copies in the queue, a shared image and
    caption in the batch) with a partly filled queue; optionally a row left with no negatives."""
    from test_kernels_contrastive import assert_matches, make_ids, oracle, run_triton

    q, k, queue, mask = _paper_inputs(True)
    ids = make_ids(16, 16384, seed=0, all_masked_row=all_masked_row, device=torch.device("cuda"))
    got = run_triton(q, k, queue, 0.05, mask, ids)
    assert all(torch.isfinite(t).all() for t in got)
    assert_matches(got, oracle(q, k, queue, 0.05, mask, ids), torch.bfloat16, (q, k, queue, 0.05))
    if all_masked_row is not None:
        assert torch.count_nonzero(got[1][all_masked_row]) == 0


def test_contrastive_bf16_large_batch_and_huge_queue_forward():
    from test_kernels_contrastive import make_inputs, oracle

    from brivl_kernels import queue_contrastive_loss

    for B, K, D in ((256, 65536, 2560), (128, 1_048_576, 1024)):
        q, k, queue, _ = make_inputs(B, K, D, torch.bfloat16, torch.device("cuda"), seed=1)
        with torch.no_grad():
            loss = queue_contrastive_loss(q, k, queue, torch.tensor(0.05, device="cuda"), impl="triton")
        loss64 = oracle(q[:8], k[:8], queue, 0.05, None)[0]  # float64 on 8 rows keeps the oracle small
        loss8 = queue_contrastive_loss(q[:8], k[:8], queue, torch.tensor(0.05, device="cuda"), impl="triton")
        assert torch.isfinite(loss)
        assert abs(loss8.item() - loss64.item()) <= 1e-4 * abs(loss64.item())
        del q, k, queue
        torch.cuda.empty_cache()


def test_momentum_bf16_copy_on_gpu():
    n = 10_000_019
    mom, onl = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    low = torch.empty(n, device="cuda", dtype=torch.bfloat16)
    ref_mom, ref_low = mom.clone(), low.clone()
    momentum_update_(mom, onl, 0.999, low, impl="triton")
    momentum_update_reference_(ref_mom, onl, 0.999, ref_low)
    torch.testing.assert_close(mom, ref_mom, rtol=2.4e-7, atol=1e-7)
    assert torch.equal(low.view(torch.int16), mom.to(torch.bfloat16).view(torch.int16))


def test_adamw_half_states_on_gpu_matches_reference():
    torch.manual_seed(0)
    params = [torch.randn(n, device="cuda") for n in (3_000_001, 1024, 7)]
    grads = [torch.randn_like(p) for p in params]
    results = []
    for impl in ("triton", "reference"):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = AdamWHalfStates(ps, lr=1e-3, weight_decay=0.1, impl=impl)
        for _ in range(3):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        results.append((ps, opt))
    (pa, oa), (pb, ob) = results
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            x, y = oa.state[a][key].float(), ob.state[b][key].float()
            same = (x == y).double().mean().item()
            assert same > 0.999  # a fused multiply-add on the GPU may move a value across a rounding boundary
            assert ((x - y).abs() <= 2 ** -7 * y.abs() + 1e-38).all()


def test_benchmark_prints_the_table(tmp_path):
    text = bench.run()
    path = os.environ.get("BRIVL_BENCH_MARKDOWN", str(tmp_path / "bench.md"))
    with open(path, "w") as f:
        f.write(text + "\n")
    print("\n" + text + f"\n\n(markdown written to {path})")
    assert "contrastive fwd+bwd" in text and "id-masked" in text and "momentum update" in text and "AdamW step" in text
