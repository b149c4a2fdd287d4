"""GPU benchmark of the kernels against PyTorch eager and torch.compile of the references.

    python -m brivl_ds.bench.kernels [--only contrastive,momentum,adamw] [--quick] [--markdown PATH]

For every kernel and size: the median time of many repeats (CUDA events around each call, after warm-up), the
bytes and FLOPs the operation needs at minimum (counted from the shapes, the same for every implementation, so
GB/s and TFLOP/s compare like with like), the fraction of this device's ceilings measured in the same run (a large
device-to-device copy; a large bf16 matmul), the speed-up over eager, and the peak memory each call allocates on
top of its inputs. Needs CUDA; refuses to run without it (nothing here is meaningful on CPU).
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from dataclasses import dataclass, field

import torch

CONTRASTIVE_SIZES = {"paper": (16, 16384, 2560), "large": (256, 65536, 2560), "huge queue": (128, 1_048_576, 1024)}
MOMENTUM_SIZES = {"1e8": [100_000_000], "1e8 in 512 tensors": [195_313] * 511 + [100_000_000 - 195_313 * 511],
                  "1e9": [1_000_000_000]}
ADAMW_SIZES = {"1e8": [100_000_000]}


@dataclass
class Row:
    kernel: str
    size: str
    impl: str
    ms: float | None            # median milliseconds; None when the case failed
    nbytes: float               # minimum bytes moved
    flops: float                # useful floating-point operations (0: not a FLOP-bound kernel)
    peak_extra: float | None    # bytes allocated by one call beyond what existed before it
    note: str = ""
    baseline_ms: float | None = field(default=None)  # eager time of the same kernel and size

    def gbps(self):
        return None if not self.ms else self.nbytes / self.ms / 1e6

    def tflops(self):
        return None if not self.ms or not self.flops else self.flops / self.ms / 1e9


# ---- what each operation must move and compute ----------------------------------------------------------------

def contrastive_cost(B, K, D, elem=2, backward=True, id_cols=0):
    """Minimum bytes and useful FLOPs of the loss (and its backward). The queue does not fit in L2, so the backward
    reads it again; the logit recomputation of a fused backward is not counted as useful work. With content ids
    (id_cols int64 columns per query and queue entry) each pass also reads them; the compares are not FLOPs."""
    ids = (B + K) * id_cols * 8
    fwd_bytes = K * D * elem + 2 * B * D * elem + ids
    fwd_flops = 2 * B * (K + 1) * D
    if not backward:
        return fwd_bytes, fwd_flops
    return fwd_bytes + K * D * elem + 3 * B * D * elem + ids, fwd_flops + 2 * B * K * D


def momentum_cost(n, lowp):
    return n * (12 + (2 if lowp else 0)), 3 * n  # fp32 momentum read+write, fp32 online read, bf16 copy write


def adamw_cost(n, state_bytes=2):
    return n * (8 + 4 + 4 * state_bytes), 0  # p read+write, fp32 grad read, two moments read+write


# ---- measurement ----------------------------------------------------------------------------------------------

def cuda_time(fn, warmup=5, min_repeats=10, max_repeats=200, budget_s=1.0) -> float:
    """Median milliseconds of `fn` over repeats, each bracketed by its own pair of CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    repeats = int(min(max_repeats, max(min_repeats, budget_s * 1e3 / max(start.elapsed_time(end), 1e-3))))
    events = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def peak_extra_bytes(fn) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure(kernel, size, impl, fn, cost, quick=False) -> Row:
    nbytes, flops = cost
    try:
        ms = cuda_time(fn, warmup=2 if quick else 5, min_repeats=3 if quick else 10,
                       max_repeats=20 if quick else 200, budget_s=0.2 if quick else 1.0)
        return Row(kernel, size, impl, ms, nbytes, flops, peak_extra_bytes(fn))
    except Exception as exc:  # report a failing baseline (e.g. out of memory, compile error) instead of dying
        torch.cuda.empty_cache()
        return Row(kernel, size, impl, None, nbytes, flops, None, note=f"failed: {type(exc).__name__}: {exc}"[:120])


def ceilings(quick=False) -> dict:
    """Copy bandwidth (GB/s, bytes read + written) and bf16 matmul throughput (TFLOP/s) of this device."""
    n = 1 << (29 if quick else 31)  # bytes per buffer: 0.5 or 2 GiB
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    copy_ms = cuda_time(lambda: dst.copy_(src), max_repeats=50)
    del src, dst
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    mm_ms = cuda_time(lambda: a @ b, max_repeats=50)
    del a, b
    torch.cuda.empty_cache()
    return dict(copy_gbps=2 * n / copy_ms / 1e6, copy_bytes=2 * n, mm_tflops=2 * m**3 / mm_ms / 1e9, mm_n=m)


