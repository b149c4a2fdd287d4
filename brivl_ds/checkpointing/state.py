"""The train state a checkpoint holds next to DeepSpeed's engine state: the one module that writes and reads its
keys (and migrates older layouts).

DeepSpeed saves, per rank, the ZeRO-3 parameter and optimizer partitions (the momentum encoders included: they are
frozen parameters of the same engine) and the LR scheduler. The client state beside them is per rank too (ZeRO-3
writes one model-states file per rank): the position in training and in the data, this rank's slice of each key
queue, the fp32 EMA copies of low-precision runs, this rank's RNG states (with TP, its dropout stream too) and the
run's config.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from brivl_ds.checkpointing.rng_state import rng_state, set_rng_state
from brivl_ds.config import Config
from brivl_ds.data.stream import StreamState
from brivl_ds.moco.momentum import MomentumUpdater
from brivl_ds.moco.queue import KeyQueue
from brivl_ds.parallel.rng import rng_tracker_state


@dataclass
class Position:
    """Where training stands."""
    step: int = 0  # optimizer steps done
    samples: int = 0  # global samples seen
    skipped_rows: int = 0  # rows that failed at read time and were replaced, all ranks
    skipped_steps: int = 0  # steps skipped for a non-finite loss, key or gradient norm
    consecutive_skips: int = 0
    data: StreamState = field(default_factory=StreamState)  # epoch, micro-batches of it consumed, layout

    @classmethod
    def from_dict(cls, state: dict) -> "Position":
        state = dict(state)
        if "data" not in state:  # a checkpoint from before the streaming reader: its mid-epoch order is not ours
            state["data"] = {"epoch": state.pop("epoch", 0), "batch_in_epoch": state.pop("batch_in_epoch", 0),
                             "fingerprint": "pre-streaming"}
        return cls(**{**state, "data": StreamState(**state["data"])})


@dataclass
class TrainState:
    """The live objects a checkpoint restores besides the engine; `state_dict` is one rank's client state."""
    position: Position
    image_queue: KeyQueue
    text_queue: KeyQueue
    momentum: MomentumUpdater
    config: Config

    def state_dict(self, rank: int, world: int) -> dict:
        return {
            "position": dataclasses.asdict(self.position),
            "image_queue": self.image_queue.shard_state(rank, world),
            "text_queue": self.text_queue.shard_state(rank, world),
            "momentum_fp32": self.momentum.state_dict(),
            "rng": rng_state(),
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, own: dict, queue_slices: list[tuple[dict, dict]],
                        momentum_masters: list[torch.Tensor] | None = None,
                        keep_tensor_parallel_rng: bool = False) -> None:
        """Restore from this rank's client state `own` and every old rank's (image, text) queue slices, in rank
        order (the queues are reassembled from all of them, whatever this run's world size). A resharded load
        passes this rank's pieces of the fp32 EMA copies (`momentum_masters`), cut from every old rank's; with
        another TP size the per-TP-rank dropout stream keeps this run's seeding (`keep_tensor_parallel_rng`)."""
        self.position = Position.from_dict(own["position"])  # the same on every rank
        self.image_queue.load_shards([image for image, _ in queue_slices])
        self.text_queue.load_shards([text for _, text in queue_slices])
        if momentum_masters is None:
            self.momentum.load_state_dict(own["momentum_fp32"])
        else:
            self.momentum.load_masters(momentum_masters)
        rng = own["rng"]
        if keep_tensor_parallel_rng:
            rng = {**rng, "tensor_parallel": rng_tracker_state()}
        set_rng_state(rng)  # another world size: dropout streams restart from the old ranks' states


def queue_slices(state: dict) -> tuple[dict, dict]:
    """A rank's (image, text) queue slices: what every rank gathers from the others on a same-layout resume."""
    return state["image_queue"], state["text_queue"]


def saved_config(state: dict) -> dict:
    """The config (as a dict) of the run that wrote a rank's client state."""
    return state["config"]


def saved_momentum_masters(state: dict) -> list[torch.Tensor]:
    """A rank's pieces of the fp32 EMA copies, in MomentumUpdater's order (empty for fp32 runs)."""
    return MomentumUpdater.masters_in(state["momentum_fp32"])
