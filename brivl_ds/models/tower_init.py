"""The init hook the towers take: how they create the library models inside them (a timm backbone, a Hugging Face
encoder).

`TowerInit` itself is plain eager construction: the libraries initialise the model and read its pretrained file
themselves. Partitioned construction (deepspeed.zero.Init) supplies its own hook,
`brivl_ds.construction.zero_init.PartitionedInit`, which defers the libraries' initialisation and replays it module
by module, keeps float buffers fp32 and leaves pretrained files to be read after the build. The towers never ask
which construction they are under; whoever builds them passes the hook (`construction.towers.build_brivl_moco`).
"""
from __future__ import annotations

import timm
import torch
from torch import nn
from transformers import AutoModel, PreTrainedConfig


class TowerInit:
    """Plain eager construction (the default of every tower)."""

    def timm_create(self, name: str, pretrained_file: str | None, **kwargs) -> nn.Module:
        """timm.create_model(name, **kwargs), its weights read from `pretrained_file` when given."""
        if pretrained_file:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=pretrained_file),
                                     **kwargs)
        return timm.create_model(name, pretrained=False, **kwargs)

    def hf_from_pretrained(self, path: str, **kwargs) -> nn.Module:
        """A Hugging Face model and its weights from a local directory (no hub access)."""
        return AutoModel.from_pretrained(path, local_files_only=True, **kwargs)

    def hf_from_config(self, config: PreTrainedConfig, **kwargs) -> nn.Module:
        """A randomly initialised Hugging Face model."""
        return AutoModel.from_config(config, **kwargs)


EAGER_INIT = TowerInit()


def forked_rng():
    """A forked default generator (CPU, and the current GPU's: zero.Init builds on the GPU there)."""
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else [])
