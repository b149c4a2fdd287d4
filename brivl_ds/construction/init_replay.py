"""Initialisation that survives ZeRO-3's partitioned construction (deepspeed.zero.Init): timm's and Hugging Face's,
deferred and replayed module by module.

zero.Init partitions each module's parameters right after that module's own __init__. Whatever a parent writes into
its children afterwards lands in empty tensors and is silently lost (or crashes): timm initialises a whole model by
hand-written recursion at the end of its __init__, Hugging Face in `post_init`. Here both are deferred and replayed
module by module, each module's parameters gathered only while its own init runs (`gathered`), in the order the
library itself visits them, so a partitioned build draws the same random numbers in the same order as a plain one.
Outside zero.Init `gathered` passes plain parameters through, so the replay runs the same code on a plain model.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from brivl_ds.parallel.zero import gathered


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
        f"brivl_ds/construction/init_replay.py, with a case in tests/test_partitioned.py")


@torch.no_grad()
def replay_timm_init(model: nn.Module) -> None:
    """The timm model's own initialisation, each module gathered in turn (lost under zero.Init otherwise)."""
    for fn, modules, deep in _timm_init(model):
        gathered_module_apply(fn, modules, deep)
