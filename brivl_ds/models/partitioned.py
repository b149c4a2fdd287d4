"""Initialisation and pretrained loading that survive ZeRO-3's partitioned construction (deepspeed.zero.Init).

zero.Init partitions each module's parameters right after that module's own __init__. Whatever a parent writes into
its children afterwards lands in empty tensors and is silently lost (or crashes): timm initialises a whole model by
hand-written recursion at the end of its __init__, Hugging Face in `post_init`. Here both are deferred and replayed
module by module, each module's parameters gathered only while its own init runs (`gathered`), in the order the
library itself visits them, so a partitioned build draws the same random numbers in the same order as a plain one.

Outside zero.Init every helper here is a no-op wrapper, so plain builds (tests, evaluation) run the same code.
"""
from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def any_partitioned(module: nn.Module) -> bool:
    return any(is_partitioned(p) for p in module.parameters())


@contextlib.contextmanager
def gathered(params: Iterable[nn.Parameter], modifier_rank: int | None = 0) -> Iterator[None]:
    """The full values of `params` inside the block; with `modifier_rank`, that rank's writes are kept (broadcast
    and re-partitioned on exit). Plain parameters pass through untouched."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def partitioned_construction(ds_config: dict, data_parallel_group=None):
    """Build modules inside this context and no rank ever holds a whole one: each module's parameters are
    partitioned over `data_parallel_group` (the world when None) right after its own __init__, in the ds_config's
    precision."""
    import deepspeed

    # mem_efficient_linear would replace F.linear process-wide with DeepSpeed's own autograd function
    return deepspeed.zero.Init(config_dict_or_path=ds_config, data_parallel_group=data_parallel_group,
                               mem_efficient_linear=False)


def under_zero_init() -> bool:
    """Whether a deepspeed.zero.Init context is active (modules built now will be partitioned)."""
    import sys

    state = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    return state is not None and state.zero_init_context > 0


def forked_rng():
    """A forked default generator (CPU, and the current GPU's: zero.Init builds on the GPU there)."""
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else [])


def keep_float_buffers_fp32(module: nn.Module) -> None:
    """zero.Init creates every floating tensor in the run's precision, buffers included; BatchNorm statistics are
    kept fp32, as a plain build has them, before anything is loaded. Other floating buffers enter the compute in
    the run's dtype (an EVA attention concatenates its zero k bias with its q / v bias parameters) and keep it."""
    for sub in module.modules():
        if not isinstance(sub, nn.modules.batchnorm._NormBase):
            continue
        for name, buffer in sub.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != torch.float32:
                sub._buffers[name] = buffer.float()


@torch.no_grad()
def copy_local_shards(source: nn.Module, target: nn.Module) -> None:
    """target <- source for two identically built (and identically partitioned) modules, each rank copying only its
    own partitions, and every buffer: no communication."""
    targets = dict(target.named_parameters())
    for name, p in source.named_parameters():
        local, dest = (p.ds_tensor, targets[name].ds_tensor) if is_partitioned(p) else (p.data, targets[name].data)
        dest.copy_(local)
    target_buffers = dict(target.named_buffers())
    for name, b in source.named_buffers():
        target_buffers[name].copy_(b)


def gathered_module_apply(fn: Callable[[nn.Module, str], None], modules: Iterable[tuple[str, nn.Module]],
                          deep: Callable[[nn.Module], bool] = lambda module: False) -> None:
    """fn(module, name) for each (name, module) in order, with only that module's own parameters gathered (all of
    its parameters where `deep(module)`: fn reaches into its children)."""
    for name, module in modules:
        with gathered(module.parameters(recurse=deep(module))):
            fn(module, name)


