"""Queue-contrastive InfoNCE without materialising the [B, K+1] logits (flash-attention style).

loss = mean_i ( LSE_i - s_i+ ),  s_ij = q_i.queue_j / tau,  s_i+ = q_i.k_i / tau,  LSE_i over {s_i+} and all valid s_ij.

Forward (`_fwd_kernel`): grid (row tiles of q) x (splits of the queue). Each program streams its share of the queue in
[BLOCK_K, BLOCK_D] tiles, forms a [BLOCK_B, BLOCK_K] tile of logits (fp32 accumulation over D) and folds it into an
online log-sum-exp: running max m, sum l = sum 2^(u-m) and t = sum 2^(u-m)*u (u = s*log2(e)); t gives E_p[s], which
is all the tau gradient needs. `_combine_kernel` merges the splits and the positive logit, writes per-row LSE and
the mean loss, and the (upstream-grad-free) tau gradient. Extra memory: O(B) per split, splits <= 2 x SMs.

Backward (`_bwd_kernel`): dq_i = g/(B tau) * ( sum_j p_ij queue_j + (p_i+ - 1) k_i ), p_ij = exp(s_ij - LSE_i).
The logits are recomputed tile by tile from q, the queue and the saved LSE. A dq row is D (2560) wide, too wide
for one program's registers, so programs also split D into chunks of BLOCK_DC columns (each recomputes the logits
of its tile: the recompute factor is ceil(D / BLOCK_DC)); chunks of one queue tile run side by side and share
its reads through L2. Splits of the queue are summed with fp32 atomics into one [B, D] buffer (extra memory
O(B*D)); fp32 atomics make dq reproducible only to ~1e-7 relative, not bitwise. `_finalize_kernel` adds the
positive-key term, scales, and casts.

False negatives (optional content ids, [B, C] and [K, C]): queue entry j is left out of row i when they share any
id column. The ids of a row tile and a queue tile are compared inside both kernels, so the mask costs a few int64
loads per tile instead of a [B, K] tensor (K reaches 10^6). A row left out of a whole tile keeps its running max
(its logits there are NEG), and the positive always stays in, so a row with no negatives gets loss 0, gradient 0.
Without ids (HAS_IDS=False) the kernels compile to the code they were before.

Inputs may be bf16, fp16 or fp32; everything accumulates in fp32. In the Triton interpreter (CPU) all loads are
cast to fp32 at once (`UPCAST`): the interpreter's bf16 arithmetic is broken.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import _dispatch
from ._rounding import _bf16_rne
from .contrastive_reference import check_inputs, queue_contrastive_loss_reference

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# A finite stand-in for -inf: running maxima start here and masked logits are set here, so exp2(m_old - m_new) is
# never exp2(-inf + inf) = nan when a whole tile is masked. Masked probabilities are zeroed explicitly.
NEG = tl.constexpr(-1.0e30)


@triton.jit
def _logits_tile(q_ptr, queue_ptr, rows64, row_ok, cols64, col_ok, D, stride_q, stride_queue,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """q[rows] @ queue[cols]^T as a [BLOCK_B, BLOCK_K] fp32 tile, accumulated over D in BLOCK_D steps."""
    s = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        a = tl.load(q_ptr + rows64[:, None] * stride_q + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(queue_ptr + cols64[:, None] * stride_queue + dd[None, :], mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        s = tl.dot(a, tl.trans(b), s, input_precision=PRECISION)
    return s


@triton.jit
def _ids_distinct(qid_ptr, kid_ptr, rows64, row_ok, cols64, col_ok, ID_COLS: tl.constexpr):
    """[BLOCK_B, BLOCK_K]: True where row i and queue entry j differ in every id column (ids are [n, ID_COLS],
    contiguous). Out-of-range rows and columns read 0: the caller masks those columns, and never stores those rows."""
    a = tl.load(qid_ptr + rows64 * ID_COLS, mask=row_ok, other=0)
    b = tl.load(kid_ptr + cols64 * ID_COLS, mask=col_ok, other=0)
    keep = a[:, None] != b[None, :]
    for c in tl.static_range(1, ID_COLS):
        a = tl.load(qid_ptr + rows64 * ID_COLS + c, mask=row_ok, other=0)
        b = tl.load(kid_ptr + cols64 * ID_COLS + c, mask=col_ok, other=0)
        keep = keep & (a[:, None] != b[None, :])
    return keep


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, queue_ptr, mask_ptr, qid_ptr, kid_ptr, tau_ptr, part_m_ptr, part_l_ptr, part_t_ptr,
                pos_ptr, B, K, D, stride_q, stride_k, stride_queue, tiles_per_split,
                HAS_MASK: tl.constexpr, HAS_IDS: tl.constexpr, ID_COLS: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    scale = LOG2E / tl.load(tau_ptr)  # logits in base-2 units: exp2 is the native instruction

    m_i = tl.full([BLOCK_B], NEG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_B], dtype=tl.float32)
    t_i = tl.zeros([BLOCK_B], dtype=tl.float32)
    n_tiles = (K + BLOCK_K - 1) // BLOCK_K
    t_begin = pid_s * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    for t in range(t_begin, t_end):
        cols = t * BLOCK_K + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        cols64 = cols.to(tl.int64)
        s = _logits_tile(q_ptr, queue_ptr, rows64, row_ok, cols64, col_ok, D, stride_q, stride_queue,
                         UPCAST, PRECISION, BLOCK_B, BLOCK_K, BLOCK_D)
        valid = col_ok
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + cols, mask=col_ok, other=0) != 0)
        keep = valid[None, :]  # [1, BLOCK_K]; per row ([BLOCK_B, BLOCK_K]) with ids
        if HAS_IDS:
            keep = keep & _ids_distinct(qid_ptr, kid_ptr, rows64, row_ok, cols64, col_ok, ID_COLS)
        # A row whose whole tile is left out keeps m (u = NEG <= m) and gains exactly nothing (p zeroed).
        u = tl.where(keep, s * scale, NEG)
        m_new = tl.maximum(m_i, tl.max(u, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.where(keep, tl.exp2(u - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        t_i = t_i * alpha + tl.sum(p * u, axis=1)
        m_i = m_new
    out = pid_s * B + rows
    tl.store(part_m_ptr + out, m_i, mask=row_ok)
    tl.store(part_l_ptr + out, l_i, mask=row_ok)
    tl.store(part_t_ptr + out, t_i, mask=row_ok)

    if pid_s == 0:  # the positive logit q_i.k_i, once per row
        pos = tl.zeros([BLOCK_B], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            msk = row_ok[:, None] & (dd < D)[None, :]
            a = tl.load(q_ptr + rows64[:, None] * stride_q + dd[None, :], mask=msk, other=0.0).to(tl.float32)
            c = tl.load(k_ptr + rows64[:, None] * stride_k + dd[None, :], mask=msk, other=0.0).to(tl.float32)
            pos += tl.sum(a * c, axis=1)
        tl.store(pos_ptr + rows, pos * scale, mask=row_ok)


@triton.jit
def _combine_kernel(part_m_ptr, part_l_ptr, part_t_ptr, pos_ptr, tau_ptr, lse_ptr, loss_ptr, dtau_unit_ptr,
                    B, S, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program: merge the S splits with the positive logit; per-row LSE, mean loss, d(mean loss)/d tau."""
    tau = tl.load(tau_ptr)
    loss_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    gap_acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        ok = rows < B
        pos = tl.load(pos_ptr + rows, mask=ok, other=0.0)
        m = pos  # the positive term: weight 2^(pos - m) = 1
        l = tl.full([BLOCK_B], 1.0, dtype=tl.float32)
        t = pos
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            idx = ss[:, None] * B + rows[None, :]
            msk = (ss < S)[:, None] & ok[None, :]
            pm = tl.load(part_m_ptr + idx, mask=msk, other=NEG)
            pl = tl.load(part_l_ptr + idx, mask=msk, other=0.0)
            pt = tl.load(part_t_ptr + idx, mask=msk, other=0.0)
            m_new = tl.maximum(m, tl.max(pm, axis=0))
            w = tl.exp2(pm - m_new[None, :])  # m_new >= pos > NEG, so empty splits get weight 0
            alpha = tl.exp2(m - m_new)
            l = l * alpha + tl.sum(pl * w, axis=0)
            t = t * alpha + tl.sum(pt * w, axis=0)
            m = m_new
        lse = m + tl.log2(l)
        tl.store(lse_ptr + rows, lse, mask=ok)
        loss_acc += tl.where(ok, lse - pos, 0.0)
        gap_acc += tl.where(ok, t / l - pos, 0.0)  # E_p[u] - u_+, in base-2 units
    tl.store(loss_ptr, tl.sum(loss_acc, axis=0) * LN2 / B)
    # d/dtau mean_i(LSE_i - s_i+) = -(1 / (B tau)) * sum_i (E_p[s_i] - s_i+), with s = u * ln 2
    tl.store(dtau_unit_ptr, -tl.sum(gap_acc, axis=0) * LN2 / (B * tau))


