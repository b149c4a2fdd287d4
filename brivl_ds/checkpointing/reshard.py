"""Resume a ZeRO-3 checkpoint on another number of data-parallel or tensor-parallel ranks.

DeepSpeed's own load is rigid (each rank reads the files of its own rank number), and its universal checkpoint
reshards only the trainable parameters' fp32 copies and Adam moments. Here every part is resharded, one parameter
at a time, straight from the files the old ranks wrote (memory-mapped: a rank reads only the slices it needs):

  * trainable parameters: fp32 master and both Adam moments (any dtype: adamw_half keeps them in bf16), written
    into this rank's ZeRO-3 partitions; the low-precision partitions are refreshed from the fp32 master;
  * frozen parameters (the momentum encoders, frozen layers): their ZeRO-3 fragments;
  * the fp32 EMA copies of low-precision runs, the key queues, buffers, the LR schedule, step counters, the
    optimizer's hyper-parameters; the data position is re-dealt by the stream (brivl_ds/data/epoch_layout.py).

Under ZeRO-3 a parameter of n elements is cut into world pieces of ceil(n / world) (the last one padded) and each
rank's flat partition concatenates its pieces in parameter order, over all its sub-groups (param_shapes order). A
TP-split parameter is first put back whole from the old TP ranks, then cut for this rank's TP position
(checkpointing/consolidate.py's per-parameter merge and split).

A checkpoint converted by DeepSpeed's `ds_to_universal` can be read too (`UniversalSource`): that is the
independent reference the tests compare the direct path with.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from brivl_ds.checkpointing.files import checkpoint_world, dp_rank_files
from brivl_ds.checkpointing.state import saved_config, saved_momentum_masters

def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


class ZeroShards:
    """One old TP rank's files of a ZeRO-3 checkpoint (any DP size): whole tensors per parameter, read lazily."""

    def __init__(self, folder: Path, mp_rank: int = 0, with_optimizer: bool = True):
        self.models = [_load(f) for f in dp_rank_files(folder, "model", mp_rank)]
        self.dp = len(self.models)
        self.shapes = {k: v for group in self.models[0]["param_shapes"] for k, v in group.items()}
        self.optims = [_load(f)["optimizer_state_dict"] for f in dp_rank_files(folder, "optim", mp_rank)] \
            if with_optimizer else []
        # where each parameter's piece starts in a rank's flat partition (the same on every rank)
        self.offsets, offset = {}, 0
        for name, shape in self.shapes.items():
            self.offsets[name] = offset
            offset += math.ceil(shape.numel() / self.dp)

    def _flat(self, rank: int, key: str) -> list[torch.Tensor]:
        state = self.optims[rank]
        if key == "fp32":
            return state["fp32_flat_groups"]
        return [state["optimizer_state_dict"]["state"][g][key] for g in range(len(state["fp32_flat_groups"]))]

    def trainable(self, name: str, key: str) -> torch.Tensor:
        """fp32 master ('fp32') or an optimizer state ('exp_avg', 'exp_avg_sq') of a trainable parameter, whole."""
        shape = self.shapes[name]
        piece, start = math.ceil(shape.numel() / self.dp), self.offsets[name]
        parts = []
        for rank in range(self.dp):
            groups = self._flat(rank, key)
            base = 0
            for group in groups:  # the piece lies inside one sub-group's flat tensor
                if start < base + group.numel():
                    parts.append(group[start - base:start - base + piece])
                    break
                base += group.numel()
        return torch.cat(parts)[:shape.numel()].view(shape)

    def frozen(self, name: str) -> torch.Tensor:
        shape = self.models[0]["frozen_param_shapes"][name]
        return torch.cat([m["frozen_param_fragments"][name].reshape(-1) for m in self.models])[:shape.numel()] \
            .view(shape)

    def frozen_names(self) -> list[str]:
        return list((self.models[0].get("frozen_param_shapes") or {}).keys())


