"""README: "The EMA runs on each rank's own shards ... with no communication for partitioned parameters (only the
small parameters ZeRO-3 keeps gathered, below `stage3_param_persistence_threshold`, are re-gathered afterwards)".

Every collective a rank issues during the EMA of a real ZeRO-3 training step (2 gloo ranks, the real Trainer) is
counted at three layers: the methods of torch's ProcessGroup (every torch.distributed collective ends in one of
them, including those DeepSpeed calls through function references it captured at start-up), the
torch.distributed functions, and deepspeed.comm's. The same counters must see the forward's all-gathers, else
they prove nothing.
"""
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import run_distributed
from test_zero3 import make_config, write_atomically

WORLD = 2
# every collective entry point of each layer (the names the installed versions have are wrapped)
PROCESS_GROUP = ("allreduce", "allreduce_coalesced", "allgather", "_allgather_base", "allgather_coalesced",
                 "allgather_into_tensor_coalesced", "all_gather_single", "all_gather_single_coalesced", "broadcast",
                 "reduce", "reduce_scatter", "_reduce_scatter_base", "reduce_scatter_single",
                 "reduce_scatter_single_coalesced", "reduce_scatter_tensor_coalesced", "alltoall", "alltoall_base",
                 "all_to_all_single", "gather", "scatter", "barrier", "monitored_barrier", "send", "recv",
                 "recv_anysource")
GATHERS = ("allgather", "_allgather_base", "all_gather_single", "allgather_into_tensor_coalesced",
           "all_gather_single_coalesced")
TORCH_DIST = ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "_all_gather_base",
              "all_gather_coalesced", "all_gather_object", "reduce_scatter", "reduce_scatter_tensor",
              "_reduce_scatter_base", "broadcast", "broadcast_object_list", "reduce", "all_to_all",
              "all_to_all_single", "gather", "scatter", "barrier", "monitored_barrier", "send", "recv", "isend",
              "irecv", "batch_isend_irecv")
DEEPSPEED_COMM = ("all_reduce", "inference_all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor",
                  "allgather_fn", "all_gather_coalesced", "all_gather_object", "reduce_scatter", "reduce_scatter_fn",
                  "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "reduce", "all_to_all",
                  "all_to_all_single", "gather", "scatter", "barrier", "monitored_barrier", "send", "recv", "isend",
                  "irecv", "batch_isend_irecv")


class Collectives:
    """Records (phase, layer, name, input tensors' data pointers) of every collective while `phase` is set."""

    def __init__(self):
        self.phase, self.events = None, []

    def _wrap(self, owner, layer: str, name: str) -> None:
        original = getattr(owner, name, None)
        if original is None or getattr(original, "_counted", False):
            return

        def counted(*args, **kwargs):
            if self.phase is not None:
                if layer == "process_group":  # (self, output(s), input(s), ...): the inputs are the shards sent
                    inputs = args[2] if len(args) > 2 else None
                    inputs = inputs if isinstance(inputs, (list, tuple)) else [inputs]
                    pointers = [t.data_ptr() for t in inputs if isinstance(t, torch.Tensor)]
                else:
                    pointers = []
                self.events.append((self.phase, layer, name, pointers))
            return original(*args, **kwargs)

        counted._counted = True
        setattr(owner, name, counted)

    def install(self) -> None:
        import deepspeed.comm
        import deepspeed.comm.comm
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for name in PROCESS_GROUP:
            self._wrap(dist.ProcessGroup, "process_group", name)
        for module in (dist, c10d):
            for name in TORCH_DIST:
                self._wrap(module, "torch.distributed", name)
        for module in (deepspeed.comm, deepspeed.comm.comm):
            for name in DEEPSPEED_COMM:
                self._wrap(module, "deepspeed.comm", name)

    def during(self, phase: str, fn):
        def labelled(*args, **kwargs):
            self.phase = phase
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase = None
        return labelled

    def count(self, phase: str, layer: str | None = None) -> Counter:
        return Counter(name for p, lay, name, _ in self.events if p == phase and layer in (None, lay))