@triton.jit
def _bwd_kernel(q_ptr, queue_ptr, mask_ptr, qid_ptr, kid_ptr, tau_ptr, lse_ptr, dq_acc_ptr,
                B, K, D, stride_q, stride_queue, tiles_per_split, n_dchunks,
                HAS_MASK: tl.constexpr, HAS_IDS: tl.constexpr, ID_COLS: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr):
    """dq_acc[rows, chunk] += sum_j p_ij queue_j[chunk] over this program's share of the queue."""
    pid0 = tl.program_id(0)  # (row tile, D chunk), chunk fastest: programs on one queue tile run together
    pid_s = tl.program_id(1)
    pid_b = pid0 // n_dchunks
    pid_c = pid0 % n_dchunks
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    scale = LOG2E / tl.load(tau_ptr)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    dc = pid_c * BLOCK_DC + tl.arange(0, BLOCK_DC)
    dc_ok = dc < D

    acc = tl.zeros([BLOCK_B, BLOCK_DC], dtype=tl.float32)
    n_tiles = (K + BLOCK_K - 1) // BLOCK_K
    t_begin = pid_s * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    for t in range(t_begin, t_end):
        cols = t * BLOCK_K + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        cols64 = cols.to(tl.int64)
        s = _logits_tile(q_ptr, queue_ptr, rows64, row_ok, cols64, col_ok, D, stride_q, stride_queue,
                         UPCAST, PRECISION, BLOCK_B, BLOCK_K, BLOCK_D)
        valid = col_ok
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + cols, mask=col_ok, other=0) != 0)
        keep = row_ok[:, None] & valid[None, :]
        if HAS_IDS:
            keep = keep & _ids_distinct(qid_ptr, kid_ptr, rows64, row_ok, cols64, col_ok, ID_COLS)
        p = tl.where(keep, tl.exp2(s * scale - lse[:, None]), 0.0)
        v = tl.load(queue_ptr + cols64[:, None] * stride_queue + dc[None, :], mask=col_ok[:, None] & dc_ok[None, :],
                    other=0.0)
        if UPCAST:
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    if t_end > t_begin:
        tl.atomic_add(dq_acc_ptr + rows64[:, None] * D + dc[None, :], acc, mask=row_ok[:, None] & dc_ok[None, :])


