"""Why stochastic rounding guards the bf16 moments of AdamWHalfStates: measurements on CPU.

    python -m brivl_kernels.adamw_half_study     # prints the markdown tables quoted in RESULTS.md (~1 min)

1. Underflow: the share of exp_avg_sq = (1 - beta2) g^2 (its value after the first step) that flushes to zero when
   stored, per gradient magnitude, for fp32, bf16 (nearest, stochastic, per-block scale) and fp16 (plain and with a
   per-block scale; fp16 is not what this optimizer stores, it shows where a scale matters).
2. Stagnation: exp_avg_sq under beta2 = 0.999 when the gradient scale drops 10x, storage variants side by side,
   and the Adam update direction it produces, relative to the fp32 optimizer fed the same gradients.
3. Training: loss curves of a small MLP for fp32 AdamW, AdamWHalfStates (stochastic / nearest rounding) and an
   emulation of DeepSpeed's bf16 master weights + bf16 states (fp32 math, weights and moments rounded to bf16).
"""
from __future__ import annotations

import math

import torch

from ._rounding import bf16_rne_torch, bf16_sr_torch

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def _block_scaled(x: torch.Tensor, dtype, block: int = 128) -> torch.Tensor:
    """Round trip through `dtype` with one fp32 scale (the absolute maximum) per block of `block` elements."""
    n = x.numel()
    pad = (-n) % block
    xb = torch.nn.functional.pad(x.reshape(-1), (0, pad)).reshape(-1, block)
    scale = xb.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return ((xb / scale).to(dtype).float() * scale).reshape(-1)[:n].reshape(x.shape)


def storages(gen: torch.Generator):
    def sr(x):
        return bf16_sr_torch(x, torch.randint(0, 65536, x.shape, generator=gen, dtype=torch.int64)).float()

    return {
        "fp32": lambda x: x,
        "bf16, nearest": lambda x: bf16_rne_torch(x).float(),
        "bf16, stochastic": sr,
        "bf16 + per-block scale": lambda x: _block_scaled(x, torch.bfloat16),
        "fp16, nearest": lambda x: x.half().float(),
        "fp16 + per-block scale": lambda x: _block_scaled(x, torch.float16),
    }


def underflow_table(n: int = 100_000) -> str:
    gen = torch.Generator().manual_seed(0)
    store = storages(gen)
    exps = [-2, -4, -6, -8, -10, -15, -18, -19, -20, -22]
    lines = ["| stored exp_avg_sq = (1-beta2) g^2, \\|g\\| in | " + " | ".join(store) + " |",
             "|---|" + "---:|" * len(store)]
    for e in exps:
        g = torch.pow(10.0, e - torch.rand(n, generator=gen, dtype=torch.float64)).float()  # |g| in [10^(e-1), 10^e)
        v = (1 - BETA2) * g * g
        row = [f"{(fn(v) == 0).double().mean().item() * 100:.1f} %" for fn in store.values()]
        lines.append(f"| [1e{e - 1}, 1e{e}) | " + " | ".join(row) + " |")
    return "\n".join(lines)


