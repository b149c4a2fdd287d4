"""Building under deepspeed.zero.Init: the context, the init hook the towers take under it, float buffers in fp32."""
from __future__ import annotations

import timm
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig

from brivl_ds.construction.init_replay import deferred_hf_init, deferred_timm_init, replay_hf_init, replay_timm_init
from brivl_ds.models.tower_init import TowerInit


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


class PartitionedInit(TowerInit):
    """The towers' init hook under zero.Init. The libraries' own initialisation is deferred and replayed module by
    module (init_replay.py), and their own loaders cannot run (they write whole tensors into partitioned ones, and
    Hugging Face's refuse to nest zero.Init): a pretrained model is built from its config, its init skipped, and
    left for `load_pretrained_towers` (pretrained.py) to fill after the zero.Init context."""

    def timm_create(self, name: str, pretrained_file: str | None, **kwargs) -> nn.Module:
        with deferred_timm_init():
            backbone = timm.create_model(name, pretrained=False, **kwargs)
        keep_float_buffers_fp32(backbone)  # BatchNorm statistics stay fp32 (and a pretrained file's load in fp32)
        if not pretrained_file:
            replay_timm_init(backbone)  # the draws timm's init would have made, in its order
        return backbone

    def hf_from_pretrained(self, path: str, **kwargs) -> nn.Module:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with deferred_hf_init():  # every value comes from the file, in load_pretrained_towers
            return AutoModel.from_config(config, **kwargs)

    def hf_from_config(self, config: PreTrainedConfig, **kwargs) -> nn.Module:
        with deferred_hf_init():
            encoder = AutoModel.from_config(config, **kwargs)
        replay_hf_init(encoder)  # the draws post_init would have made, in its order
        return encoder