@triton.jit
def _finalize_kernel(dq_acc_ptr, k_ptr, pos_ptr, lse_ptr, tau_ptr, g_ptr, dq_ptr, B, D, stride_k, stride_dq,
                     OUT_BF16: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq = g / (B tau) * (dq_acc + (p_+ - 1) k), cast to q's dtype."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < B
    msk = row_ok[:, None] & (dd < D)[None, :]
    rows64 = rows.to(tl.int64)
    c = tl.load(g_ptr) / (B * tl.load(tau_ptr))
    p_pos = tl.exp2(tl.load(pos_ptr + rows, mask=row_ok, other=0.0) - tl.load(lse_ptr + rows, mask=row_ok, other=0.0))
    acc = tl.load(dq_acc_ptr + rows64[:, None] * D + dd[None, :], mask=msk, other=0.0)
    kk = tl.load(k_ptr + rows64[:, None] * stride_k + dd[None, :], mask=msk, other=0.0).to(tl.float32)
    dq = (acc + (p_pos - 1.0)[:, None] * kk) * c
    if OUT_BF16:
        tl.store(dq_ptr + rows64[:, None] * stride_dq + dd[None, :], _bf16_rne(dq), mask=msk)
    else:
        tl.store(dq_ptr + rows64[:, None] * stride_dq + dd[None, :], dq.to(dq_ptr.dtype.element_ty), mask=msk)


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration (heuristics; not tuned on a GPU yet, see RESULTS.md)

@dataclass(frozen=True)
class FwdConfig:
    block_b: int
    block_k: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class BwdConfig:
    block_b: int
    block_k: int
    block_d: int
    block_dc: int
    num_warps: int = 8
    num_stages: int = 2


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def default_fwd_config(B: int, D: int, fp32_operands: bool = False) -> FwdConfig:
    # Small B (the paper's 16 per GPU) is memory-bound: thin row tiles, long queue tiles. Large B is compute-bound:
    # 64/128-row tiles so Hopper's warpgroup MMA (wgmma) applies. fp32 operands (3xTF32) need smaller tiles.
    # All picks compile for sm_90a without register spills (aot_check.py); their speed is unmeasured.
    block_b = min(max(_pow2(B), 16), 32 if fp32_operands else 128)
    if fp32_operands:
        return FwdConfig(block_b=block_b, block_k=64, block_d=64, num_warps=8, num_stages=3)
    return FwdConfig(block_b=block_b, block_k=128, block_d=64, num_warps=4 if block_b <= 32 else 8, num_stages=3)


def default_bwd_config(B: int, D: int, fp32_operands: bool = False) -> BwdConfig:
    # The dq accumulator [BLOCK_B, BLOCK_DC] lives in registers: 16K fp32 over 8 warps = 64 per thread. Thin row
    # tiles allow wide D chunks, which keeps the recompute factor ceil(D / BLOCK_DC) small (3 at D = 2560).
    budget = 8192 if fp32_operands else 16384  # accumulator elements per program
    block_dc = min(_pow2(D), budget // 16)
    block_b = min(max(_pow2(B), 16), max(16, budget // block_dc), 64)
    return BwdConfig(block_b=block_b, block_k=16 if fp32_operands else 32, block_d=64, block_dc=block_dc)


def _splits(n_tiles: int, n_pid0: int, device: torch.device) -> tuple[int, int]:
    """(number of queue splits, tiles per split) so that about 2 programs per SM are in flight."""
    if n_tiles == 0:
        return 1, 0
    want = max(1, -(-2 * _dispatch.num_sms(device) // n_pid0))
    per = -(-n_tiles // min(want, n_tiles))
    return -(-n_tiles // per), per


def _dot_precision(dtype: torch.dtype, upcast: bool) -> str:
    # fp32 operands on tensor cores: 3xTF32 keeps ~fp32 accuracy. bf16/fp16 operands ignore the setting.
    return "tf32x3" if (upcast or dtype == torch.float32) else "ieee"


def _prepare(q, k, queue, tau, queue_mask, query_ids, queue_ids):
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k.detach()
    k = k if k.stride(-1) == 1 else k.contiguous()
    queue = queue.detach()
    queue = queue if queue.stride(-1) == 1 else queue.contiguous()
    tau32 = tau.detach().reshape(1).to(device=q.device, dtype=torch.float32)
    mask = None if queue_mask is None else queue_mask.to(q.device).contiguous().view(torch.uint8)
    ids = None if query_ids is None else (query_ids.contiguous(), queue_ids.contiguous())
    return q, k, queue, tau32, mask, ids


def _ids_args(ids, dummy):
    """Kernel arguments for the optional ids: (query ids, queue ids, HAS_IDS, ID_COLS)."""
    if ids is None:
        return dict(qid_ptr=dummy, kid_ptr=dummy, HAS_IDS=False, ID_COLS=1)
    return dict(qid_ptr=ids[0], kid_ptr=ids[1], HAS_IDS=True, ID_COLS=ids[0].shape[1])


def _forward(q, k, queue, tau32, mask, ids, cfg: FwdConfig | None, interpreted: bool):
    B, D = q.shape
    K = queue.shape[0]
    upcast = interpreted or not (q.dtype == k.dtype == queue.dtype != torch.float32)
    cfg = cfg or default_fwd_config(B, D, fp32_operands=upcast)
    n_b = triton.cdiv(B, cfg.block_b)
    S, per = _splits(triton.cdiv(K, cfg.block_k), n_b, q.device)
    f32 = dict(device=q.device, dtype=torch.float32)
    part_m, part_l, part_t = (torch.empty(S, B, **f32) for _ in range(3))
    pos2, lse2 = torch.empty(B, **f32), torch.empty(B, **f32)
    loss, dtau_unit = torch.empty((), **f32), torch.empty((), **f32)
    _fwd_kernel[(n_b, S)](
        q_ptr=q, k_ptr=k, queue_ptr=queue, mask_ptr=mask if mask is not None else q, **_ids_args(ids, q),
        tau_ptr=tau32, part_m_ptr=part_m, part_l_ptr=part_l, part_t_ptr=part_t, pos_ptr=pos2,
        B=B, K=K, D=D, stride_q=q.stride(0), stride_k=k.stride(0), stride_queue=queue.stride(0), tiles_per_split=per,
        HAS_MASK=mask is not None, UPCAST=upcast, PRECISION=_dot_precision(q.dtype, upcast),
        BLOCK_B=cfg.block_b, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _combine_kernel[(1,)](part_m, part_l, part_t, pos2, tau32, lse2, loss, dtau_unit, B, S,
                          BLOCK_B=min(max(_pow2(B), 16), 128), BLOCK_S=min(max(_pow2(S), 16), 32), num_warps=4)
    return loss, lse2, pos2, dtau_unit


def _backward_dq(g, q, k, queue, tau32, mask, ids, lse2, pos2, cfg: BwdConfig | None, interpreted: bool):
    B, D = q.shape
    K = queue.shape[0]
    upcast = interpreted or not (q.dtype == k.dtype == queue.dtype != torch.float32)
    cfg = cfg or default_bwd_config(B, D, fp32_operands=upcast)
    dq_acc = torch.zeros(B, D, device=q.device, dtype=torch.float32)
    if K > 0:
        n_c = triton.cdiv(D, cfg.block_dc)
        n_pid0 = triton.cdiv(B, cfg.block_b) * n_c
        S, per = _splits(triton.cdiv(K, cfg.block_k), n_pid0, q.device)
        _bwd_kernel[(n_pid0, S)](
            q_ptr=q, queue_ptr=queue, mask_ptr=mask if mask is not None else q, **_ids_args(ids, q),
            tau_ptr=tau32, lse_ptr=lse2, dq_acc_ptr=dq_acc, B=B, K=K, D=D, stride_q=q.stride(0),
            stride_queue=queue.stride(0), tiles_per_split=per, n_dchunks=n_c,
            HAS_MASK=mask is not None, UPCAST=upcast, PRECISION=_dot_precision(q.dtype, upcast),
            BLOCK_B=cfg.block_b, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, BLOCK_DC=cfg.block_dc,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    fb, fd = 16, min(max(_pow2(D), 16), 256)
    _finalize_kernel[(triton.cdiv(B, fb), triton.cdiv(D, fd))](
        dq_acc, k, pos2, lse2, tau32, g, dq, B, D, k.stride(0), dq.stride(0),
        OUT_BF16=q.dtype == torch.bfloat16, BLOCK_B=fb, BLOCK_D=fd, num_warps=4)
    return dq


class _QueueContrastiveFn(torch.autograd.Function):
    """Differentiable in q and tau only; k, queue, the mask and the ids are constants."""

    @staticmethod
    def forward(ctx, q, tau, k, queue, queue_mask, query_ids, queue_ids, fwd_cfg, bwd_cfg, interpreted):
        qc, kc, queuec, tau32, mask, ids = _prepare(q, k, queue, tau, queue_mask, query_ids, queue_ids)
        loss, lse2, pos2, dtau_unit = _forward(qc, kc, queuec, tau32, mask, ids, fwd_cfg, interpreted)
        # The queue is saved by reference: modifying it in place before backward trips autograd's version check.
        ctx.save_for_backward(qc, kc, queuec, tau32, lse2, pos2, dtau_unit,
                              *(() if mask is None else (mask,)), *(() if ids is None else ids))
        ctx.has_mask, ctx.has_ids = mask is not None, ids is not None
        ctx.bwd_cfg, ctx.interpreted = bwd_cfg, interpreted
        ctx.tau_shape, ctx.tau_dtype = tau.shape, tau.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        qc, kc, queuec, tau32, lse2, pos2, dtau_unit, *rest = ctx.saved_tensors
        mask = rest.pop(0) if ctx.has_mask else None
        ids = tuple(rest) if ctx.has_ids else None
        g32 = g.detach().reshape(1).to(torch.float32)
        dq = dtau = None
        if ctx.needs_input_grad[0]:
            dq = _backward_dq(g32, qc, kc, queuec, tau32, mask, ids, lse2, pos2, ctx.bwd_cfg, ctx.interpreted)
        if ctx.needs_input_grad[1]:
            dtau = (g32 * dtau_unit).reshape(ctx.tau_shape).to(ctx.tau_dtype)
        return dq, dtau, None, None, None, None, None, None, None, None


TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def queue_contrastive_loss(q, k, queue, tau, queue_mask=None, impl="auto", *, query_ids=None, queue_ids=None,
                           fwd_config=None, bwd_config=None):
    """Queue-contrastive InfoNCE loss (see `queue_contrastive_loss_reference` for the definition).

    q [B, D] (bf16/fp16/fp32, may require grad), k [B, D] positive keys, queue [K, D] negatives (K may be 0),
    tau a one-element tensor (may require grad), queue_mask optional bool [K], True = valid row.
    query_ids int64 [B, C] / queue_ids int64 [K, C], optional, together: queue_j is no negative of row i when
    they share any id column (false-negative masking; compared tile by tile, no [B, K] mask is built).
    Returns the mean loss as a 0-d fp32 tensor; gradients flow to q and tau only (k and queue are detached).
    impl: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else reference), "triton", "reference".
    Do not modify the queue in place between forward and backward (enqueue after backward, or pass a clone):
    it is saved by reference and autograd's version check would raise.
    fwd_config / bwd_config override the launch heuristics (FwdConfig / BwdConfig), for tests and tuning.
    """
    check_inputs(q, k, queue, tau, queue_mask, query_ids, queue_ids)
    path = _dispatch.resolve(impl, q.device, _fwd_kernel)
    if path == "triton" and q.dtype not in TRITON_DTYPES:
        if impl == "triton":
            raise TypeError(f"the Triton kernel takes bf16, fp16 or fp32 inputs, got {q.dtype}")
        path = "reference"
    if path == "reference":
        return queue_contrastive_loss_reference(q, k, queue, tau, queue_mask, query_ids, queue_ids)
    for name, t in (("k", k), ("queue", queue), ("tau", tau), ("query_ids", query_ids), ("queue_ids", queue_ids)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    return _QueueContrastiveFn.apply(q, tau, k, queue, queue_mask, query_ids, queue_ids, fwd_config, bwd_config,
                                     _dispatch.is_interpreted(_fwd_kernel))
