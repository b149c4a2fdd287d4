"""Fused momentum update against a float64 oracle.

Tolerance: |got - exact| <= 3 * 2^-24 * (|m * x| + |(1 - m) * y|): m and 1 - m are rounded to fp32 once, the two
products and the sum once each (at most 1.5 ulp of the terms). The bf16 copy must equal bf16(new momentum) bit for
bit (round to nearest even, as torch's .to(torch.bfloat16)).
"""
from kernel_testing import one_cpu_thread, triton_device  # noqa: F401  (fixtures; imported first)

import pytest
import torch

import brivl_kernels
from brivl_kernels import momentum as mod
from brivl_kernels.momentum import momentum_update_, momentum_update_reference_

SIZES = [1, 1000, 2049, mod.CHUNK + 3, 0, 7]  # ragged blocks, a tensor spanning two chunks, an empty one


def make(sizes, device, seed, online_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    moms = [torch.randn(n, generator=g).to(device) for n in sizes]
    onls = [torch.randn(n, generator=g).to(device=device, dtype=online_dtype) for n in sizes]
    return moms, onls


def assert_close_to_oracle(got, before, online, m):
    x, y = before.double(), online.double()
    exact = m * x + (1 - m) * y
    bound = 3 * 2.0**-24 * ((m * x).abs() + ((1 - m) * y).abs()) + 1e-45
    assert ((got.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("m", [0.99, 0.999, 0.5, 0.0, 1.0])
def test_list_matches_float64_and_bf16_copy_is_exact(triton_device, m):
    moms, onls = make(SIZES, triton_device, seed=1)
    before = [t.clone() for t in moms]
    lows = [torch.empty(n, dtype=torch.bfloat16, device=triton_device) for n in SIZES]
    momentum_update_(moms, onls, m, lows, impl="triton")
    for got, b, o, low in zip(moms, before, onls, lows):
        assert_close_to_oracle(got, b, o, m)
        assert torch.equal(low.view(torch.int16), got.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("online_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_online(triton_device, online_dtype):
    moms, onls = make([3000], triton_device, seed=2, online_dtype=online_dtype)
    before = moms[0].clone()
    momentum_update_(moms[0], onls[0], 0.99, impl="triton")  # single tensors, not lists
    assert_close_to_oracle(moms[0], before, onls[0], 0.99)


def test_unaligned_views_of_one_flat_buffer(triton_device):
    """ZeRO-style partitions as views into one flat buffer, at offsets that break 16-byte alignment."""
    flat_m, flat_o = make([10_000], triton_device, seed=3)
    bounds = [(0, 3), (3, 4100), (4100, 10_000)]
    before = flat_m[0].clone()
    momentum_update_([flat_m[0][a:b] for a, b in bounds], [flat_o[0][a:b] for a, b in bounds], 0.9, impl="triton")
    assert_close_to_oracle(flat_m[0], before, flat_o[0], 0.9)


def test_one_launch_for_a_list(triton_device, monkeypatch):
    launches = []
    kernel = mod._momentum_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(mod, "_momentum_kernel", Counting())
    monkeypatch.setattr(mod._dispatch, "resolve", lambda impl, device, k: "triton")
    moms, onls = make(SIZES, triton_device, seed=4)
    momentum_update_(moms, onls, 0.99)
    assert len(launches) == 1


def test_reference_matches_float64_and_triton(triton_device):
    moms, onls = make(SIZES, triton_device, seed=5)
    ref = [t.clone() for t in moms]
    lows = [torch.empty(n, dtype=torch.bfloat16, device=triton_device) for n in SIZES]
    ref_lows = [t.clone() for t in lows]
    momentum_update_(moms, onls, 0.99, lows, impl="triton")
    momentum_update_reference_(ref, onls, 0.99, ref_lows)
    for a, b, la, lb in zip(moms, ref, lows, ref_lows):
        torch.testing.assert_close(a, b, rtol=2.4e-7, atol=1e-7)
        torch.testing.assert_close(la.float(), lb.float(), rtol=2**-8, atol=0)  # 1 bf16 ulp if a and b differ


def test_works_on_parameters_that_require_grad(triton_device):
    """Momentum-encoder parameters are leaves; the update runs under no_grad and bumps their version."""
    p = torch.nn.Parameter(torch.randn(100, device=triton_device))
    v = p._version
    momentum_update_(p.view(-1), torch.randn(100, device=triton_device), 0.99, impl="triton")
    assert p._version > v


def test_reference_path_on_plain_cpu():
    moms, onls = make([10, 20], "cpu", seed=6)
    before = [t.clone() for t in moms]
    momentum_update_(moms, onls, 0.99, impl="reference")
    for got, b, o in zip(moms, before, onls):
        assert_close_to_oracle(got, b, o, 0.99)


def test_bad_arguments():
    a, b = torch.zeros(4), torch.zeros(5)
    with pytest.raises(ValueError, match=r"online\[0\] has 5 elements, expected 4"):
        momentum_update_(a, b, 0.9)
    with pytest.raises(ValueError, match="1 momentum buffers but 2 online buffers"):
        momentum_update_([a], [a, a], 0.9)
    with pytest.raises(ValueError, match=r"m must lie in \[0, 1\], got 1.5"):
        momentum_update_(a, a, 1.5)
    with pytest.raises(TypeError, match=r"momentum\[0\]: .* one dtype from \(torch.float32,\); got torch.float64"):
        momentum_update_(a.double(), a, 0.9)
    with pytest.raises(TypeError, match=r"momentum_lowp\[0\]: .* from \(torch.bfloat16,\); got torch.float16"):
        momentum_update_(a, a, 0.9, momentum_lowp=torch.zeros(4, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"momentum\[0\] must be a contiguous 1-D tensor"):
        momentum_update_(torch.zeros(2, 2), torch.zeros(2, 2), 0.9)


def test_public_names():
    assert brivl_kernels.momentum_update_ is momentum_update_
    assert brivl_kernels.momentum_update_reference_ is momentum_update_reference_