# ---- cases ------------------------------------------------------------------------------------------------------

def contrastive_rows(quick=False, device="cuda"):
    from brivl_kernels.contrastive import queue_contrastive_loss
    from brivl_kernels.contrastive_reference import queue_contrastive_loss_reference

    compiled = torch.compile(queue_contrastive_loss_reference, dynamic=False)
    impls = {"triton": lambda *a, **kw: queue_contrastive_loss(*a, impl="triton", **kw),
             "eager": queue_contrastive_loss_reference, "torch.compile": compiled}
    rows = []
    for size, (B, K, D) in CONTRASTIVE_SIZES.items():
        g = torch.Generator(device=device).manual_seed(0)

        def emb(n):
            return torch.nn.functional.normalize(torch.randn(n, D, device=device, generator=g), dim=1).bfloat16()

        q, k, queue = emb(B).requires_grad_(), emb(B), emb(K)
        tau = torch.tensor(0.05, device=device, requires_grad=True)
        # Content ids as the trainer passes them (image hash, caption hash), each query's image also in the queue.
        qid = torch.randint(0, 2**62, (B, 2), device=device, generator=g)
        kid = torch.randint(0, 2**62, (K, 2), device=device, generator=g)
        kid[:min(B, K), 0] = qid[:min(B, K), 0]
        label = f"B={B} K={K:,} D={D}"
        for impl, f in impls.items():
            def fwd(f=f):
                with torch.no_grad():
                    f(q, k, queue, tau)

            def fwd_bwd(f=f):
                q.grad = tau.grad = None
                f(q, k, queue, tau).backward()

            rows.append(measure("contrastive fwd", f"{size}: {label}", impl, fwd,
                                contrastive_cost(B, K, D, backward=False), quick))
            def fwd_bwd_ids(f=f):
                q.grad = tau.grad = None
                f(q, k, queue, tau, query_ids=qid, queue_ids=kid).backward()

            rows.append(measure("contrastive fwd+bwd", f"{size}: {label}", impl, fwd_bwd,
                                contrastive_cost(B, K, D), quick))
            rows.append(measure("contrastive fwd+bwd, id-masked", f"{size}: {label}", impl, fwd_bwd_ids,
                                contrastive_cost(B, K, D, id_cols=2), quick))
        del q, k, queue, qid, kid
        torch.cuda.empty_cache()
    return rows


def momentum_rows(quick=False, device="cuda"):
    from brivl_kernels.momentum import momentum_update_, momentum_update_reference_

    compiled = torch.compile(momentum_update_reference_)
    rows = []
    for size, numels in MOMENTUM_SIZES.items():
        flat_m = torch.randn(sum(numels), device=device)
        flat_o = torch.randn(sum(numels), device=device)
        flat_l = torch.empty(sum(numels), device=device, dtype=torch.bfloat16)
        moms, onls, lows = (list(t.split(numels)) for t in (flat_m, flat_o, flat_l))
        n = sum(numels)
        cases = {
            ("triton", False): lambda: momentum_update_(moms, onls, 0.99, impl="triton"),
            ("triton", True): lambda: momentum_update_(moms, onls, 0.99, lows, impl="triton"),
            ("eager", False): lambda: momentum_update_reference_(moms, onls, 0.99),
            ("eager", True): lambda: momentum_update_reference_(moms, onls, 0.99, lows),
            ("torch._foreach_lerp_", False): lambda: torch._foreach_lerp_(moms, onls, 0.01),
            ("torch.compile", False): lambda: compiled(moms, onls, 0.99),
        }
        for (impl, lowp), fn in cases.items():
            kernel = "momentum update" + (" + bf16 copy" if lowp else "")
            rows.append(measure(kernel, size, impl, fn, momentum_cost(n, lowp), quick))
        del flat_m, flat_o, flat_l, moms, onls, lows
        torch.cuda.empty_cache()
    return rows


