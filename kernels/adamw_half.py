"""AdamW with fp32 master weights and bf16 moments: 4 bytes of optimizer state per parameter instead of 8.

One fused pass per parameter list reads p (fp32), g, exp_avg and exp_avg_sq (bf16), does the math in fp32
registers, and writes p, exp_avg, exp_avg_sq: 20 bytes per element with fp32 gradients (torch's fused AdamW with
fp32 states moves 28).

Guard for the bf16 moments: stochastic rounding. bf16 has fp32's exponent range, so exp_avg_sq does not underflow
any sooner than in fp32 (it would in fp16, which is where a per-block scale helps). What breaks with bf16 and
round-to-nearest is precision: with beta2 = 0.999 a step moves exp_avg_sq by 0.1 % of the gap to g^2, below half a
bf16 ulp (0.2-0.4 %), so it freezes, e.g. it never decays after a gradient spike. Stochastic rounding keeps every
stored moment an unbiased estimate of its fp32 value; a per-block scale would not change the 8-bit mantissa and
would not help. Measurements: `python -m brivl_kernels.adamw_half_study`, numbers in RESULTS.md.

The math mirrors torch.optim.AdamW (decoupled weight decay, bias corrections, eps added after the square root);
the update uses the fp32 moments of this step, and only their stored copies are rounded.
"""
from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from . import _dispatch
from ._multi_tensor import ROW, bump_version, chunk_table
from ._rounding import (_bf16_rne, _bf16_sr, _fmix32, bf16_rne_torch, bf16_sr_torch, fmix32_int,
                        random_bits_torch)

CHUNK = 65536
BLOCK = 1024  # 4 warps x 32 threads x 8 elements
ROUNDINGS = ("stochastic", "nearest")
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, idx, msk, seed, omb1, beta2, omb2, eps, decay, step_size, bc2_sqrt,
                 STOCHASTIC: tl.constexpr):
    p = tl.load(p_ptr + idx, mask=msk)
    g = tl.load(g_ptr + idx, mask=msk).to(tl.float32)
    m = tl.load(m_ptr + idx, mask=msk).to(tl.float32)
    v = tl.load(v_ptr + idx, mask=msk).to(tl.float32)
    m = m + omb1 * (g - m)                 # torch: exp_avg.lerp_(grad, 1 - beta1)
    v = v * beta2 + omb2 * (g * g)         # torch: exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
    p = p * decay                          # decoupled weight decay: p *= 1 - lr * wd
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    tl.store(p_ptr + idx, p, mask=msk)
    if STOCHASTIC:
        h = _fmix32(idx.to(tl.uint32) ^ seed)  # 32 random bits per element: 16 for each moment
        tl.store(m_ptr + idx, _bf16_sr(m, h & 0xFFFF), mask=msk)
        tl.store(v_ptr + idx, _bf16_sr(v, h >> 16), mask=msk)
    else:
        tl.store(m_ptr + idx, _bf16_rne(m), mask=msk)
        tl.store(v_ptr + idx, _bf16_rne(v), mask=msk)


@triton.jit
def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, table_ptr, seed, omb1, beta2, omb2, eps, decay, step_size, bc2_sqrt,
                  STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                  ROW: tl.constexpr):
    row = table_ptr + tl.program_id(0) * ROW
    off_p = tl.load(row + 0)
    off_g = tl.load(row + 1)
    off_m = tl.load(row + 2)
    off_v = tl.load(row + 3)
    start = tl.load(row + 4)
    n = tl.load(row + 5)
    stream = tl.load(row + 6)
    if ALIGNED:
        off_p = tl.multiple_of(off_p, 4)
        off_g = tl.multiple_of(off_g, 4)
        off_m = tl.multiple_of(off_m, 8)
        off_v = tl.multiple_of(off_v, 8)
        start = tl.multiple_of(start, CHUNK)
    # Per-chunk hash state, as _rounding.chunk_seed: fmix32(fmix32(stream ^ seed) ^ (start >> 32)).
    s = _fmix32(_fmix32(stream.to(tl.uint32) ^ seed.to(tl.uint32)) ^ (start >> 32).to(tl.uint32))
    pp, gg, mm, vv = p_ptr + off_p, g_ptr + off_g, m_ptr + off_m, v_ptr + off_v
    n_here = tl.minimum(n - start, CHUNK)
    n_full = n_here // BLOCK * BLOCK
    for i in range(0, n_full, BLOCK):
        idx = start + i + tl.arange(0, BLOCK)
        _adamw_block(pp, gg, mm, vv, idx, None, s, omb1, beta2, omb2, eps, decay, step_size, bc2_sqrt, STOCHASTIC)
    if n_full < n_here:
        idx = start + n_full + tl.arange(0, BLOCK)
        _adamw_block(pp, gg, mm, vv, idx, idx < start + n_here, s, omb1, beta2, omb2, eps, decay, step_size,
                     bc2_sqrt, STOCHASTIC)


