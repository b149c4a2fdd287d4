"""The EMA keeps fp32 values even when the model's momentum weights are bf16."""
import torch

from brivl_ds.moco.momentum import MomentumUpdater


def test_fp32_master_keeps_moving_where_a_bf16_ema_stalls():
    """Online weights on a ramp o_k = 1 + k d; the EMA from e_0 = 1 has the closed form
    e_n = 1 + d (n - m (1 - m^n) / (1 - m)), computed here in float64."""
    m, d, n = 0.999, 1e-3, 200
    online = torch.nn.Parameter(torch.full((64,), 1.0))
    momentum = torch.nn.Parameter(torch.full((64,), 1.0, dtype=torch.bfloat16), requires_grad=False)
    ema = MomentumUpdater([(online, momentum)], impl="reference")
    for k in range(1, n + 1):
        with torch.no_grad():
            online.fill_(1 + k * d)
        ema.update(m)
    exact = 1 + d * (n - m * (1 - m**n) / (1 - m))  # 1.01881
    # fp32 master: an update rounds twice (m e, then + (1 - m) o: <= 2^-24 * 1.02 each) and m, 1 - m in fp32 sum
    # to 1 + 1.3e-8; errors decay by m per step, so n updates add at most n * 1.35e-7, plus the online values' own
    # rounding (6.1e-8): 2.7e-5 (measured 2.4e-6), against the 1.9e-2 a stalled EMA would miss by
    master = ema.master[0].double()
    assert (master - exact).abs().max().item() <= (n + 1) * (2 * 2.0**-24 + 1.3e-8) * 1.02
    assert torch.equal(momentum.data, ema.master[0].bfloat16())  # the bf16 weights are the rounded fp32 EMA
    # premise: each step's EMA increment (1 - m)(o_k - e) <= 1e-3 * 0.2 is below half a bf16 ulp near 1 (2^-8), so
    # an EMA computed in bf16 rounds back to 1.0 every step and never moves; the weights written here did move,
    # to the bf16 number nearest the exact EMA (1.015625; a bf16 ulp is 2^-7 there)
    assert (1 - m) * (n * d) < 2.0**-8
    nearest = torch.full((64,), exact, dtype=torch.float64).bfloat16()
    assert torch.equal(momentum.data, nearest) and momentum.data[0].item() == 1.015625


def test_frozen_online_parameters_are_skipped():
    online = torch.nn.Parameter(torch.ones(4), requires_grad=False)
    momentum = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
    ema = MomentumUpdater([(online, momentum)], impl="reference")
    ema.update(0.5)
    assert torch.equal(momentum.data, torch.zeros(4)) and ema.pairs == []
