"""The EMA keeps fp32 values even when the model's momentum weights are bf16."""
import torch

from brivl_ds.moco.momentum import MomentumUpdater


def test_fp32_master_keeps_moving_where_a_bf16_ema_stalls():
    online = torch.nn.Parameter(torch.full((64,), 1.0))
    momentum = torch.nn.Parameter(torch.full((64,), 1.0, dtype=torch.bfloat16), requires_grad=False)
    ema = MomentumUpdater([(online, momentum)], impl="reference")
    m, expected, naive = 0.999, torch.full((64,), 1.0), torch.full((64,), 1.0, dtype=torch.bfloat16)
    for _ in range(200):
        with torch.no_grad():
            online.add_(1e-3)
        ema.update(m)
        expected = m * expected + (1 - m) * online.detach()
        naive = (m * naive + (1 - m) * online.detach().bfloat16()).bfloat16()
    torch.testing.assert_close(ema.master[0], expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(momentum.data, expected.bfloat16())  # the bf16 weights are the rounded fp32 EMA
    assert naive[0].item() == 1.0  # (1 - m) * delta is below bf16 resolution near 1.0: a bf16 EMA never moves
    assert expected[0].item() > 1.01


def test_frozen_online_parameters_are_skipped():
    online = torch.nn.Parameter(torch.ones(4), requires_grad=False)
    momentum = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
    ema = MomentumUpdater([(online, momentum)], impl="reference")
    ema.update(0.5)
    assert torch.equal(momentum.data, torch.zeros(4)) and ema.pairs == []