class UniversalSource:
    """DeepSpeed's universal checkpoint (`python -m deepspeed.checkpoint.ds_to_universal`) of a TP=1 checkpoint:
    trainable tensors from its per-parameter files, frozen ones merged by DeepSpeed's zero_to_fp32."""

    def __init__(self, folder: Path):
        from deepspeed.utils import zero_to_fp32

        self.folder = Path(folder)
        files = dp_rank_files(folder, "model", 0)
        self.models = [_load(f) for f in files]
        self._whole: dict[str, torch.Tensor] = {}
        states = zero_to_fp32.parse_model_states([str(f) for f in files])
        zero_to_fp32._zero3_merge_frozen_params(self._whole, len(states), states)

    def trainable(self, name: str, key: str) -> torch.Tensor:
        return torch.load(self.folder / "zero" / name / f"{key}.pt", map_location="cpu", weights_only=False)

    def frozen(self, name: str) -> torch.Tensor:
        return self._whole[name]

    def frozen_names(self) -> list[str]:
        return list((self.models[0].get("frozen_param_shapes") or {}).keys())

    def optimizer_globals(self) -> dict:
        return torch.load(self.folder / "zero" / "optimizer_state.pt", weights_only=False)["optimizer_state_dict"]


def _optimizer_state(base: torch.optim.Optimizer, flat: torch.Tensor) -> dict:
    """The state of one flat fp32 partition; a fresh engine has none until its first step, so make it here with
    the optimizer's own dtypes (AdamWHalfStates: bf16 moments and a rounding stream; torch AdamW: fp32)."""
    state = base.state[flat]
    if not state:
        if hasattr(base, "_init_state"):
            return base._init_state(flat)
        state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
    return state