def post_order(module: nn.Module, name: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Children before their parent (timm's named_apply with depth_first=True, HF's smart_apply)."""
    for child_name, child in module.named_children():
        yield from post_order(child, f"{name}.{child_name}" if name else child_name)
    yield name, module


# ------------------------------------------------------------------------------------------------ Hugging Face
@contextlib.contextmanager
def deferred_hf_init() -> Iterator[None]:
    """Skip PreTrainedModel.init_weights in post_init (under zero.Init it would write into empty tensors, and
    index into them: the padding row); `replay_hf_init` runs it afterwards, per module."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.init_weights
    PreTrainedModel.init_weights = lambda self: None
    try:
        yield
    finally:
        PreTrainedModel.init_weights = original


@torch.no_grad()
def replay_hf_init(model: nn.Module) -> None:
    """PreTrainedModel.init_weights (initialize_weights + tie_weights), each module gathered in turn."""
    from transformers import initialization

    with initialization.guard_torch_init_functions():
        custom = model.is_custom_code()
        gathered_module_apply(lambda m, _: model._initialize_weights(m, custom), post_order(model))
    model.tie_weights(recompute_mapping=False)


# ------------------------------------------------------------------------------------------------------- timm
Phase = tuple[Callable[[nn.Module, str], None], list[tuple[str, nn.Module]], Callable[[nn.Module], bool]]


@contextlib.contextmanager
def deferred_timm_init() -> Iterator[None]:
    """Skip Eva.init_weights in Eva.__init__ (`replay_timm_init` runs it afterwards, per module). Under zero.Init
    it would go through DeepSpeed's wrapper of nn.Module.apply, which broadcasts from global rank 0 over each
    parameter's data-parallel group: with tensor parallelism that group may not hold rank 0, and it fails."""
    from timm.models import eva

    original = eva.Eva.init_weights
    eva.Eva.init_weights = lambda self, needs_reset=True: None
    try:
        yield
    finally:
        eva.Eva.init_weights = original


def _eva_init(model: nn.Module) -> list[Phase]:
    """Eva.init_weights, in its order: _init_weights over every module (nn.Module.apply: children first), then
    the root's position embedding and class / register tokens, then fix_init_weight (each block's output
    projections divided by sqrt(2 * depth))."""
    from timm.layers import trunc_normal_

    if getattr(model, "head_init_scale", None) and isinstance(model.head, nn.Linear):
        raise ValueError("Eva head_init_scale is not replayed under zero.Init (build without a classifier)")

    def tokens(root: nn.Module, _: str) -> None:
        for name in ("pos_embed", "cls_token", "reg_token"):
            if getattr(root, name) is not None:
                trunc_normal_(getattr(root, name), std=.02)

    def fix_block(block: nn.Module, name: str) -> None:
        scale = math.sqrt(2.0 * (int(name.rsplit(".", 1)[1]) + 1))
        block.attn.proj.weight.div_(scale)
        block.mlp.fc2.weight.div_(scale)

    shallow = lambda module: False  # noqa: E731
    return [(lambda m, _: model._init_weights(m, needs_reset=False), list(post_order(model)), shallow),
            (tokens, [("", model)], shallow),
            (fix_block, [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)], lambda module: True)]


def _timm_init(model: nn.Module) -> list[Phase]:
    """The per-module init a timm model applies at the end of its __init__, as phases of (function, modules in
    visiting order, which modules it reaches into beyond their own parameters)."""
    from timm.models import convnext, efficientnet, eva, mobilenetv3, vision_transformer

    shallow = lambda module: False  # noqa: E731
    if isinstance(model, (efficientnet.EfficientNet, mobilenetv3.MobileNetV3)):  # efficientnet_init_weights
        from timm.models._efficientnet_builder import _init_weight_goog

        return [((lambda m, n: _init_weight_goog(m, n)), list(model.named_modules()), shallow)]
    if isinstance(model, convnext.ConvNeXt):  # named_apply(_init_weights), depth first, root excluded
        return [((lambda m, n: convnext._init_weights(m, n)), list(post_order(model))[:-1], shallow)]
    if isinstance(model, vision_transformer.VisionTransformer):
        # VisionTransformer.init_weights: its own pos_embed / cls_token are still whole when it runs (zero.Init
        # partitions a module's parameters after its __init__), so only the named_apply over the children (root
        # excluded) is lost and replayed; a child's own init_weights may reach into its children.
        if model.fix_init or "nlhb" in model.weight_init_mode:
            raise ValueError("ViT fix_init / nlhb init are not replayed under zero.Init")
        fn = vision_transformer.get_init_weights_vit(model.weight_init_mode, 0.0, needs_reset=False)
        deep = lambda module: not isinstance(module, nn.Linear) and hasattr(module, "init_weights")  # noqa: E731
        return [((lambda m, n: fn(m, n)), list(post_order(model))[:-1], deep)]
    if isinstance(model, eva.Eva):  # built under deferred_timm_init: its whole init is replayed
        return _eva_init(model)
    if callable(getattr(model, "init_weights", None)):  # e.g. ResNet: __init__ ends with self.init_weights()
        # replayed with the whole backbone gathered: fine for CNNs, not for a multi-billion-parameter model
        return [((lambda m, _: m.init_weights()), [("", model)], lambda module: True)]
    raise ValueError(  # a refusal: building it would silently leave timm's init unapplied
        f"{type(model).__name__}: its timm initialisation is not replayed under zero.Init yet (supported: "
        f"EfficientNet, MobileNetV3, ConvNeXt, VisionTransformer, Eva, models with an init_weights method); add it to "
        f"brivl_ds/models/partitioned.py, with a case in tests/test_partitioned.py")


@torch.no_grad()
def replay_timm_init(model: nn.Module) -> None:
    """The timm model's own initialisation, each module gathered in turn (lost under zero.Init otherwise)."""
    for fn, modules, deep in _timm_init(model):
        gathered_module_apply(fn, modules, deep)


# ----------------------------------------------------------------------------------------------- pretrained
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
