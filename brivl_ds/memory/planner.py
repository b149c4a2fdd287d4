"""The GPU memory planner: per-GPU memory by part for a preset on a cluster, and the largest per-GPU batch that
fits, before anything launches (`python -m brivl_ds.plan` prints it).

Model states come from the parameter shapes (meta device), the TP split plan and the ds_config, as ZeRO-3 lays
them out (brivl_ds/memory/model_states.py); activations are traced on the meta device with the preset's precision,
frozen layers and checkpointing (brivl_ds/memory/activations.py). Nothing is allocated: the 10b preset plans on a
laptop. Activations are traced with the whole (TP = 1) layers: with TP > 1 they are an upper bound.

The peak is the larger of the forward/backward (states, ZeRO-3 buffers, activations, loss workspace) and the
optimizer step (states and its gradient copy), plus a stated margin for what is not modelled: the CUDA context,
NCCL buffers and allocator fragmentation.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass


from brivl_ds.config import CHINESE_ROBERTA_VOCAB, Config
from brivl_ds.memory.activations import ActivationModel, StepActivations, build_meta_towers, trace_step
from brivl_ds.memory.model_states import ParameterShards, Precision, model_state_bytes, zero3_buffer_bytes

GiB = 2 ** 30
LOSS_SPLITS = 2 * 132  # the loss kernel's queue splits: at most 2 per SM (H100: 132 SMs)
LABELS = {
    "params_online": "parameters, online towers (partitions + persistent)",
    "params_momentum": "parameters, momentum towers",
    "master_weights": "master weights of the trainable partitions",
    "gradients": "gradient partitions",
    "optimizer_states": "optimizer states (2 moments)",
    "ema_fp32": "EMA fp32 copy of the momentum partitions",
    "queues": "key queues (2 x K x D)",
    "reduce_bucket": "ZeRO-3 reduce bucket",
    "gathered_parameters": "ZeRO-3 gathered parameters (largest module + prefetch)",
    "loss_workspace": "loss kernel workspace",
    "activations": "activations",
    "step_gradient_copy": "optimizer step: gradient copy in the master dtype",
}


@dataclass
class MemoryPlan:
    preset: str
    gpus: int
    tp: int
    dp: int
    batch: int
    gpu_memory: int
    margin: int
    states: dict[str, int]  # between steps
    step: dict[str, int]  # during forward/backward, on top of the states
    optimizer_step: dict[str, int]  # during the optimizer step, on top of the states
    activations_per_sample: int  # traced, checkpointing as configured
    checkpointing: bool

    @property
    def peak(self) -> int:
        base = sum(self.states.values())
        return base + max(sum(self.step.values()), sum(self.optimizer_step.values()))

    @property
    def fits(self) -> bool:
        return self.peak + self.margin <= self.gpu_memory

    def to_dict(self) -> dict:
        return {**self.__dict__, "peak": self.peak, "fits": self.fits}


class Planner:
    """Plans one preset (with overrides) on a cluster; traces activations once per batch size asked for."""

    def __init__(self, cfg: Config, ds_config: dict, gpus: int, tp: int, vocab_size: int = CHINESE_ROBERTA_VOCAB):
        if gpus % tp:
            raise ValueError(f"{gpus} GPUs do not divide into tensor-parallel groups of {tp}")
        self.cfg = copy.deepcopy(cfg)  # planned at this TP size; the caller's config is left alone
        self.cfg.parallel.tensor_parallel = tp
        self.ds_config, self.gpus, self.tp, self.dp = ds_config, gpus, tp, gpus // tp
        self.vocab_size = vocab_size
        self.precision = Precision.from_config(cfg, ds_config)
        self.dtype = self.precision.dtype
        self.shards = ParameterShards.from_config(self.cfg, vocab_size, tp)
        self.states = model_state_bytes(self.cfg, ds_config, self.shards, self.dp)
        self.buffers = zero3_buffer_bytes(self.cfg, ds_config, self.shards, self.dp)
        self.checkpointing = cfg.model.image.grad_checkpointing or cfg.model.text.grad_checkpointing
        self._towers = None  # the meta towers, built once
        self._model: ActivationModel | None = None
        self._traced: dict[int, StepActivations] = {}

    def towers(self):
        if self._towers is None:
            self._towers = build_meta_towers(self.cfg, self.vocab_size, self.dtype)
        return self._towers

    def activation_model(self) -> ActivationModel:
        if self._model is None:
            self._model = ActivationModel.trace(self.cfg, self.vocab_size, self.dtype, towers=self.towers())
        return self._model

    def activations(self, batch: int) -> StepActivations:
        """Traced at exactly this batch size (the affine model only guides the search)."""
        if batch not in self._traced:
            self._traced[batch] = trace_step(self.cfg, self.vocab_size, batch, self.dtype, towers=self.towers())
        return self._traced[batch]

    def per_sample_without_checkpointing(self) -> int:
        if not self.checkpointing:
            return self.activation_model().per_sample.step_peak
        plain = copy.deepcopy(self.cfg)
        plain.model.image.grad_checkpointing = plain.model.text.grad_checkpointing = False
        return ActivationModel.trace(plain, self.vocab_size, self.dtype).per_sample.step_peak

    def loss_workspace(self, batch: int) -> int:
        """Both loss terms: fp32 partial sums per queue split, the fp32 dq accumulator and dq, per term."""
        d = self.cfg.model.embed_dim
        return 2 * (3 * LOSS_SPLITS * batch * 4 + batch * d * 4 + batch * d * self.precision.param)

    def plan(self, batch: int, gpu_memory: int, margin_fraction: float) -> MemoryPlan:
        step = {"reduce_bucket": self.buffers["reduce_bucket"],
                "gathered_parameters": self.buffers["gathered_parameters"],
                "loss_workspace": self.loss_workspace(batch),
                "activations": self.activations(batch).step_peak}
        return MemoryPlan(self.cfg.preset, self.gpus, self.tp, self.dp, batch, gpu_memory, int(margin_fraction * gpu_memory),
                    dict(self.states), step, {"step_gradient_copy": self.buffers["step_gradient_copy"]},
                    self.activation_model().per_sample.step_peak, self.checkpointing)

    def largest_batch(self, gpu_memory: int, margin_fraction: float, limit: int = 4096) -> int:
        """The largest per-GPU batch whose plan fits (0 if none): guessed from the affine activation model, then
        settled by tracing at exact batch sizes (a binary search only if the guess is off)."""
        fits = lambda b: self.plan(b, gpu_memory, margin_fraction).fits  # noqa: E731
        if not fits(1):
            return 0
        probe = self.plan(1, gpu_memory, margin_fraction)
        per = max(1, self.activation_model().per_sample.step_peak + self.loss_workspace(2) - self.loss_workspace(1))
        room = gpu_memory - probe.margin - probe.peak
        guess = max(1, min(limit, 1 + room // per))
        if guess > 2:  # one secant step through the exact trace at the guess: memory is not quite affine
            per = max(1, (self.plan(guess, gpu_memory, margin_fraction).peak - probe.peak) // (guess - 1))
            guess = max(1, min(limit, 1 + room // per))
        # Gallop from the guess until the answer is bracketed, fits(low) and not fits(high) (limit + 1 never
        # fits), then bisect.
        step = 1
        if fits(guess):
            low, high = guess, guess + 1
            while high <= limit and fits(high):
                low, step = high, step * 2
                high = min(limit + 1, low + step)
        else:
            low, high = guess - 1, guess
            while low > 1 and not fits(low):
                high, step = low, step * 2
                low = max(1, high - step)
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low


def format_plan(plan: MemoryPlan, largest: int, without_ckpt: int | None) -> str:
    gib = lambda b: f"{b / GiB:8.2f}"  # noqa: E731
    lines = [f"preset {plan.preset}: {plan.gpus} GPUs x {plan.gpu_memory / GiB:.1f} GiB, TP {plan.tp} x DP {plan.dp}, "
             f"batch {plan.batch} per GPU ({plan.batch * plan.dp} global)", "",
             f"{'per GPU':<58}{'GiB':>8}", "between steps:"]
    lines += [f"  {LABELS[k]:<56}{gib(v)}" for k, v in plan.states.items()]
    lines += [f"  {'sum':<56}{gib(sum(plan.states.values()))}", "forward + backward, on top:"]
    for key, value in plan.step.items():
        label = LABELS[key] + (f" ({plan.batch} samples, checkpointing {'on' if plan.checkpointing else 'off'})"
                               if key == "activations" else "")
        lines.append(f"  {label:<56}{gib(value)}")
    lines += ["optimizer step, on top:"] + [f"  {LABELS[k]:<56}{gib(v)}" for k, v in plan.optimizer_step.items()]
    lines += [f"{'peak':<58}{gib(plan.peak)}",
              f"{'margin (CUDA context, NCCL, fragmentation; not modelled)':<58}{gib(plan.margin)}",
              f"{'total':<58}{gib(plan.peak + plan.margin)}  of {plan.gpu_memory / GiB:.1f}: "
              f"{'fits' if plan.fits else 'DOES NOT FIT'}", ""]
    per = plan.activations_per_sample
    lines.append(f"activations per sample: {per / 2**20:,.1f} MiB as configured (checkpointing "
                 f"{'on' if plan.checkpointing else 'off'})"
                 + (f", {without_ckpt / 2**20:,.1f} MiB without checkpointing" if without_ckpt is not None else ""))
    if plan.tp > 1:
        lines.append("(activations traced with whole layers: an upper bound at TP > 1)")
    lines.append(f"largest batch per GPU that fits: {largest}")
    return "\n".join(lines)
