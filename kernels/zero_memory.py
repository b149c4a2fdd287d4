"""Bytes per parameter that DeepSpeed ZeRO-3 keeps for training, by precision recipe, counted from the tensors.

Builds a ZeRO-3 engine (one process, gloo, CPU is fine) per recipe, takes two optimizer steps so that all state
exists, and sums the bytes of the distinct storages behind: the parameter partitions, the master weights, the
gradient partitions and the optimizer state. With one rank a partition is the whole model, so bytes / parameters is
the per-parameter cost; with N ranks every term divides by N. Transient buffers (the flattened gradient of the
sub-group being stepped, communication buckets) are not counted.

    python -m brivl_kernels.zero_memory          # prints a markdown table
"""
from __future__ import annotations

import os
import socket
import sys

import torch

RECIPES = {
    # name: (ds_config additions, optimizer factory or None for DeepSpeed's own optimizer from the config)
    "fp32 weights, torch AdamW (fp32 states)": ({}, "torch"),
    "fp32 weights, AdamWHalfStates": ({}, "half"),
    "bf16 weights + fp32 master, torch AdamW (fp32 states)": ({"bf16": {"enabled": True}}, "torch"),
    "bf16 weights + fp32 master, AdamWHalfStates": ({"bf16": {"enabled": True}}, "half"),
    "bf16 weights, DeepSpeed bf16_master_weights_and_grads + bf16_optimizer_states": (
        {"bf16": {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True},
         "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True}}}, None),
}


def init_single_process(env=None):
    """Environment and process group for a one-rank gloo DeepSpeed run (idempotent)."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_PORT=str(port))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", DS_ACCELERATOR="cpu",
                     TORCH_EXTENSIONS_DIR=os.path.expanduser("~/.cache/brivl_ds/torch_extensions")).items():
        os.environ.setdefault(k, v)
    deepspeed.init_distributed(dist_backend="gloo")


def _storage_bytes(tensors, seen):
    total = 0
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.numel() == 0:
            continue
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def measure(recipe: str, width: int = 512, layers: int = 4) -> dict:
    """Bytes per parameter for one recipe on an MLP of `layers` width x width linear layers."""
    import deepspeed

    from .adamw_half import AdamWHalfStates

    init_single_process()
    extra, opt_kind = RECIPES[recipe]
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    n_params = sum(p.numel() for p in model.parameters())
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
           "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
           **extra}
    opt = None
    if opt_kind == "torch":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    elif opt_kind == "half":
        opt = AdamWHalfStates(model.parameters(), lr=1e-3, impl="reference")
    engine, zero_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    dtype = torch.bfloat16 if extra.get("bf16", {}).get("enabled") else torch.float32
    for _ in range(2):
        x = torch.randn(4, width, dtype=dtype)
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
    seen = set()
    out = {}
    out["weights (partitions)"] = _storage_bytes(
        list(zero_opt.fp16_partitioned_groups_flat) + [p.ds_tensor for p in model.parameters()], seen)
    out["master weights"] = _storage_bytes(zero_opt.fp32_partitioned_groups_flat, seen)
    out["gradients"] = _storage_bytes([zero_opt.grad_partitions_flat_buffer], seen)
    inner = zero_opt.optimizer
    out["optimizer states"] = _storage_bytes(
        [v for st in inner.state.values() for v in st.values() if torch.is_tensor(v) and v.numel() > 1], seen)
    per = {k: v / n_params for k, v in out.items()}
    per["total"] = sum(per.values())
    per["n_params"] = n_params
    state_dtypes = sorted({str(v.dtype).replace("torch.", "") for st in inner.state.values() for v in st.values()
                           if torch.is_tensor(v) and v.numel() > 1})
    per["state dtypes"] = ",".join(state_dtypes)
    per["optimizer"] = type(inner).__name__
    engine.destroy() if hasattr(engine, "destroy") else None
    return per


def markdown(rows: dict) -> str:
    cols = ["weights (partitions)", "master weights", "gradients", "optimizer states", "total"]
    lines = ["| recipe | optimizer (state dtype) | " + " | ".join(cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['optimizer']} ({r['state dtypes']}) | "
                     + " | ".join(f"{r[c]:.2f}" for c in cols) + " |")
    return "\n".join(lines)


def main() -> int:
    rows = {name: measure(name) for name in RECIPES}
    n = next(iter(rows.values()))["n_params"]
    print(f"Bytes per parameter under ZeRO-3, one rank, {n:,} parameters (divide every column by the "
          "data-parallel world size for N ranks):\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
