"""CPU checks of the benchmark's bookkeeping (byte/FLOP counts, table, refusal without CUDA) and of the static
sm_90a compile check. The timings themselves need a GPU: tests/kernels/test_kernels_gpu.py."""
from kernel_testing import one_cpu_thread, triton_device  # noqa: F401  (fixtures; imported first)

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from brivl_ds.bench import kernels as bench


def test_byte_and_flop_counts():
    B, K, D = 16, 16384, 2560
    fwd_bytes, fwd_flops = bench.contrastive_cost(B, K, D, backward=False)
    assert fwd_bytes == K * D * 2 + 2 * B * D * 2
    assert fwd_flops == 2 * B * (K + 1) * D
    both_bytes, both_flops = bench.contrastive_cost(B, K, D)
    assert both_bytes == 2 * K * D * 2 + 5 * B * D * 2 and both_flops == fwd_flops + 2 * B * K * D
    ids_bytes, ids_flops = bench.contrastive_cost(B, K, D, id_cols=2)
    assert ids_bytes == both_bytes + 2 * (B + K) * 2 * 8 and ids_flops == both_flops  # ids read by both passes
    assert bench.momentum_cost(10, lowp=False)[0] == 120 and bench.momentum_cost(10, lowp=True)[0] == 140
    assert bench.adamw_cost(10)[0] == 200 and bench.adamw_cost(10, state_bytes=4)[0] == 280


def test_table_derives_rates_percentages_and_speedups():
    rows = [bench.Row("k", "s", "eager", 2.0, 4e9, 2e9, 3 * 2**20),
            bench.Row("k", "s", "triton", 1.0, 4e9, 2e9, 2**20),
            bench.Row("k", "s", "torch.compile", None, 4e9, 2e9, None, note="failed: OutOfMemoryError")]
    ceil = dict(copy_gbps=5000.0, copy_bytes=2 * 2**31, mm_tflops=800.0, mm_n=8192)
    text = bench.report(rows, ceil, "Fake GPU", "torch x")
    lines = text.splitlines()
    assert "Fake GPU" in lines[0] and "5000 GB/s" in lines[1] and "800 TFLOP/s" in lines[1]
    triton = next(line for line in lines if "| triton |" in line).split(" | ")
    # median ms, GB, GFLOP, GB/s, TFLOP/s, % copy, % MMA, vs eager, peak MiB
    assert triton[3:12] == ["1.000", "4.00", "2.0", "4000", "2.0", "80", "0", "2.00x", "1.0"]
    failed = next(line for line in lines if "torch.compile" in line)
    assert "failed: OutOfMemoryError" in failed and "| - |" in failed


def test_failing_case_is_reported_not_raised(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("no kernel image")

    monkeypatch.setattr(bench, "cuda_time", boom)
    row = bench.measure("k", "s", "triton", lambda: None, (1.0, 0.0))
    assert row.ms is None and "no kernel image" in row.note


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_without_cuda(capsys):
    assert bench.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_every_launch_config_compiles_for_h100_and_a100_without_spills():
    """Runs aot_check in a fresh interpreter: compiled-mode kernels need TRITON_INTERPRET unset."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import kernel_testing, sys; from brivl_kernels import aot_check; "
            "sys.exit(aot_check.main([]) or aot_check.main(['--arch', '80']))")
    out = subprocess.run([sys.executable, "-c", code], cwd=pathlib.Path(__file__).parent, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "contrastive fwd bf16 B=16 D=2560" in out.stdout and "adamw" in out.stdout


def test_benchmark_cases_run_end_to_end_on_tiny_sizes(monkeypatch, triton_device):
    """The case builders, on CPU (interpreter) at toy sizes, with timing and torch.compile stubbed out: catches
    plumbing errors in code that otherwise only runs on a GPU."""
    monkeypatch.setattr(bench, "CONTRASTIVE_SIZES", {"toy": (3, 50, 24)})
    monkeypatch.setattr(bench, "MOMENTUM_SIZES", {"toy": [100, 37]})
    monkeypatch.setattr(bench, "ADAMW_SIZES", {"toy": [100, 37]})
    monkeypatch.setattr(bench, "cuda_time", lambda fn, **kw: (fn(), 1.0)[1])
    monkeypatch.setattr(bench, "peak_extra_bytes", lambda fn: (fn(), 0)[1])
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    dev = str(triton_device)
    rows = bench.contrastive_rows(device=dev) + bench.momentum_rows(device=dev) + bench.adamw_rows(device=dev)
    assert [r.note for r in rows if r.note] == []
    assert len(rows) == 9 + 6 + 4
    assert sum(r.kernel == "contrastive fwd+bwd, id-masked" for r in rows) == 3