def _scalars(lr, beta1, beta2, eps, weight_decay, step):
    """Host-side constants, computed in Python doubles exactly as torch.optim.AdamW does."""
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    return dict(omb1=1.0 - beta1, beta2=beta2, omb2=1.0 - beta2, eps=eps, decay=1.0 - lr * weight_decay,
                step_size=lr / bc1, bc2_sqrt=math.sqrt(bc2))


REFERENCE_CHUNK = 1 << 22  # elements per pass of the reference on the dispatch path (CPU runs)


@torch.no_grad()
def adamw_half_step_reference_(params, grads, exp_avgs, exp_avg_sqs, streams, *, lr, beta1, beta2, eps,
                               weight_decay, step, seed=0, rounding="stochastic", chunk=None):
    """Plain-PyTorch twin of the kernel on lists of flat tensors (fp32 params, bf16 moments), same op order and
    the same random bits, so both paths agree to the last bit wherever the GPU does not fuse a multiply-add.

    chunk: elements per pass (None = whole tensors). Each pass makes about 60 bytes of fp32 / int64 temporaries
    per element; under ZeRO-3 a tensor is a rank's whole flat partition, so unchunked that is 16 GiB for 270 M
    trainable elements. The math is elementwise, so chunks give the same bits."""
    c = _scalars(lr, beta1, beta2, eps, weight_decay, step)
    for p, g, m16, v16, stream in zip(params, grads, exp_avgs, exp_avg_sqs, streams):
        size = chunk or max(1, p.numel())
        for start in range(0, p.numel(), size):
            part = slice(start, start + size)
            _reference_pass(p[part], g[part], m16[part], v16[part], c, seed, stream, start, rounding)


def _reference_pass(p, g, m16, v16, c, seed, stream, start, rounding):
    g = g.float()
    m = m16.float()
    v = v16.float()
    m = m + c["omb1"] * (g - m)
    v = v * c["beta2"] + c["omb2"] * (g * g)
    p.mul_(c["decay"])
    denom = v.sqrt() / c["bc2_sqrt"] + c["eps"]
    p.sub_(c["step_size"] * (m / denom))
    if rounding == "stochastic":
        h = random_bits_torch(seed, stream, p.numel(), p.device, start)
        m16.copy_(bf16_sr_torch(m, h & 0xFFFF))
        v16.copy_(bf16_sr_torch(v, h >> 16))
    else:
        m16.copy_(bf16_rne_torch(m))
        v16.copy_(bf16_rne_torch(v))


def adamw_half_step_(params, grads, exp_avgs, exp_avg_sqs, streams, *, lr, beta1, beta2, eps, weight_decay, step,
                     seed=0, rounding="stochastic", impl="auto"):
    """One AdamW step over lists of flat tensors in a single launch (or the reference)."""
    seed &= 0x7FFFFFFF  # a 31-bit kernel argument keeps one compiled signature
    if _dispatch.resolve(impl, params[0].device, _adamw_kernel) == "reference":
        return adamw_half_step_reference_(params, grads, exp_avgs, exp_avg_sqs, streams, lr=lr, beta1=beta1,
                                          beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, seed=seed,
                                          rounding=rounding, chunk=REFERENCE_CHUNK)
    table, aligned = chunk_table([params, grads, exp_avgs, exp_avg_sqs], CHUNK, streams)
    if table.shape[0] == 0:
        return None
    _adamw_kernel[(table.shape[0],)](
        params[0], grads[0], exp_avgs[0], exp_avg_sqs[0], table, seed,
        **_scalars(lr, beta1, beta2, eps, weight_decay, step),
        STOCHASTIC=rounding == "stochastic", ALIGNED=aligned, CHUNK=CHUNK, BLOCK=BLOCK, ROW=ROW, num_warps=4)
    bump_version(*params, *exp_avgs, *exp_avg_sqs)
    return None


