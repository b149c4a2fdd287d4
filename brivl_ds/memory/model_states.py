"""Model-state memory per GPU under ZeRO-3 (and TP), computed from the model's parameter shapes and the ds_config,
with no model built for real (the towers are instantiated on the meta device).

What one rank holds between steps, by part (dp = GPUs / TP; DeepSpeed 0.19.8 stage3.py / partition_parameters.py):
- parameters, online and momentum: every parameter's partition, ceil(numel / dp) elements in the run's dtype
  (partitions are padded to equal size), plus a whole copy of each "persistent" parameter (numel <= 
  stage3_param_persistence_threshold), which ZeRO-3 keeps gathered after its first use;
- master weights: the trainable partitions in fp32 (bf16 with bf16_master_weights_and_grads);
- gradient partitions: the trainable partitions in the gradient-accumulation dtype (the model's dtype unless
  data_types.grad_accum_dtype says otherwise);
- optimizer states: two moments per trainable element, fp32 for torch AdamW, bf16 for adamw_half (and for AdamW
  over bf16 master weights);
- the EMA's fp32 copy of the trainable momentum partitions (only in bf16 / fp16 runs: see moco/momentum.py);
- the two key queues, K x D each in the run's dtype, identical on every rank.
`measure_model_states` reads the same parts off a live Trainer; the tests compare the two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from brivl_ds.config import Config

PARTS = ("params_online", "params_momentum", "master_weights", "gradients", "optimizer_states", "ema_fp32",
         "queues")


@dataclass(frozen=True)
class Precision:
    """Element sizes (bytes) the ds_config implies."""
    param: int
    master: int
    grad: int
    state: int
    mixed: bool  # bf16 / fp16 parameters (the EMA then keeps an fp32 copy)
    dtype: torch.dtype  # the parameters' (and activations') dtype

    @classmethod
    def from_config(cls, cfg: Config, ds_config: dict) -> "Precision":
        bf16 = ds_config.get("bf16", {})
        fp16 = ds_config.get("fp16", {})
        half = bool(bf16.get("enabled") or fp16.get("enabled"))
        param = 2 if half else 4
        master = 2 if bf16.get("bf16_master_weights_and_grads") else 4
        accum = ds_config.get("data_types", {}).get("grad_accum_dtype")
        grad = {"fp32": 4, "fp16": 2, "bf16": 2}.get(accum, param) if accum else param
        state = 2 if (cfg.optim.name == "adamw_half" or master == 2) else 4
        dtype = torch.bfloat16 if bf16.get("enabled") else torch.float16 if fp16.get("enabled") else torch.float32
        return cls(param=param, master=master, grad=grad, state=state, mixed=half, dtype=dtype)


@dataclass(frozen=True)
class ParameterShards:
    """One TP rank's parameters of the online towers (the momentum towers have the same shapes): element counts and
    whether each trains."""
    numels: dict[str, int]
    trainable: dict[str, bool]
    largest_module: int  # elements of the largest module's own parameters (ZeRO-3 gathers module by module)

    @classmethod
    def from_config(cls, cfg: Config, vocab_size: int, tp: int) -> "ParameterShards":
        from brivl_ds.models.brivl import BriVL
        from brivl_ds.parallel.tp_plan import local_numels

        with torch.device("meta"):
            model = BriVL(cfg.model, vocab_size=vocab_size)
        numels = local_numels(model, tp, cfg.parallel.vocab_parallel)
        trainable = {name: p.requires_grad for name, p in model.named_parameters()}
        numels["log_tau"], trainable["log_tau"] = 1, cfg.moco.learn_tau  # BriVLMoCo's temperature
        largest = max(sum(numels[f"{prefix}.{n}" if prefix else n] for n, _ in m.named_parameters(recurse=False))
                      for prefix, m in model.named_modules())
        return cls(numels, trainable, largest)


def zero3_partition(numel: int, dp: int) -> int:
    """Elements of one rank's partition: padded so every rank's is equal (partition_parameters._aligned_size)."""
    return math.ceil(numel / dp)


def model_state_bytes(cfg: Config, ds_config: dict, shards: ParameterShards, dp: int) -> dict[str, int]:
    """Bytes one GPU holds of each part between steps (PARTS), for data-parallel size dp."""
    prec = Precision.from_config(cfg, ds_config)
    persistence = ds_config.get("zero_optimization", {}).get("stage3_param_persistence_threshold", 1e5)
    online_params = momentum_params = trainable = 0
    for name, numel in shards.numels.items():
        local = zero3_partition(numel, dp)
        held = local + (numel if numel <= persistence else 0)
        online_params += held
        if name != "log_tau":
            momentum_params += held
        if shards.trainable[name]:
            trainable += local
    ema_numel = sum(zero3_partition(n, dp) for name, n in shards.numels.items()
                    if shards.trainable[name] and name != "log_tau")
    return {
        "params_online": online_params * prec.param,
        "params_momentum": momentum_params * prec.param,
        "master_weights": trainable * prec.master,
        "gradients": trainable * prec.grad,
        "optimizer_states": 2 * trainable * prec.state,
        "ema_fp32": ema_numel * 4 if prec.mixed else 0,
        "queues": 2 * cfg.moco.queue_size * cfg.model.embed_dim * prec.param,
    }


def zero3_buffer_bytes(cfg: Config, ds_config: dict, shards: ParameterShards, dp: int) -> dict[str, int]:
    """ZeRO-3's working buffers during a step, from the ds_config: the reduce (IPG) bucket; the gathered parameters
    in flight (the largest module plus a prefetch bucket, capped by stage3_max_live_parameters); and the flat copy
    of the gradient partitions the optimizer step makes in the master dtype (one sub-group at a time)."""
    prec = Precision.from_config(cfg, ds_config)
    zero = ds_config.get("zero_optimization", {})
    reduce_bucket = int(zero.get("reduce_bucket_size", 5e8))
    prefetch = int(zero.get("stage3_prefetch_bucket_size", 5e7))
    live_cap = int(zero.get("stage3_max_live_parameters", 1e9))
    sub_group = int(zero.get("sub_group_size", 1e9))
    trainable = sum(zero3_partition(n, dp) for name, n in shards.numels.items() if shards.trainable[name])
    return {"reduce_bucket": reduce_bucket * prec.grad,
            "gathered_parameters": min(live_cap, prefetch + shards.largest_module) * prec.param,
            "step_gradient_copy": min(trainable, sub_group) * prec.master}


# ---------------------------------------------------------------------------------------------------- measurement
def measure_model_states(trainer) -> dict[str, int]:
    """The PARTS as a live Trainer holds them on this rank (after at least one step, when ZeRO-3 has gathered its
    persistent parameters): partitions (ds_tensor), gathered persistent copies, the ZeRO-3 optimizer's flat fp32
    partitions, gradient buffer and optimizer states, the EMA's fp32 copy, the queues."""
    model, opt = trainer.model, trainer.engine.optimizer

    def params(module_params) -> int:
        total = 0
        for p in module_params:
            total += p.ds_tensor.numel() * p.ds_tensor.element_size()
            total += p.data.numel() * p.data.element_size()  # 0 unless gathered (persistent ones are)
        return total

    states = 0
    for state in opt.optimizer.state.values():
        states += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    return {
        "params_online": params(list(model.online.parameters()) + [model.log_tau]),
        "params_momentum": params(model.momentum.parameters()),
        "master_weights": sum(t.numel() * t.element_size() for t in opt.fp32_partitioned_groups_flat),
        "gradients": opt.grad_partitions_flat_buffer.numel() * opt.grad_partitions_flat_buffer.element_size(),
        "optimizer_states": states,
        "ema_fp32": sum(t.numel() * 4 for t in trainer.momentum.master) if trainer.momentum.lowp is not None else 0,
        "queues": sum(q.keys.numel() * q.keys.element_size() for q in (trainer.image_queue, trainer.text_queue)),
    }
