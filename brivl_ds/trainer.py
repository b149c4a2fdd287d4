"""The trainer: builds model, data, DeepSpeed engine, queues and momentum updater from a Config, then trains.

One optimizer step (`train_step`), read top to bottom:
  forward online + momentum towers -> MoCo loss against the queues -> backward -> ZeRO-3 step (clip, AdamW, LR)
  -> EMA of the momentum shards -> all-gathered enqueue of this step's keys.
A step whose loss, keys or gradient norm is non-finite on any rank is skipped on every rank: no update, no EMA, no
enqueue (brivl_ds/resilience). Checkpoints are published atomically and verified on resume.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from brivl_ds.checkpoint import gather_objects, rng_state, set_rng_state
from brivl_ds.config import Config
from brivl_ds.data.build import build_collator, build_eval_set, build_train_stream
from brivl_ds.data.dataset import PairDataset
from brivl_ds.data.stream import StreamState
from brivl_ds.data.synthetic import ensure_shapes_dataset, shapes_dataset_paths
from brivl_ds.data.tokenizer import load_tokenizer
from brivl_ds.distributed import DistInfo, all_reduce_mean, barrier, init_distributed
from brivl_ds.ds_config import load_ds_config
from brivl_ds.evaluation.held_out import evaluate_retrieval
from brivl_ds.evaluation.recall import format_recall
from brivl_ds.models.brivl import Batch
from brivl_ds.moco.loss import moco_loss
from brivl_ds.models.checkpointing import apply_activation_checkpointing
from brivl_ds.models.partitioned import partitioned_construction
from brivl_ds.moco.model import BriVLMoCo, build_brivl_moco, run_moco
from brivl_ds.moco.momentum import MomentumUpdater
from brivl_ds.moco.queue import KeyQueue
from brivl_ds.optim import build_optimizer, build_scheduler
from brivl_ds.parallel.groups import DeepSpeedMPU, init_tensor_parallel
from brivl_ds.parallel.rng import rng_tracker_state
from brivl_ds.resilience.checkpoints import CheckpointSaveError, CheckpointStore
from brivl_ds.resilience.drills import Drills
from brivl_ds.resilience.nonfinite import NonFiniteSteps, step_without_update
from brivl_ds.resilience.reshard import Resharder, checkpoint_world
from brivl_ds.resilience.watchdog import StepTimes, Watchdog


@dataclass
class Position:
    """Where training stands; saved in every checkpoint."""
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


def resolve_data(cfg: Config, info: DistInfo) -> None:
    """Fill in the built-in dataset when no shards are given (generated once, by rank 0; the others wait)."""
    if cfg.data.train_path is not None:
        if cfg.model.text.tokenizer_path is None and cfg.model.text.pretrained_path is None:
            raise ValueError("set model.text.tokenizer_path (a local Hugging Face tokenizer directory) "
                             "when training on your own shards")
        return
    if info.is_main:
        ensure_shapes_dataset(cfg.data.synthetic_dir, cfg.data.synthetic_train, cfg.data.synthetic_eval,
                              cfg.model.image.image_size, seed=0)
    barrier()
    paths = shapes_dataset_paths(cfg.data.synthetic_dir)
    cfg.data.train_path, cfg.data.eval_path = str(paths["train"]), str(paths["eval"])
    # A pretrained text encoder brings its own tokenizer (its vocabulary indexes the embedding)
    cfg.model.text.tokenizer_path = (cfg.model.text.tokenizer_path or cfg.model.text.pretrained_path
                                     or str(paths["tokenizer"]))


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        if cfg.parallel.sequence_parallel:  # before anything starts
            raise ValueError("parallel.sequence_parallel is not supported: DeepSpeed would not all-reduce the "
                             "LayerNorm gradients of sequence-parallel regions")
        self.info = init_distributed(cfg.train.threads, cfg.resilience.collective_timeout_s)
        self.drills = Drills(cfg.drill, self.info.rank, self.info.world)
        # Tensor-parallel and data-parallel groups (TP innermost); TP = 1 leaves every rank data-parallel.
        self.groups = init_tensor_parallel(cfg.parallel.tensor_parallel)
        deepspeed.runtime.utils.set_random_seed(cfg.train.seed)  # the same on every rank: TP ranks build one model
        resolve_data(cfg, self.info)
        self.out_dir = Path(cfg.train.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.checkpoints = CheckpointStore(self.ckpt_dir, cfg.resilience.keep_last, cfg.resilience.verify_checksums,
                                           self.drills.save_faults())
        self.watchdog = Watchdog(self.info.rank, self.info.world, cfg.resilience.hang_timeout_s)
        self.step_times = StepTimes()
        self._bad_micro_steps = 0  # micro-steps of the current accumulation with a non-finite loss or key
        self._pending_keys: list[tuple[torch.Tensor, torch.Tensor]] = []  # this step's keys, enqueued at its end
        self._micro_stats: list[torch.Tensor] = []  # this step's loss statistics, one row per micro-step

        self.tokenizer = load_tokenizer(cfg.model.text.tokenizer_path or cfg.model.text.pretrained_path)
        self.collate = build_collator(cfg, self.tokenizer)
        # Data by data-parallel rank: the TP ranks of one group read the same samples.
        self.stream = build_train_stream(cfg, self.collate, self.groups.dp_rank, self.groups.dp)
        self.eval_set: PairDataset | None = None
        steps_per_epoch = self.stream.batches_per_epoch // cfg.train.grad_accum_steps
        self.total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else steps_per_epoch * cfg.train.epochs

        ds_config = load_ds_config(cfg)
        # Partitioned construction: every module's parameters are split over the data-parallel group as soon as
        # it is built, so no rank ever holds a whole tower (online or momentum).
        construct = functools.partial(partitioned_construction, ds_config, self.groups.dp_group)
        model = build_brivl_moco(cfg.model, cfg.moco, len(self.tokenizer), construct)
        if self.groups.tp > 1:  # applied to the built model: the towers know nothing of it
            from brivl_ds.parallel.rng import init_tensor_parallel_rng
            from brivl_ds.parallel.tensor_parallel import parallelize

            parallelize(model, self.groups.tp, self.groups.tp_rank, self.groups.tp_group,
                        cfg.parallel.vocab_parallel, construct)
            # attention dropout on a rank's own heads draws from a per-TP-rank stream; the rest from the shared one
            init_tensor_parallel_rng(cfg.train.seed, self.groups.tp_rank, self.info.device)
        apply_activation_checkpointing(model.online, cfg.model)  # the momentum forward keeps no graph
        optimizer = build_optimizer(model, cfg.optim, self.groups.dp_rank)
        scheduler = build_scheduler(optimizer, cfg.optim, self.total_steps)
        check_batchnorm_precision(model, cfg, ds_config)
        # With TP, DeepSpeed needs the groups: ZeRO-3 then partitions each TP shard over its DP group only, and
        # the gradient norm counts TP-split parameters once per shard.
        mpu = DeepSpeedMPU(self.groups) if self.groups.tp > 1 else None
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 lr_scheduler=scheduler, config=ds_config, mpu=mpu)
        self.model: BriVLMoCo = self.engine.module
        self.dtype = torch.bfloat16 if self.engine.bfloat16_enabled() else (
            torch.float16 if self.engine.fp16_enabled() else torch.float32)
        self.momentum = MomentumUpdater(self.model.parameter_pairs(), cfg.moco.momentum_impl)
        self.momentum.copy_online_to_momentum()
        dim = cfg.model.embed_dim
        # Keys are stored in the compute dtype: the loss kernel reads the whole queue every step (half the bytes in
        # bf16) and accumulates in fp32.
        self.image_queue = KeyQueue(cfg.moco.queue_size, dim, self.dtype, self.info.device)
        self.text_queue = KeyQueue(cfg.moco.queue_size, dim, self.dtype, self.info.device)
        self.pos = Position()
        self.last_eval: dict[str, float] = {}
        self.last_eval_step = -1
        self.metrics_file = self.out_dir / "metrics.jsonl"
        if self.info.is_main:
            print(run_summary(cfg, self.info, self.groups, self.dtype), flush=True)
        resumed = self._maybe_resume()
        # Steps logged after the checkpoint we resumed from are about to be logged again: TensorBoard drops its
        # events from that step on (purge_step) and metrics.jsonl is cut back, so each step appears once.
        self.writer = SummaryWriter(str(self.out_dir / "tensorboard"),
                                    purge_step=self.pos.step + 1 if resumed else None) if self.info.is_main else None
        if resumed and self.info.is_main:
            drop_metrics_after(self.metrics_file, self.pos.step)

    # ------------------------------------------------------------------------------------------------- one step
    def train_step(self, batch: Batch, skipped_rows: int = 0, rows: list[int] | None = None) -> dict[str, float]:
        if self.groups.tp > 1:
            check_same_batch(batch, self.groups.tp_group, self.info.device)
        batch = batch.to(self.info.device, dtype=self.dtype)
        batch.images = self.drills.poison(batch.images, rows or [])
        out = run_moco(self.engine, batch)
        loss, parts = moco_loss(out, self.image_queue, self.text_queue, self.cfg.moco.loss_impl)
        loss = self.drills.loss(loss, self.pos.step + 1)
        finite = torch.isfinite(loss) & torch.isfinite(out.image_key).all() & torch.isfinite(out.text_key).all()
        # One small all-reduce for the console, TensorBoard and the skip decision: losses averaged, skipped rows
        # summed, non-finite ranks counted, so that every rank takes the same decision.
        stats = all_reduce_mean(torch.stack([loss.detach().float(), parts["loss_i2t"].float(),
                                             parts["loss_t2i"].float(),
                                             torch.tensor(float(skipped_rows), device=loss.device),
                                             (~finite).float()]))
        self._micro_stats.append(stats)
        nonfinite_here = stats[4].item() > 0
        if not bool(finite):  # for the post-mortem: which rank, which rows (a poisoned sample is among them)
            print(f"rank {self.info.rank}: non-finite loss or key at step {self.pos.step + 1}; rows of its batch: "
                  f"{rows}", flush=True)
        self._bad_micro_steps += nonfinite_here
        self._pending_keys.append((out.image_key, out.text_key))
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.drills.maybe_crash_mid_step(self.pos.step + 1)
        applied = True
        if boundary:
            skipped_before = self.engine.skipped_steps
            # A non-finite loss whose gradients stayed finite must not update either; non-finite gradients are
            # caught by DeepSpeed itself (its global gradient norm check), the same on every rank.
            if self._bad_micro_steps:
                step_without_update(self.engine)
            else:
                self.engine.step()
            applied = self.engine.skipped_steps == skipped_before
            self._bad_micro_steps = 0
            if applied:
                self.momentum.update(self.cfg.moco.momentum)
                # Keys enter at the optimizer step, gathered over the data-parallel group (each once, every rank
                # the same queue): with gradient accumulation every micro-batch of a step meets the same queues,
                # as one batch of the effective size would. A skipped step's keys never enter.
                image_keys, text_keys = (torch.cat(keys) for keys in zip(*self._pending_keys))
                self.image_queue.enqueue(image_keys, self.groups.dp_group)
                self.text_queue.enqueue(text_keys, self.groups.dp_group)
            self._pending_keys.clear()
        else:
            self.engine.step()
        rows_skipped = round(stats[3].item() * self.groups.dp)  # this micro-step's, all ranks
        if boundary:  # the step's losses: the mean over its micro-batches, i.e. over the effective batch
            stats = torch.stack(self._micro_stats).mean(0)
            self._micro_stats.clear()
        return {"loss": stats[0].item(), "loss_i2t": stats[1].item(), "loss_t2i": stats[2].item(),
                "tau": out.tau.item(), "skipped": rows_skipped, "boundary": boundary, "applied": applied}

    # ------------------------------------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, float]:
        self.watchdog.start()
        try:
            return self._fit()
        except Exception as err:
            if self.watchdog.started and not isinstance(err, (CheckpointSaveError, NonFiniteSteps)):
                # a collective failed (a peer died or timed out): say which rank holds the job up
                print(f"ERROR on rank {self.info.rank}: {type(err).__name__}: {str(err)[:500]}. Diagnosis: "
                      f"{self.watchdog.diagnose(settle=True)}", file=sys.stderr, flush=True)
            raise
        finally:
            self.watchdog.stop()

    def _fit(self) -> dict[str, float]:
        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=self.pos.step, desc="train", dynamic_ncols=True,
                   disable=not (self.info.is_main and cfg.train.progress_bar))
        self.engine.train()
        t_last, samples_last = time.perf_counter(), self.pos.samples
        t_fetch = time.perf_counter()
        self.watchdog.beat(self.pos.step + 1, "data")
        while self.pos.step < self.total_steps and self.pos.step != cfg.train.stop_at_step:
            if self.pos.data.batch_in_epoch == 0:  # a fresh epoch is laid out for the workers we have now
                self.stream.start_epoch(self.pos.data.epoch, cfg.data.num_workers)
            else:  # mid-epoch resume: the rest of the epoch, re-dealt if the ranks or batch size changed
                self.stream.set_position(self.pos.data, num_workers=cfg.data.num_workers)
            self.pos.data = self.stream.state
            for batch, meta in self._loader():
                self.drills.maybe_stall(self.pos.step + 1)
                data_wait = time.perf_counter() - t_fetch
                self.watchdog.beat(self.pos.step + 1, "step")
                if meta["position"] != self.pos.data.batch_in_epoch:  # the exact-resume guarantee, checked
                    raise RuntimeError(f"data loader yielded batch {meta['position']} of epoch "
                                       f"{self.pos.data.epoch}, expected {self.pos.data.batch_in_epoch}")
                stats = self.train_step(batch, meta["skipped"], meta["rows"])
                self.pos.data.batch_in_epoch += 1
                self.pos.samples += len(batch) * self.groups.dp
                self.pos.skipped_rows += stats.pop("skipped")
                if not stats.pop("boundary"):
                    t_fetch = time.perf_counter()
                    continue
                self.pos.step += 1
                self._count_skip(stats.pop("applied"))
                bar.set_postfix(loss=f"{stats['loss']:.3f}", tau=f"{stats['tau']:.3f}", refresh=False)
                bar.update(1)
                now = time.perf_counter()
                stats.update(lr=self.scheduler.get_last_lr()[0], grad_norm=self._grad_norm(),
                             step_time=now - t_last, samples_per_s=(self.pos.samples - samples_last) / (now - t_last),
                             queue_fill=self.text_queue.filled / max(1, self.text_queue.size),
                             skipped_rows=self.pos.skipped_rows, skipped_steps=self.pos.skipped_steps)
                self.step_times.add(data_wait, now - t_last)
                t_last, samples_last = now, self.pos.samples
                self._log(stats)
                self._stop_after_too_many_skips()
                if cfg.resilience.heartbeat_every and self.pos.step % cfg.resilience.heartbeat_every == 0:
                    line = self.step_times.heartbeat(self.pos.step, self.info.device)
                    if self.info.is_main:
                        print(line, flush=True)
                if cfg.train.save_every and self.pos.step % cfg.train.save_every == 0:
                    self.watchdog.beat(self.pos.step, "save")
                    self.save()
                if cfg.train.eval_every and self.pos.step % cfg.train.eval_every == 0:
                    self.watchdog.beat(self.pos.step, "eval")
                    self.evaluate()
                    self.engine.train()
                if self.pos.step >= self.total_steps or self.pos.step == cfg.train.stop_at_step:
                    break
                self.watchdog.beat(self.pos.step + 1, "data")
                t_fetch = time.perf_counter()
            else:  # epoch exhausted
                self.pos.data = StreamState(epoch=self.pos.data.epoch + 1)
        bar.close()
        self.watchdog.beat(self.pos.step, "save")
        self.save()
        self.watchdog.beat(self.pos.step, "eval")
        finished = self.pos.step >= self.total_steps
        if self.last_eval_step == self.pos.step:  # eval_every already evaluated this very step
            result = self.last_eval
        else:
            result = self.evaluate() if finished and cfg.train.eval_at_end and cfg.data.eval_path else {}
        if self.writer:
            self.writer.close()
        return result

    # ----------------------------------------------------------------------------------------------- utilities
    def _count_skip(self, applied: bool) -> None:
        """Count a skipped step (too many in a row stop the run, its last checkpoint left as it was)."""
        if applied:
            self.pos.consecutive_skips = 0
            return
        self.pos.skipped_steps += 1
        self.pos.consecutive_skips += 1
        if self.info.is_main:
            print(f"step {self.pos.step} skipped: non-finite loss, key or gradient norm (no update, no EMA, no "
                  f"enqueue; {self.pos.consecutive_skips} in a row, {self.pos.skipped_steps} in all)", flush=True)

    def _stop_after_too_many_skips(self) -> None:
        limit = self.cfg.resilience.max_consecutive_skips
        if limit and self.pos.consecutive_skips >= limit:
            raise NonFiniteSteps(
                f"stopping: {self.pos.consecutive_skips} consecutive steps (up to step {self.pos.step}) had a "
                f"non-finite loss, key or gradient norm (resilience.max_consecutive_skips={limit}). The last "
                f"checkpoint, {self.checkpoints.latest() or '(none)'}, is intact; lower the learning rate or "
                "check the data around these steps before resuming from it.")

    def _loader(self) -> DataLoader:
        workers = self.cfg.data.num_workers
        # Its own generator: every new iterator draws a base seed, and from the global RNG that draw would shift
        # dropout masks whenever a loader is (re)created, e.g. after a resume. Our rows' augmentation draws
        # depend on (seed, epoch, row) only, so this seed feeds nothing else.
        return DataLoader(self.stream, batch_size=None, num_workers=workers,
                          prefetch_factor=self.cfg.data.prefetch_factor if workers else None,
                          pin_memory=self.info.device.type == "cuda", persistent_workers=False,
                          generator=torch.Generator().manual_seed(self.cfg.train.seed))

    def _grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def _log(self, stats: dict) -> None:
        if not self.info.is_main:
            return
        record = {"step": self.pos.step, "epoch": self.pos.data.epoch, **stats}
        # a skipped step's non-finite values are written as null (strict JSON has no NaN)
        line = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(line) + "\n")
        if self.pos.step % self.cfg.train.log_every == 0 or self.pos.step == 1 or self.pos.consecutive_skips:
            for key in ("loss", "loss_i2t", "loss_t2i", "tau", "lr", "grad_norm", "samples_per_s", "step_time",
                        "queue_fill", "skipped_rows", "skipped_steps"):
                self.writer.add_scalar(f"train/{key}", record[key], self.pos.step)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.eval_set is None:  # read the held-out shards once, on first use
            self.eval_set = build_eval_set(self.cfg, self.cfg.data.eval_path)
        result = evaluate_retrieval(self.model.online, self.eval_set, self.collate, self.cfg.data.batch_size,
                                    self.info, self.dtype, self.groups,
                                    self.out_dir / "eval_embeddings.pt" if self.cfg.train.save_eval_embeddings else None)
        self.last_eval, self.last_eval_step = result, self.pos.step
        if self.info.is_main:
            for key, value in result.items():
                self.writer.add_scalar(f"eval/{key}", value, self.pos.step)
            (self.out_dir / "eval.json").write_text(json.dumps({"step": self.pos.step, **result}, indent=1))
            print(format_recall(result, self.pos.step), flush=True)
        return result

    def save(self) -> None:
        state = {
            "position": dataclasses.asdict(self.pos),
            "image_queue": self.image_queue.shard_state(self.info.rank, self.info.world),
            "text_queue": self.text_queue.shard_state(self.info.rank, self.info.world),
            "momentum_fp32": self.momentum.state_dict(),
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
        }
        self.checkpoints.save(self.engine, f"step{self.pos.step}", state)

    def _maybe_resume(self) -> bool:
        resume = self.cfg.train.resume
        if resume == "none":
            return False
        if resume == "auto":  # the newest checkpoint that verifies, falling back past torn or damaged ones
            ckpt_dir, tag = self.ckpt_dir, self.checkpoints.choose()
        else:  # the one named, verified: no silent substitute
            ckpt_dir, tag = Path(resume).parent, Path(resume).name
            problems = CheckpointStore(ckpt_dir, verify_checksums=self.cfg.resilience.verify_checksums).verify(tag)
            if problems:
                raise ValueError(f"checkpoint {resume} is incomplete or damaged: {'; '.join(problems[:3])}")
        if tag is None:
            return False
        if ckpt_dir.resolve() == self.ckpt_dir.resolve():
            self.checkpoints.resumed_tag = tag  # retention never deletes it
        folder = ckpt_dir / tag
        universal = (folder / "zero").is_dir()
        written_on = (0, 0) if universal else checkpoint_world(folder)
        if written_on == (self.groups.dp, self.groups.tp):  # the same layout: DeepSpeed's own load, rank by rank
            path, state = self.engine.load_checkpoint(str(ckpt_dir), tag=tag)
            if path is None:
                raise FileNotFoundError(f"could not load checkpoint {folder}")
            self.momentum.load_state_dict(state["momentum_fp32"])
            shards = gather_objects((state["image_queue"], state["text_queue"]))
            states = [state]
        else:
            states, state = self._load_resharded(folder)
            shards = [(s["image_queue"], s["text_queue"]) for s in states]
            if written_on[1] != self.groups.tp:  # the per-TP-rank dropout stream keeps this run's seeding
                state = {**state, "rng": {**state["rng"], "tensor_parallel": rng_tracker_state()}}
            how = "DeepSpeed universal checkpoint" if universal else \
                f"{written_on[0]} data-parallel x {written_on[1]} tensor-parallel ranks"
            if self.info.is_main:
                print(f"resharding {folder} ({how}) onto {self.groups.dp} x {self.groups.tp}", flush=True)
        self.pos = Position.from_dict(states[0]["position"])
        self.image_queue.load_shards([s[0] for s in shards])
        self.text_queue.load_shards([s[1] for s in shards])
        set_rng_state(state["rng"])  # another world size: dropout streams restart from the old ranks' states
        if self.info.is_main:
            print(f"resumed from {folder} at step {self.pos.step}", flush=True)
        return True

    def _load_resharded(self, folder: Path) -> tuple[list[dict], dict]:
        """A checkpoint written on other ranks, resharded onto this run's (brivl_ds/resilience/reshard.py): every
        old rank's client state, and the one at this rank's position."""
        whole = None
        written_tp = 1 if (folder / "zero").is_dir() else checkpoint_world(folder)[1]
        if self.groups.tp > 1 or written_tp > 1:  # TP-split parameters are merged and cut again
            with torch.device("meta"):  # shapes only: which parameters TP splits, and how
                whole = build_brivl_moco(self.cfg.model, self.cfg.moco, len(self.tokenizer))
        resharder = Resharder(self.engine, self.groups, whole, self.cfg.parallel.vocab_parallel)
        states = resharder.load(folder)
        if self.momentum.lowp is not None:
            names = {p: n for n, p in self.engine.module.named_parameters()}
            self.momentum.load_state_dict({"master": resharder.momentum_masters(
                [names[m] for _, m in self.momentum.pairs])})
        return states, resharder.own_client_state()


def drop_metrics_after(path: Path, step: int) -> None:
    """Keep the metrics.jsonl records of steps <= `step` (the resumed checkpoint's), rewritten atomically."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError):  # a record torn by the crash we are resuming from
            print(f"{path}: dropped an unreadable record: {line[:80]!r}", flush=True)
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)