def _worker(rank, world, data, out_dir, threshold, recipe):
    from torch.utils.data import DataLoader

    from brivl_ds.training.trainer import Trainer

    cfg = make_config(data, out_dir)
    ds = json.loads(Path(cfg.train.ds_config).read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
    if recipe == "bf16_adamw_half":  # the presets' recipe: bf16 weights and shards, fp32 master, bf16 moments
        ds["bf16"] = {"enabled": True}
        cfg.optim.name = "adamw_half"
    path = Path(out_dir) / f"ds_{threshold}_{recipe}.json"
    write_atomically(path, ds)
    cfg.train.ds_config = str(path)
    trainer = Trainer(cfg)
    trainer.engine.train()
    ema = trainer.momentum
    assert (ema.lowp is not None) == (recipe == "bf16_adamw_half")
    persistent = ema.persistent
    assert len(persistent) == sum(bool(getattr(m, "ds_persist", False)) for _, m in ema.pairs)
    assert (len(persistent) > 0) == (threshold > 0) and len(persistent) < len(ema.pairs)  # partitioned ones too

    counter = Collectives()
    counter.install()
    trainer.engine.forward = counter.during("forward", trainer.engine.forward)
    ema.update = counter.during("ema", ema.update)
    trainer.stream.start_epoch(0, num_workers=0)
    for step, (batch, meta) in zip(range(2), DataLoader(trainer.stream, batch_size=None)):
        before = [t.clone() for t in ema.master]
        assert trainer.train_step(batch, meta["content_ids"])["applied"]
        assert any(not torch.equal(a, b) for a, b in zip(before, ema.master))  # the EMA ran and moved the shards

    # The counters see DeepSpeed's collectives: the forward gathers the partitioned parameters.
    forward = {layer: counter.count("forward", layer) for layer in ("process_group", "torch.distributed",
                                                                    "deepspeed.comm")}
    assert sum(forward["process_group"][name] for name in GATHERS) > 0, forward
    assert sum(forward["deepspeed.comm"].values()) > 0, forward

    # The EMA: nothing for partitioned parameters; one all-gather per persistent parameter per step, of exactly
    # their shards (the inputs sent are the momentum parameters' own ds_tensor storage).
    ema_events = [e for e in counter.events if e[0] == "ema"]
    seen = dict(Counter(f"{layer}.{name}" for _, layer, name, _ in ema_events))
    issued = [e for e in ema_events if e[1] == "process_group"]
    assert all(name in GATHERS for _, _, name, _ in issued), seen
    assert len(issued) == 2 * len(persistent), (f"{len(persistent)} persistent parameters", seen)
    sent = Counter(p for *_, pointers in issued for p in pointers)
    assert sent == Counter({m.ds_tensor.data_ptr(): 2 for m in persistent}), "not the persistent shards"
    if not persistent:
        assert ema_events == [], seen  # none at any layer
    if rank == 0:
        Path(out_dir, "counts.json").write_text(json.dumps(
            {"forward": {k: dict(v) for k, v in forward.items()}, "ema": seen, "persistent": len(persistent),
             "pairs": len(ema.pairs)}))


@pytest.mark.slow
@pytest.mark.parametrize("threshold, recipe", [(0, "fp32"), (100, "bf16_adamw_half")])
def test_ema_issues_no_collective_for_partitioned_parameters(threshold, recipe, shapes_data, tmp_path):
    """threshold 0: every parameter partitioned, not one collective during the EMA; threshold 100: the EMA's only
    collectives are the re-gathers of the persistent momentum parameters, one each, of their own shards."""
    run_distributed(_worker, WORLD, shapes_data, str(tmp_path), threshold, recipe)
    print(Path(tmp_path, "counts.json").read_text())