def adamw_rows(quick=False, device="cuda"):
    from brivl_kernels.adamw_half import AdamWHalfStates, adamw_half_step_reference_

    rows = []
    for size, numels in ADAMW_SIZES.items():
        n = sum(numels)

        def params():
            ps = [torch.nn.Parameter(torch.randn(k, device=device)) for k in numels]
            for p in ps:
                p.grad = torch.randn_like(p)
            return ps

        ours = AdamWHalfStates(params(), lr=1e-4, impl="triton")
        ref = AdamWHalfStates(params(), lr=1e-4, impl="reference")
        rows.append(measure("AdamW step", size, "triton (bf16 states)", ours.step, adamw_cost(n), quick))
        rows.append(measure("AdamW step", size, "eager", ref.step, adamw_cost(n), quick))
        del ours, ref
        torch.cuda.empty_cache()

        ps = params()
        states = [(torch.zeros(k, device=device, dtype=torch.bfloat16),
                   torch.zeros(k, device=device, dtype=torch.bfloat16)) for k in numels]
        step_ref = torch.compile(adamw_half_step_reference_)
        rows.append(measure("AdamW step", size, "torch.compile", lambda: step_ref(
            ps, [p.grad for p in ps], [s[0] for s in states], [s[1] for s in states], list(range(len(ps))),
            lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=10), adamw_cost(n), quick))
        del ps, states
        torch.cuda.empty_cache()

        fused = torch.optim.AdamW(params(), lr=1e-4, fused=device == "cuda")
        rows.append(measure("AdamW step", size, "torch fused AdamW (fp32 states)", fused.step,
                            adamw_cost(n, state_bytes=4), quick))
        del fused
        torch.cuda.empty_cache()
    return rows


# ---- report -----------------------------------------------------------------------------------------------------

def attach_baselines(rows):
    eager = {(r.kernel, r.size): r.ms for r in rows if r.impl == "eager"}
    for r in rows:
        r.baseline_ms = eager.get((r.kernel, r.size))
    return rows


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(rows, ceil) -> str:
    head = ["kernel", "size", "impl", "median ms", "GB", "GFLOP", "GB/s", "TFLOP/s", "% copy BW", "% bf16 MMA",
            "vs eager", "peak extra MiB", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * 9 + "---|"]
    for r in rows:
        gbps, tf = r.gbps(), r.tflops()
        speedup = r.baseline_ms / r.ms if (r.baseline_ms and r.ms) else None
        cells = [r.kernel, r.size, r.impl, _fmt(r.ms, ".3f"), f"{r.nbytes / 1e9:.2f}",
                 f"{r.flops / 1e9:.1f}" if r.flops else "-", _fmt(gbps, ".0f"), _fmt(tf, ".1f"),
                 _fmt(None if gbps is None else 100 * gbps / ceil["copy_gbps"], ".0f"),
                 _fmt(None if tf is None else 100 * tf / ceil["mm_tflops"], ".0f"),
                 _fmt(speedup, ".2f") + ("x" if speedup else ""),
                 _fmt(None if r.peak_extra is None else r.peak_extra / 2**20, ".1f"), r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(rows, ceil, device_name, versions) -> str:
    date = datetime.date.today().isoformat()
    return "\n".join([
        f"Device: {device_name}; {versions}; date {date}.",
        f"Ceilings measured in this run: device-to-device copy {ceil['copy_gbps']:.0f} GB/s "
        f"({ceil['copy_bytes'] / 2**30:.0f} GiB read + written), bf16 matmul {ceil['mm_tflops']:.0f} TFLOP/s "
        f"({ceil['mm_n']}^3).",
        "Times: median over repeats, CUDA events around each call, after warm-up. GB and GFLOP: the minimum the "
        "operation needs (same for every implementation; the fused backward's logit recomputation is not counted).",
        "",
        table(attach_baselines(rows), ceil),
    ])


def run(only=("contrastive", "momentum", "adamw"), quick=False) -> str:
    """Measure and return the markdown report (needs CUDA)."""
    import triton

    ceil = ceilings(quick)
    rows = []
    if "contrastive" in only:
        rows += contrastive_rows(quick)
    if "momentum" in only:
        rows += momentum_rows(quick)
    if "adamw" in only:
        rows += adamw_rows(quick)
    versions = f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}"
    return report(rows, ceil, torch.cuda.get_device_name(), versions)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="contrastive,momentum,adamw", help="comma-separated subset")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and a smaller copy ceiling (smoke test)")
    ap.add_argument("--markdown", help="also write the report to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("brivl_ds.bench.kernels: no CUDA device. The benchmark times GPU kernels; nothing is measured on CPU.",
              file=sys.stderr)
        return 2
    text = run(tuple(args.only.split(",")), args.quick)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
