"""Pretrained files read into a model built under zero.Init: one tensor at a time from the file, into one gathered
module at a time, after the zero.Init context (inside it DeepSpeed's patched tensor constructors would create the
tensors read from a file in the run's precision)."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from brivl_ds.construction.zero_init import under_zero_init
from brivl_ds.parallel.zero import gathered


class TensorFile:
    """Lazy read access to a checkpoint's tensors (safetensors, sharded safetensors, or a torch file memory-mapped),
    so loading a large model reads one tensor at a time instead of the whole file."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self._files: dict[str, object] = {}
        self._where: dict[str, str] = {}
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            if index.exists():
                for key, shard in json.loads(index.read_text())["weight_map"].items():
                    self._where[key] = str(path / shard)
            elif (path / "model.safetensors").exists():
                self._open_safetensors(path / "model.safetensors")
            elif (path / "pytorch_model.bin").exists():
                self._open_torch(path / "pytorch_model.bin")
            else:
                raise FileNotFoundError(f"no model.safetensors(.index.json) or pytorch_model.bin in {path}")
        elif path.suffix == ".safetensors":
            self._open_safetensors(path)
        else:
            self._open_torch(path)

    def _open_safetensors(self, path: Path) -> None:
        from safetensors import safe_open

        handle = safe_open(str(path), framework="pt")
        self._files[str(path)] = handle
        self._where.update({k: str(path) for k in handle.keys()})

    def _open_torch(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "module"):  # trainer wrappers (timm's load_state_dict does the same)
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        self._files[str(path)] = state
        self._where.update({k: str(path) for k in state})

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, key: str) -> torch.Tensor:
        where = self._where[key]
        if where not in self._files:
            self._open_safetensors(Path(where))
        handle = self._files[where]
        return handle[key] if isinstance(handle, dict) else handle.get_tensor(key)


def _key_map(source_keys: Iterable[str], strip_prefixes: tuple[str, ...]) -> dict[str, str]:
    """Our name -> the file's name: wrapper prefixes ('module.', 'bert.') dropped, legacy LayerNorm gamma/beta."""
    mapping = {}
    for key in source_keys:
        name = key
        for prefix in strip_prefixes:
            if name.startswith(prefix):
                name = name[len(prefix):]
        if name.endswith(".gamma"):
            name = name[:-len(".gamma")] + ".weight"
        elif name.endswith(".beta"):
            name = name[:-len(".beta")] + ".bias"
        mapping.setdefault(name, key)
    return mapping


def load_pretrained_towers(model: nn.Module, cfg) -> None:
    """Fill a BriVL built under zero.Init from its pretrained files (model.text / model.image.pretrained_path),
    one module at a time. Called after the zero.Init context: inside it, DeepSpeed's patched tensor constructors
    would create the tensors read from a file in the run's precision."""
    if under_zero_init():
        raise RuntimeError("load_pretrained_towers must run after the zero.Init context")
    unused = {}
    if cfg.text.pretrained_path:
        encoder = model.text.encoder
        unused[cfg.text.pretrained_path] = load_pretrained(encoder, cfg.text.pretrained_path,
                                                           strip_prefixes=(f"{encoder.base_model_prefix}.",))
    if cfg.image.pretrained_path:  # the file's classifier is left unused, as timm does
        unused[cfg.image.pretrained_path] = load_pretrained(model.image.backbone, cfg.image.pretrained_path)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        for path, keys in unused.items():
            if keys:
                print(f"{path}: {len(keys)} tensors not used by the model, e.g. {keys[:3]}", flush=True)


@torch.no_grad()
def load_pretrained(module: nn.Module, path: str | Path, strip_prefixes: tuple[str, ...] = ("module.",),
                    optional: Callable[[str], bool] = lambda name: False) -> list[str]:
    """Copy a checkpoint into `module` one submodule at a time: each module's own parameters gathered (rank 0's
    copy kept and broadcast), buffers written on every rank. Every parameter and floating buffer must be found
    unless `optional(name)`; returns the checkpoint's keys that were not used (e.g. a classifier)."""
    source = TensorFile(path)
    mapping = _key_map(source.keys(), strip_prefixes)
    used, missing = set(), []
    for prefix, sub in module.named_modules():
        own = list(sub.named_parameters(recurse=False)) + [(n, b) for n, b in sub.named_buffers(recurse=False)
                                                           if b is not None]
        if not own:
            continue
        with gathered(sub.parameters(recurse=False)):
            for name, tensor in own:
                full = f"{prefix}.{name}" if prefix else name
                if full not in mapping:
                    if not optional(full) and (tensor.is_floating_point() or isinstance(tensor, nn.Parameter)):
                        missing.append(full)
                    continue
                value = source.get(mapping[full])
                if value.shape != tensor.shape:
                    raise ValueError(f"{path}: {mapping[full]} has shape {tuple(value.shape)}, the model's {full} "
                                     f"{tuple(tensor.shape)}")
                tensor.copy_(value)
                used.add(mapping[full])
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} of the model's tensors, e.g. {missing[:5]}")
    return sorted(set(source.keys()) - used)