def _piece(full: torch.Tensor, numel: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s ZeRO-3 piece of `numel` elements of a whole tensor (zero padded at the end)."""
    flat = full.reshape(-1)[rank * numel:(rank + 1) * numel]
    return torch.cat([flat, flat.new_zeros(numel - flat.numel())]) if flat.numel() < numel else flat


class Resharder:
    """Loads a checkpoint written on other ranks into a freshly built engine; returns every old rank's client
    state (position, queue slices, EMA copies, RNG) for the trainer."""

    def __init__(self, engine, groups, whole_model_meta=None, vocab_parallel: bool = False):
        self.engine, self.groups = engine, groups
        self.whole_model_meta, self.vocab_parallel = whole_model_meta, vocab_parallel

    def sources(self, folder: Path) -> tuple[list, int, int]:
        folder = Path(folder)
        if (folder / "zero").is_dir():  # a DeepSpeed universal checkpoint
            return [UniversalSource(folder)], len(dp_rank_files(folder, "model", 0)), 1
        dp, tp = checkpoint_world(folder)
        return [ZeroShards(folder, m) for m in range(tp)], dp, tp

    def load(self, folder: Path) -> list[dict]:
        sources, old_dp, old_tp = self.sources(folder)
        tp, tp_rank = self.groups.tp, self.groups.tp_rank
        # the embedding's split is a setting of each run: merge by the old one, cut by ours
        old_vocab_parallel = saved_config(sources[0].models[0])["parallel"]["vocab_parallel"]
        same_split = old_tp == tp and (tp == 1 or old_vocab_parallel == self.vocab_parallel)
        if not same_split:
            from brivl_ds.checkpointing.consolidate import merge_param, split_param, tp_layout

            old_layout = tp_layout(self.whole_model_meta, vocab_parallel=old_vocab_parallel)
            new_layout = tp_layout(self.whole_model_meta, vocab_parallel=self.vocab_parallel)

        def whole(read, name: str) -> torch.Tensor:
            """This TP rank's shard of parameter `name`, whole over DP (read(source, name) reads one TP shard)."""
            if same_split:
                return read(sources[tp_rank], name)
            full = merge_param(old_layout.get(name), [read(s, name) for s in sources])
            return split_param(new_layout.get(name), full, tp, tp_rank)

        optimizer = self.engine.optimizer
        dp_rank = dist.get_rank(optimizer.dp_process_group) if dist.is_initialized() else 0
        names = {p: n for n, p in self.engine.module.named_parameters()}
        with torch.no_grad():
            for group_id, params in enumerate(optimizer.fp16_groups):
                flat = optimizer.fp32_partitioned_groups_flat[group_id]
                state = _optimizer_state(optimizer.optimizer, flat)
                targets = {"fp32": flat.data, "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
                offset = 0
                for param in params:
                    n = param.partition_numel()
                    for key, target in targets.items():
                        value = whole(lambda s, nm: s.trainable(nm, key), names[param])
                        target.narrow(0, offset, n).copy_(_piece(value, n, dp_rank))
                    offset += n
            self._optimizer_globals(sources[0])
            # the low-precision partitions the forward gathers, from the fp32 master (as DeepSpeed's own loads do)
            for group_id in range(len(optimizer.fp16_groups)):
                optimizer.fp16_partitioned_groups_flat[group_id].data.copy_(
                    optimizer.fp32_partitioned_groups_flat[group_id].data)
            frozen = set(sources[0].frozen_names())
            for name, param in self.engine.module.named_parameters():
                if not param.requires_grad:
                    if name not in frozen:
                        raise KeyError(f"checkpoint {folder} has no frozen parameter {name}")
                    n = param.ds_tensor.numel()
                    param.ds_tensor.data.copy_(_piece(whole(lambda s, nm: s.frozen(nm), name), n, dp_rank))
            self._buffers(sources[0].models[0])
            self._regather_persistent()
        model_state = sources[0].models[0]
        self.engine.lr_scheduler.load_state_dict(model_state["lr_scheduler"])
        for key in ("global_steps", "global_samples", "skipped_steps"):
            setattr(self.engine, key, model_state[key])
        self._whole = whole
        self._sources = sources
        return [m for source in sources for m in source.models]

    def own_client_state(self) -> dict:
        """The client state of the old rank at this rank's (data-parallel, tensor-parallel) position, or of the
        nearest one when the old world was smaller (its RNG states seed this rank's)."""
        source = self._sources[min(self.groups.tp_rank, len(self._sources) - 1)]
        return source.models[min(self.groups.dp_rank, len(source.models) - 1)]

    def momentum_masters(self, momentum_names: list[str]) -> list[torch.Tensor]:
        """This rank's pieces of the fp32 EMA copies (MomentumUpdater's order), from every old rank's pieces."""
        dp_rank = dist.get_rank(self.engine.optimizer.dp_process_group) if dist.is_initialized() else 0
        params = dict(self.engine.module.named_parameters())
        out = []
        for i, name in enumerate(momentum_names):
            def read(source, nm, i=i):
                shape = source.models[0]["frozen_param_shapes"][nm]
                pieces = [saved_momentum_masters(m)[i].reshape(-1) for m in source.models]
                return torch.cat(pieces)[:shape.numel()].view(shape)
            out.append(_piece(self._whole(read, name), params[name].ds_tensor.numel(), dp_rank).clone())
        return out

    def _optimizer_globals(self, source) -> None:
        """Step counts and hyper-parameters (lr, betas...) of the optimizer's groups."""
        optimizer = self.engine.optimizer
        saved = source.optimizer_globals() if isinstance(source, UniversalSource) else \
            source.optims[0]["optimizer_state_dict"]
        step = saved["state"][0]["step"]
        for group_id, flat in enumerate(optimizer.fp32_partitioned_groups_flat):
            optimizer.optimizer.state[flat]["step"] = step.clone() if torch.is_tensor(step) else step
        for group, saved_group in zip(optimizer.optimizer.param_groups, saved["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})

    def _buffers(self, model_state: dict) -> None:
        buffers = dict(self.engine.module.named_buffers())
        for name in model_state.get("buffer_names", []):
            buffers[name].copy_(model_state["module"][name])

    def _regather_persistent(self) -> None:
        """ZeRO-3 keeps small parameters gathered between steps: rebuild them from the partitions just written."""
        persistent = [p for p in self.engine.module.parameters() if getattr(p, "ds_persist", False)]
        if persistent:
            persistent[0].partition(persistent)
            persistent[0].all_gather(persistent)


