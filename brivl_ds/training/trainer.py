"""The trainer: cross-modal MoCo on a DeepSpeed ZeRO-3 engine (built by training/setup.py), step after step.

One optimizer step (`train_step` for each of its micro-batches), read top to bottom:
  forward online + momentum towers -> MoCo loss against the queues -> backward -> ZeRO-3 step (clip, AdamW, LR)
  -> EMA of the momentum shards -> all-gathered enqueue of this step's keys.
A step whose loss, keys or gradient norm is non-finite on any rank is skipped on every rank: no update, no EMA, no
enqueue (brivl_ds/resilience). Around the steps (`fit`): log, heartbeat, checkpoint (brivl_ds/checkpointing), evaluate,
each under the watchdog's phase so a stalled rank is named.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from brivl_ds.checkpointing.checkpointer import Checkpointer
from brivl_ds.checkpointing.state import Position, TrainState
from brivl_ds.checkpointing.store import CheckpointSaveError
from brivl_ds.config import Config
from brivl_ds.construction.towers import build_brivl_moco
from brivl_ds.data.build import build_eval_set, build_transform
from brivl_ds.data.dataset import PairDataset
from brivl_ds.distributed import all_reduce_mean
from brivl_ds.evaluation.held_out import ZeroShotSet, evaluate_retrieval, evaluate_zeroshot, read_zeroshot_set
from brivl_ds.evaluation.recall import format_recall
from brivl_ds.models.brivl import Batch
from brivl_ds.moco.loss import STAT_KEYS, ContrastiveLoss
from brivl_ds.moco.model import BriVLMoCo, run_moco
from brivl_ds.moco.staleness import StalenessProbe
from brivl_ds.parallel.groups import check_same_batch
from brivl_ds.parallel.zero import set_fp32_master
from brivl_ds.resilience.drills import Drills
from brivl_ds.resilience.nonfinite import NonFiniteSteps, step_without_update
from brivl_ds.resilience.watchdog import StepTimes, Watchdog, say
from brivl_ds.training.batches import MicroBatch, StepBatches
from brivl_ds.training.metrics_log import MetricsLog
from brivl_ds.training.setup import build_training, run_summary


class Trainer:
    def __init__(self, cfg: Config, hooks: Drills | None = None):
        """`hooks`: the fault drills, called where real faults strike (poisoned rows, a NaN loss, a stalled reader,
        a crash mid-step, a failed save); by default those `cfg.drill` asks for."""
        setup = build_training(cfg)  # validation, process groups, data, model, engine, queues
        self.cfg, self.info, self.groups, self.dtype = setup.cfg, setup.info, setup.groups, setup.dtype
        self.tokenizer, self.collate, self.stream = setup.tokenizer, setup.collate, setup.stream
        self.engine, self.scheduler, self.model = setup.engine, setup.scheduler, setup.model
        self.momentum, self.image_queue, self.text_queue = setup.momentum, setup.image_queue, setup.text_queue
        self.total_steps = setup.total_steps
        self.hooks = hooks or Drills(self.cfg.drill, self.info.rank, self.info.world)
        self.out_dir = Path(self.cfg.train.output_dir)
        self.state = TrainState(Position(), self.image_queue, self.text_queue, self.momentum, self.cfg)
        self.checkpointer = Checkpointer(
            self.out_dir / "checkpoints", self.cfg.resilience, self.engine, self.groups, self.info.is_main,
            whole_model_meta=self._whole_model_on_meta, vocab_parallel=self.cfg.parallel.vocab_parallel,
            faults=self.hooks.save_faults())
        self.watchdog = Watchdog(self.info.rank, self.info.world, self.cfg.resilience.hang_timeout_s)
        self.step_times = StepTimes()
        self.eval_set: PairDataset | None = None  # read on first use
        self.zeroshot_set: ZeroShotSet | None = None  # data.zeroshot_path's labelled images, read on first use
        self.last_eval: tuple[int, dict[str, float]] = (-1, {})
        self._bad_micro_steps = 0  # micro-steps of the current accumulation with a non-finite loss or key
        self.loss_fn = ContrastiveLoss(self.cfg.moco, self.groups.dp_group)
        self.staleness = StalenessProbe(
            self.cfg.moco, self.cfg.train.staleness_every,
            self.cfg.data.batch_size * self.groups.dp * self.cfg.train.grad_accum_steps, self.groups.dp_group)
        # this step's keys and their content ids, enqueued at its end
        self._pending_keys: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._micro_stats: list[torch.Tensor] = []  # this step's loss statistics, one row per micro-step
        if self.info.is_main:
            print(run_summary(setup), flush=True)
        self._set_exact_tau_init()
        resumed = self.checkpointer.resume(self.state, self.cfg.train.resume)
        self._refresh_tau_master()
        self.metrics = MetricsLog(self.out_dir, self.info.is_main, self.cfg.train.log_every,
                                  resumed_at_step=self.pos.step if resumed else None)

    @property
    def pos(self) -> Position:
        return self.state.position

    # ------------------------------------------------------------------------------------------------- one step
    def train_step(self, batch: Batch, content_ids: torch.Tensor, skipped_rows: int = 0,
                   rows: list[int] | None = None) -> dict[str, float]:
        """One micro-batch (content_ids [B, 2]: its pairs' image and caption ids): forward, loss, backward; at the
        last micro-batch of a step, the optimizer step, the EMA and the enqueue (or the skip of all three)."""
        if self.groups.tp > 1:
            check_same_batch(batch, self.groups.tp_group, self.info.device)
        batch = batch.to(self.info.device, dtype=self.dtype)
        batch.images = self.hooks.poison(batch.images, rows or [])
        out = run_moco(self.engine, batch)
        loss, parts = self.loss_fn(out, content_ids, self.image_queue, self.text_queue)
        loss = self.hooks.loss(loss, self.pos.step + 1)
        finite = torch.isfinite(loss) & torch.isfinite(out.image_key).all() & torch.isfinite(out.text_key).all()
        # One small all-reduce for the console, TensorBoard and the skip decision: losses averaged, skipped rows
        # summed, non-finite ranks counted, so that every rank takes the same decision.
        stats = all_reduce_mean(torch.stack([loss.detach().float(), parts["loss_i2t"].float(),
                                             parts["loss_t2i"].float(),
                                             torch.tensor(float(skipped_rows), device=loss.device),
                                             (~finite).float(), *(parts[key].float() for key in STAT_KEYS)]))
        self._micro_stats.append(stats)
        if not bool(finite):  # for the post-mortem: which rank, which rows (a poisoned sample is among them)
            print(f"rank {self.info.rank}: non-finite loss or key at step {self.pos.step + 1}; rows of its batch: "
                  f"{rows}", flush=True)
        self._bad_micro_steps += stats[4].item() > 0
        self._pending_keys.append((out.image_key, out.text_key, content_ids))
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.hooks.maybe_crash_mid_step(self.pos.step + 1)
        if boundary:
            applied = self._optimizer_step()
        else:
            self.engine.step()  # DeepSpeed's micro-step bookkeeping; no update before the boundary
            applied = True
        rows_skipped = round(stats[3].item() * self.groups.dp)  # this micro-step's, all ranks
        if boundary:  # the step's losses: the mean over its micro-batches, i.e. over the effective batch
            stats = torch.stack(self._micro_stats).mean(0)
            self._micro_stats.clear()
        return {"loss": stats[0].item(), "loss_i2t": stats[1].item(), "loss_t2i": stats[2].item(),
                **{key: value.item() for key, value in zip(STAT_KEYS, stats[5:])},
                "tau": out.tau.item(), "skipped": rows_skipped, "boundary": boundary, "applied": applied}

    def _optimizer_step(self) -> bool:
        """ZeRO-3's step, then the EMA and the enqueue; or, if any micro-step was non-finite, none of them.
        Returns whether the step was applied."""
        skipped_before = self.engine.skipped_steps
        # A non-finite loss whose gradients stayed finite must not update either; non-finite gradients are caught
        # by DeepSpeed itself (its global gradient norm check), the same on every rank.
        if self._bad_micro_steps:
            step_without_update(self.engine)
        else:
            self.engine.step()
        applied = self.engine.skipped_steps == skipped_before
        self._bad_micro_steps = 0
        if applied and self.model.with_keys:
            self.momentum.update(self.cfg.moco.momentum)
            # Keys enter at the optimizer step, gathered over the data-parallel group (each once, every rank the
            # same queue): with gradient accumulation every micro-batch of a step meets the same queues, as one
            # batch of the effective size would. A skipped step's keys never enter.
            image_keys, text_keys, ids = (torch.cat(parts) for parts in zip(*self._pending_keys))
            self.image_queue.enqueue(image_keys, ids, self.groups.dp_group)
            self.text_queue.enqueue(text_keys, ids, self.groups.dp_group)
        if applied:
            self._refresh_tau_master()
        self._pending_keys.clear()
        return applied

    def _set_exact_tau_init(self) -> None:
        """The fp32 master of log(tau) starts as the bf16 parameter it was made from (log 0.07 -> tau 0.0702):
        set it to the configured value exactly. A resumed run then loads its own."""
        if self.dtype != torch.float32 and self.model.log_tau.requires_grad:
            set_fp32_master(self.model.log_tau, torch.tensor([math.log(self.cfg.moco.tau_init)]))

    def _refresh_tau_master(self) -> None:
        """In low-precision runs, give the forward the fp32 master of log(tau) (a small collective under ZeRO-3);
        a fixed temperature (moco.learn_tau=false) has no master: its configured value, exactly."""
        if self.dtype == torch.float32:
            return
        if not self.model.log_tau.requires_grad:
            self.model.set_log_tau_master(torch.tensor([math.log(self.cfg.moco.tau_init)]))
            return
        from deepspeed.utils import safe_get_full_fp32_param

        self.model.set_log_tau_master(safe_get_full_fp32_param(self.model.log_tau))

    # ------------------------------------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, float]:
        self.watchdog.start()
        try:
            return self._fit()
        except Exception as err:
            if self.watchdog.started and not isinstance(err, (CheckpointSaveError, NonFiniteSteps)):
                # a collective failed (a peer died or timed out): say which rank holds the job up
                say(f"ERROR on rank {self.info.rank}: {type(err).__name__}: {str(err)[:500]}. Diagnosis: "
                    f"{self.watchdog.diagnose(settle=True)}")
            raise
        finally:
            self.watchdog.stop()
            self.metrics.close()

    def _fit(self) -> dict[str, float]:
        cfg, pos = self.cfg, self.pos
        batches = StepBatches(self.stream, lambda: self.pos.data, self._set_data_position, cfg.train.grad_accum_steps,
                              cfg.data.num_workers, cfg.data.prefetch_factor, self.info.device.type == "cuda",
                              cfg.train.seed)
        bar = tqdm(total=self.total_steps, initial=pos.step, desc="train", dynamic_ncols=True,
                   disable=not (self.info.is_main and cfg.train.progress_bar))
        self.engine.train()
        t_last, samples_last = time.perf_counter(), pos.samples
        while pos.step < self.total_steps and pos.step != cfg.train.stop_at_step:
            with self.watchdog.phase(pos.step + 1, "data"):
                micro_batches = batches.next_step()
                self.hooks.maybe_stall(pos.step + 1)
            with self.watchdog.phase(pos.step + 1, "step"):
                stats = self._train_one_step(micro_batches)
            pos.step += 1
            applied = stats.pop("applied")
            self._count_skip(applied)
            if applied and self.staleness.every:
                self.staleness.record([(m.batch, m.content_ids) for m in micro_batches])
                if self.staleness.due(pos.step):
                    stats.update(self.staleness.measure(self.model, self.image_queue, self.text_queue,
                                                        self.info.device, self.dtype))
            now = time.perf_counter()
            stats.update(lr=self.scheduler.get_last_lr()[0], grad_norm=self._grad_norm(), step_time=now - t_last,
                         samples_per_s=(pos.samples - samples_last) / (now - t_last),
                         queue_fill=self.text_queue.filled / max(1, self.text_queue.size),
                         skipped_rows=pos.skipped_rows, skipped_steps=pos.skipped_steps)
            self.step_times.add(sum(m.data_wait for m in micro_batches), now - t_last)
            t_last, samples_last = now, pos.samples
            bar.set_postfix(loss=f"{stats['loss']:.3f}", tau=f"{stats['tau']:.3f}", refresh=False)
            bar.update(1)
            self.metrics.train_step(pos.step, pos.data.epoch, stats, force_tensorboard=pos.consecutive_skips > 0)
            self._stop_after_too_many_skips()
            if cfg.resilience.heartbeat_every and pos.step % cfg.resilience.heartbeat_every == 0:
                self._heartbeat()
            if cfg.train.save_every and pos.step % cfg.train.save_every == 0:
                with self.watchdog.phase(pos.step, "save"):
                    self.save()
            if cfg.train.eval_every and pos.step % cfg.train.eval_every == 0:
                with self.watchdog.phase(pos.step, "eval"):
                    self.evaluate()
                self.engine.train()
        bar.close()
        with self.watchdog.phase(pos.step, "save"):
            self.save()
        with self.watchdog.phase(pos.step, "eval"):
            return self._final_evaluation()

    # ----------------------------------------------------------------------------------------------- utilities
    def _train_one_step(self, micro_batches: list[MicroBatch]) -> dict[str, float]:
        """Every micro-batch of one optimizer step; the step's statistics (those of its last micro-batch)."""
        for micro in micro_batches:
            stats = self.train_step(micro.batch, micro.content_ids, micro.skipped, micro.rows)
            self.pos.samples += len(micro.batch) * self.groups.dp
            self.pos.skipped_rows += stats.pop("skipped")
        if not stats.pop("boundary"):
            raise RuntimeError(f"the engine did not reach its accumulation boundary after {len(micro_batches)} "
                               "micro-batches")
        return stats

    def _set_data_position(self, state) -> None:
        self.pos.data = state

    def _final_evaluation(self) -> dict[str, float]:
        """The end-of-run evaluation, unless `eval_every` already evaluated this very step."""
        step, result = self.last_eval
        if step == self.pos.step:
            return result
        finished = self.pos.step >= self.total_steps
        has_sets = self.cfg.data.eval_path or self.cfg.data.zeroshot_path
        return self.evaluate() if finished and self.cfg.train.eval_at_end and has_sets else {}

    def _heartbeat(self) -> None:
        line = self.step_times.heartbeat(self.pos.step, self.info.device)  # a collective: every rank calls it
        if self.info.is_main:
            print(line, flush=True)

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
                f"checkpoint, {self.checkpointer.latest() or '(none)'}, is intact; lower the learning rate or "
                "check the data around these steps before resuming from it.")

    def _grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def _whole_model_on_meta(self) -> BriVLMoCo:
        with torch.device("meta"):  # shapes only: which parameters TP splits, and how
            return build_brivl_moco(self.cfg.model, self.cfg.moco, len(self.tokenizer))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out recall (data.eval_path) and zero-shot accuracy (data.zeroshot_path), each where configured; every
        rank takes part (ZeRO-3 gathers parameters collectively)."""
        data, result = self.cfg.data, {}
        if data.eval_path:
            if self.eval_set is None:
                self.eval_set = build_eval_set(self.cfg, data.eval_path)
            embeddings_out = self.out_dir / "eval_embeddings.pt" if self.cfg.train.save_eval_embeddings else None
            result = evaluate_retrieval(self.model.online, self.eval_set, self.collate, data.batch_size, self.info,
                                        self.dtype, self.groups, embeddings_out)
        if data.zeroshot_path:
            if self.zeroshot_set is None:
                self.zeroshot_set = read_zeroshot_set(data.zeroshot_path, data.zeroshot_classes,
                                                      data.zeroshot_templates, data.zeroshot_label_column)
            result.update(evaluate_zeroshot(self.model.online, self.zeroshot_set, build_transform(self.cfg, False),
                                            self.tokenizer, self.cfg.model.text.max_length, data.batch_size,
                                            self.info, self.dtype, self.groups))
        if not result:  # eval_every without a held-out or zero-shot set: nothing to report
            return result
        self.last_eval = (self.pos.step, result)
        self.metrics.evaluation(self.pos.step, result)
        if self.info.is_main:
            print(format_recall(result, self.pos.step), flush=True)
        return result

    def save(self) -> None:
        self.checkpointer.save(self.state, self.info.rank, self.info.world)

