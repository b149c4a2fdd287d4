"""Compile the kernels for a GPU that is not here: Triton's ahead-of-time path plus the ptxas bundled with Triton.

No GPU is needed, so CI can prove that every launch configuration the heuristics pick compiles for Hopper
(sm_90a) and does not spill registers, and shows which MMA instructions it uses and how much shared memory it
needs. This is a static check, not a measurement of speed.

    python -m brivl_kernels.aot_check            # the default configurations, sm_90a
    python -m brivl_kernels.aot_check --arch 80  # A100

Must run without TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import adamw_half, contrastive, momentum


def compile_report(kernel, signature: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int = 90,
                   div16=None):
    """Compile `kernel` for sm_<arch>; return registers, spill bytes, shared memory and the MMA flavour.

    Like the JIT, assume pointers 16-byte aligned and the integer arguments named in `div16` (default: all of
    them; true at the benchmark sizes) divisible by 16: that is what enables vector loads and cp.async pipelining.
    """
    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        raise RuntimeError("kernels were defined under TRITON_INTERPRET=1; run without it")
    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    names = kernel.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
             if t.startswith("*") or (t[0] in "iu" and (div16 is None or n in div16))}
    compiled = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = compiled.asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        out = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    info = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    mma = "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "none")
    vec = "v4" if re.search(r"ld\.global(\.\w+)*\.v4", ptx) else ("v2" if re.search(r"ld\.global(\.\w+)*\.v2", ptx) else "v1")
    return dict(regs=regs, spill_stores=int(spill.group(1)) if spill else 0,
                spill_loads=int(spill.group(2)) if spill else 0, shared=compiled.metadata.shared, mma=mma,
                widest_load=vec)


def contrastive_cases(dtype="bf16", sizes=((16, 2560), (256, 2560), (128, 1024))):
    """(name, kernel, signature, constexprs, warps, stages) for the heuristic configs at the benchmark sizes."""
    t = f"*{dtype}"
    fwd_sig = dict(q_ptr=t, k_ptr=t, queue_ptr=t, mask_ptr="*u8", qid_ptr="*i64", kid_ptr="*i64",
                   tau_ptr="*fp32", part_m_ptr="*fp32", part_l_ptr="*fp32", part_t_ptr="*fp32", pos_ptr="*fp32",
                   B="i32", K="i32", D="i32", stride_q="i32", stride_k="i32", stride_queue="i32",
                   tiles_per_split="i32")
    bwd_sig = dict(q_ptr=t, queue_ptr=t, mask_ptr="*u8", qid_ptr="*i64", kid_ptr="*i64",
                   tau_ptr="*fp32", lse_ptr="*fp32", dq_acc_ptr="*fp32",
                   B="i32", K="i32", D="i32", stride_q="i32", stride_queue="i32", tiles_per_split="i32",
                   n_dchunks="i32")
    prec = "tf32x3" if dtype == "fp32" else "ieee"
    cases = []
    wide = dtype == "fp32"
    for B, D in sizes:
        f = contrastive.default_fwd_config(B, D, wide)
        cases.append((f"contrastive fwd {dtype} B={B} D={D}", contrastive._fwd_kernel, fwd_sig,
                      dict(HAS_MASK=True, HAS_IDS=False, ID_COLS=1, UPCAST=False, PRECISION=prec, BLOCK_B=f.block_b,
                           BLOCK_K=f.block_k, BLOCK_D=f.block_d), f.num_warps, f.num_stages))
        b = contrastive.default_bwd_config(B, D, wide)
        cases.append((f"contrastive bwd {dtype} B={B} D={D}", contrastive._bwd_kernel, bwd_sig,
                      dict(HAS_MASK=True, HAS_IDS=False, ID_COLS=1, UPCAST=False, PRECISION=prec, BLOCK_B=b.block_b,
                           BLOCK_K=b.block_k, BLOCK_D=b.block_d, BLOCK_DC=b.block_dc), b.num_warps, b.num_stages))
    # The trainer's false-negative masking: two id columns (image hash, caption hash), at the paper's size.
    for name, kernel, sig, consts, warps, stages in cases[:2]:
        cases.append((name + " + ids", kernel, sig, {**consts, "HAS_IDS": True, "ID_COLS": 2}, warps, stages))
    comb_sig = dict(part_m_ptr="*fp32", part_l_ptr="*fp32", part_t_ptr="*fp32", pos_ptr="*fp32", tau_ptr="*fp32",
                    lse_ptr="*fp32", loss_ptr="*fp32", dtau_unit_ptr="*fp32", B="i32", S="i32")
    cases.append(("contrastive combine", contrastive._combine_kernel, comb_sig, dict(BLOCK_B=128, BLOCK_S=32), 4, 3))
    fin_sig = dict(dq_acc_ptr="*fp32", k_ptr=t, pos_ptr="*fp32", lse_ptr="*fp32", tau_ptr="*fp32", g_ptr="*fp32",
                   dq_ptr=t, B="i32", D="i32", stride_k="i32", stride_dq="i32")
    cases.append(("contrastive finalize dq", contrastive._finalize_kernel, fin_sig,
                  dict(OUT_BF16=dtype == "bf16", BLOCK_B=16, BLOCK_D=256), 4, 3))
    return cases


def all_cases():
    cases = contrastive_cases("bf16")
    cases += contrastive_cases("fp32", sizes=((16, 2560), (256, 2560)))[:4]
    cases += momentum.aot_cases()
    cases += adamw_half.aot_cases()
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    bad = 0
    print(f"Compiled for sm_{args.arch}{'a' if args.arch >= 90 else ''} (Triton {triton.__version__}, bundled ptxas)\n")
    print("| kernel and launch config | registers | spill bytes | shared KiB | MMA | widest global load |")
    print("|---|---:|---:|---:|---|---|")
    for name, kernel, sig, consts, warps, stages in all_cases():
        r = compile_report(kernel, sig, consts, warps, stages, args.arch)
        spill = r["spill_stores"] + r["spill_loads"]
        bad += spill > 0 or r["shared"] > (227 if args.arch >= 90 else 163) * 1024  # per-block shared memory cap
        print(f"| {name} | {r['regs']} | {spill} | {r['shared'] / 1024:.1f} | {r['mma']} | {r['widest_load']} |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