def check_same_batch(batch: Batch, tp_group, device: torch.device) -> None:
    """The TP ranks of one group must see the same samples (else the split layers mix different inputs): compare
    a checksum of the raw batch over the group, one tiny all-gather per step (on the device: NCCL groups on GPUs)."""
    checksum = torch.stack([t.double().sum() for t in batch.tensors()]).to(device)
    everyone = [torch.empty_like(checksum) for _ in range(torch.distributed.get_world_size(tp_group))]
    torch.distributed.all_gather(everyone, checksum, group=tp_group)
    if any(not torch.equal(everyone[0], other) for other in everyone[1:]):
        raise RuntimeError("the tensor-parallel ranks of one group received different batches; the data must be "
                           "split by data-parallel rank")


def check_batchnorm_precision(model: BriVLMoCo, cfg: Config, ds_config: dict) -> None:
    """Train-mode BatchNorm (batch statistics) keeps fp32 running statistics next to the engine's bf16/fp16 gains,
    which torch refuses mid-step; say so before any step runs."""
    low_precision = ds_config.get("bf16", {}).get("enabled") or ds_config.get("fp16", {}).get("enabled")
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.online.image.modules())
    if low_precision and has_bn and not cfg.model.image.frozen_bn_stats:
        raise ValueError("model.image.frozen_bn_stats=false (BatchNorm with batch statistics) runs in fp32 only; "
                         "use a DeepSpeed config with bf16 disabled or keep frozen_bn_stats=true")


def run_summary(cfg: Config, info: DistInfo, groups, dtype: torch.dtype) -> str:
    """One line on what runs where: the world, the device, the precision and the path each kernel takes."""
    import brivl_kernels

    kernels = {"loss": brivl_kernels.path_taken("queue_contrastive_loss", cfg.moco.loss_impl, info.device),
               "momentum": brivl_kernels.path_taken("momentum_update_", cfg.moco.momentum_impl, info.device)}
    if cfg.optim.name == "adamw_half":
        kernels["adamw_half"] = brivl_kernels.path_taken("AdamWHalfStates", "auto", info.device)
    return (f"{cfg.preset}: {info.world} rank{'s' * (info.world > 1)} ({groups.dp} data-parallel x {groups.tp} "
            f"tensor-parallel) on "
            f"{info.device.type}, {str(dtype).removeprefix('torch.')}, kernels: "
            + ", ".join(f"{name} {path}" for name, path in kernels.items()))
