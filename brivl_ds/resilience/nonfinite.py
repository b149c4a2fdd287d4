"""Skipping an optimizer step on every rank without touching the weights, the optimizer state or the LR schedule.

DeepSpeed's ZeRO-3 optimizer already skips a step whose global gradient norm is not finite (its fp16 overflow
path: gradients dropped, `engine.skipped_steps` advanced, the LR scheduler held), and the norm is the same on every
rank. A non-finite loss or key with finite gradients is not caught there, so `step_without_update` sends such a
step down the same path.
"""
from __future__ import annotations


class NonFiniteSteps(RuntimeError):
    """Too many consecutive steps were skipped for non-finite values."""


def step_without_update(engine) -> None:
    """`engine.step()` taken as an overflowed step: no update, gradients released, the step counted as skipped."""
    optimizer = engine.optimizer

    def overflowed(update_scale: bool = True) -> bool:
        optimizer.overflow = True
        return optimizer._loss_scale_update_and_overflow_cleanup() if update_scale else True

    skipped_before = engine.skipped_steps
    optimizer._overflow_check_and_loss_scale_update = overflowed  # ZeRO-3's own check, for this one step
    try:
        engine.step()
    finally:
        del optimizer._overflow_check_and_loss_scale_update
    if engine.skipped_steps != skipped_before + 1:
        raise RuntimeError("DeepSpeed applied a step that had to be skipped: its ZeRO-3 overflow path changed")