class AdamWHalfStates(torch.optim.Optimizer):
    """AdamW over fp32 parameters with exp_avg and exp_avg_sq stored in bf16 (stochastic rounding by default).

    Same hyper-parameters and math as torch.optim.AdamW (no amsgrad / maximize). Per-group lr, betas, eps and
    weight_decay work. Under DeepSpeed ZeRO-3 as a client optimizer (`zero_allow_untested_optimizer: true`) it
    steps the flat fp32 partitions; its state_dict goes through DeepSpeed checkpoints.

    impl:     "auto" | "triton" | "reference" (see brivl_kernels); "reference" is plain PyTorch, same storage.
    rounding: "stochastic" (default, unbiased) | "nearest" (round to nearest even; stalls for beta2 near 1).
    seed:     base of the rounding random streams; give each data-parallel rank its own (e.g. its rank) for
              independent rounding noise across ranks. Bits are a hash of (seed, stream, step, element), so a
              resumed run repeats them.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, impl="auto", *,
                 rounding="stochastic", seed=0):
        if not 0.0 <= lr:
            raise ValueError(f"invalid lr {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}: each must lie in [0, 1)")
        if not 0.0 <= eps:
            raise ValueError(f"invalid eps {eps}")
        if impl not in _dispatch.IMPLS:
            raise ValueError(f"impl must be one of {_dispatch.IMPLS}, got {impl!r}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.impl, self.rounding, self.seed = impl, rounding, int(seed)
        self._streams = itertools.count()

    def _init_state(self, p):
        st = self.state[p]
        st["step"] = 0
        st["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
        st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
        st["stream"] = next(self._streams)  # names this tensor's random stream; saved with the state
        return st

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            buckets = {}  # one launch per (device, step, grad dtype): normally one per group
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamWHalfStates does not support sparse gradients")
                if p.dtype != torch.float32 or not p.is_contiguous():
                    raise TypeError("AdamWHalfStates keeps fp32 master weights: parameters must be contiguous fp32")
                if p.grad.dtype not in GRAD_DTYPES:
                    raise TypeError(f"unsupported gradient dtype {p.grad.dtype}")
                st = self.state[p] if self.state[p] else self._init_state(p)
                st["step"] += 1
                buckets.setdefault((p.device, st["step"], p.grad.dtype), []).append((p, st))
            for (_, step, _), items in buckets.items():
                adamw_half_step_(
                    [p.view(-1) for p, _ in items], [p.grad.reshape(-1) for p, _ in items],
                    [st["exp_avg"].view(-1) for _, st in items], [st["exp_avg_sq"].view(-1) for _, st in items],
                    [st["stream"] for _, st in items],
                    lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                    step=step, seed=fmix32_int(self.seed ^ fmix32_int(step)), rounding=self.rounding,
                    impl=self.impl)
        return loss

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # torch casts floating-point state to the parameter's dtype (fp32) on load; bf16 -> fp32 -> bf16 is exact.
        for st in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key] = st[key].to(torch.bfloat16).contiguous()
        streams = [st["stream"] for st in self.state.values() if "stream" in st]
        self._streams = itertools.count(max(streams) + 1 if streams else 0)


def aot_cases():
    """Configurations for aot_check.py."""
    sig = dict(p_ptr="*fp32", g_ptr="*fp32", m_ptr="*bf16", v_ptr="*bf16", table_ptr="*i64", seed="i32",
               omb1="fp32", beta2="fp32", omb2="fp32", eps="fp32", decay="fp32", step_size="fp32", bc2_sqrt="fp32")
    return [(f"adamw half states ({'stochastic' if sr else 'nearest'})", _adamw_kernel, sig,
             dict(STOCHASTIC=sr, ALIGNED=True, CHUNK=CHUNK, BLOCK=BLOCK, ROW=ROW), 4, 3) for sr in (True, False)]
