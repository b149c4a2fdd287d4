"""The BriVLMoCo the trainer trains: online towers and their momentum copy, built plain or partitioned."""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import ContextManager

from brivl_ds.config import MocoConfig, ModelConfig
from brivl_ds.construction.pretrained import load_pretrained_towers
from brivl_ds.construction.zero_init import PartitionedInit
from brivl_ds.models.brivl import BriVL
from brivl_ds.models.tower_init import EAGER_INIT, forked_rng
from brivl_ds.moco.model import BriVLMoCo
from brivl_ds.parallel.zero import any_partitioned, copy_local_shards


def build_brivl_moco(model_cfg: ModelConfig, moco_cfg: MocoConfig, vocab_size: int,
                     zero_init: Callable[[], ContextManager] | None = None) -> BriVLMoCo:
    """Online towers and their momentum copy, built under `zero_init` when given (zero.Init when training,
    `functools.partial(partitioned_construction, ds_config, group)`: no rank ever holds a whole tower), plain
    otherwise. The momentum towers are a second instance (deepcopy cannot copy partitioned parameters), drawn from
    a fork of the generator so it ends where one build leaves it, as with a deepcopy; pretrained files are read
    once, into the online towers, and the momentum towers then copy them shard for shard."""
    init = EAGER_INIT if zero_init is None else PartitionedInit()
    with zero_init() if zero_init is not None else contextlib.nullcontext():
        with forked_rng():
            momentum = BriVL(model_cfg, vocab_size=vocab_size, init=init)
        online = BriVL(model_cfg, vocab_size=vocab_size, init=init)
        model = BriVLMoCo(online, moco_cfg, momentum=momentum)
    if any_partitioned(model):  # pretrained files are read module by module, outside zero.Init
        load_pretrained_towers(model.online, model_cfg)
    copy_local_shards(model.online, model.momentum)
    return model