def stagnation_table(n: int = 65_536, steps: int = 3000, drop_at: int = 1000, outlier: bool = False) -> str:
    """Gradients N(0, s^2), s = 1 then 0.1 from `drop_at`: the fp32 optimizer's v falls 100x within ~5k steps.
    outlier: the first element of every 128 keeps a 10x larger gradient throughout (a steady block maximum); the
    statistics then cover the other elements only."""
    gen = torch.Generator().manual_seed(1)
    big = torch.zeros(n, dtype=torch.bool)
    if outlier:
        big[::128] = True
    keep = ~big
    names = list(storages(gen))
    stores = storages(gen)
    m = {k: torch.zeros(n) for k in names}
    v = {k: torch.zeros(n) for k in names}
    checkpoints = {drop_at + 500: {}, steps: {}}
    for t in range(1, steps + 1):
        s = 1.0 if t <= drop_at else 0.1
        g = torch.where(big, 10.0, s) * torch.randn(n, generator=gen)
        for k in names:
            m_new = m[k] + (1 - BETA1) * (g - m[k])
            v_new = v[k] * BETA2 + (1 - BETA2) * g * g
            m[k], v[k] = stores[k](m_new), stores[k](v_new)
        if t in checkpoints:
            bc1, bc2 = 1 - BETA1**t, 1 - BETA2**t
            upd = {k: ((m[k] / bc1) / ((v[k] / bc2).sqrt() + EPS))[keep] for k in names}
            for k in names:
                rel_v = (v[k][keep].mean() / v["fp32"][keep].mean()).item()
                err = ((upd[k] - upd["fp32"]).norm() / upd["fp32"].norm()).item()
                ratio = (upd[k].abs().mean() / upd["fp32"].abs().mean()).item()
                checkpoints[t][k] = (rel_v, err, ratio)
    lines = ["| storage | mean v / fp32, step %d | update: rel. error, step %d | mean \\|update\\| / fp32, step %d "
             "| mean v / fp32, step %d | update: rel. error, step %d | mean \\|update\\| / fp32, step %d |"
             % ((drop_at + 500,) * 3 + (steps,) * 3), "|---|" + "---:|" * 6]
    for k in names:
        a, b = checkpoints[drop_at + 500][k], checkpoints[steps][k]
        lines.append(f"| {k} | {a[0]:.3f} | {a[1]:.3f} | {a[2]:.3f} | {b[0]:.3f} | {b[1]:.3f} | {b[2]:.3f} |")
    return "\n".join(lines)


class _Bf16MasterEmulation(torch.optim.AdamW):
    """fp32 AdamW math, then weights and both moments rounded to bf16 (nearest): what DeepSpeed's
    bf16_master_weights_and_grads + bf16_optimizer_states stores between steps."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.copy_(p.grad.bfloat16())
        out = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.copy_(p.bfloat16())
                st = self.state.get(p, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in st:
                        st[key].copy_(st[key].bfloat16())
        return out


def training_table(steps: int = 1500, lr: float = 1e-3) -> str:
    from .adamw_half import AdamWHalfStates

    recipes = {
        "fp32 AdamW (baseline)": lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.01),
        "AdamWHalfStates, stochastic": lambda ps: AdamWHalfStates(ps, lr=lr, weight_decay=0.01, impl="reference"),
        "AdamWHalfStates, nearest": lambda ps: AdamWHalfStates(ps, lr=lr, weight_decay=0.01, impl="reference",
                                                               rounding="nearest"),
        "bf16 weights + bf16 states (emulated DeepSpeed bf16_optimizer_states)":
            lambda ps: _Bf16MasterEmulation(ps, lr=lr, weight_decay=0.01),
    }
    curves = {k: _train(f, steps) for k, f in recipes.items()}
    base = curves["fp32 AdamW (baseline)"]
    lines = [f"| optimizer | final loss (mean of last 100 of {steps} steps) | vs fp32 | max deviation of the "
             "50-step moving average from fp32 |", "|---|---:|---:|---:|"]
    for k, c in curves.items():
        final, final0 = c[-100:].mean().item(), base[-100:].mean().item()
        dev = ((_smooth(c) - _smooth(base)).abs() / _smooth(base)).max().item()
        lines.append(f"| {k} | {final:.4f} | {100 * (final / final0 - 1):+.2f} % | {100 * dev:.2f} % |")
    return "\n".join(lines)


def _smooth(x, w=50):
    return torch.nn.functional.avg_pool1d(x[None, None], w, 1)[0, 0]


def _train(opt_factory, steps, seed=0):
    """A teacher-student regression MLP (fixed data order): the loss curve."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    x = torch.randn(4096, 32, generator=g)
    with torch.no_grad():
        y = teacher(x)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                                torch.nn.GELU(), torch.nn.Linear(256, 8))
    opt = opt_factory(model.parameters())
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def main() -> int:
    torch.set_num_threads(1)
    print("### 1. Underflow: share of exp_avg_sq flushed to zero when stored (after step 1)\n")
    print(underflow_table())
    print("\n### 2. Stagnation: gradient scale drops 10x at step 1000 (beta2 = 0.999, 65,536 elements)\n")
    print(stagnation_table())
    print("\n### 2b. The same with one steady 10x-larger gradient in every block of 128 (statistics over the rest)\n")
    print(stagnation_table(outlier=True))
    print("\n### 3. Training a small MLP (teacher-student regression, lr 1e-3)\n")
    print(training_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
