"""Hung ranks become errors that name them, and a periodic heartbeat says which rank is slowest.

Every rank runs a watchdog thread that publishes, through its own client of the job's rendezvous store (the
TCPStore rank 0 hosts for torch.distributed), where its main thread is: (step, phase, when it got there) and a
liveness stamp. A rank whose main thread makes no progress for `hang_timeout_s` (stuck in a reader, or blocked in
a collective on a peer that is) reads every rank's record, names the culprit, prints it and exits: the launcher
then stops the job, instead of 128 GPUs idling until the collective timeout. The culprit is the rank furthest
behind (lowest step, then earliest phase), or one whose liveness stamp stopped (its process is gone). The first
rank to stop says so in the store: every other rank's watchdog then prints its own diagnosis and exits too, and the
first waits (a few intervals at most) until they have, since the launcher kills the job as soon as one rank exits.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

PHASES = ("start", "data", "step", "save", "eval")  # order within a step: the earliest is furthest behind
EXIT_STALLED = 86  # the process exit code of a rank stopped by the watchdog
# A store counter of the ranks whose watchdog has printed its diagnosis and stops the job. torchrun's agent keeps
# its store across restarts of the workers: the key is per attempt, so a restarted job does not stop at once.
STOPPED = "brivl/stopped/attempt{}"


def _store_client(timeout_s: float):
    """A separate client of the job's TCPStore: the watchdog thread must not share the process group's socket."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def say(line: str) -> None:
    """One line to stderr in a single write: the ranks share the launcher's pipe, and print's separate write of
    the newline let two ranks' diagnoses run together on one line."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class Watchdog:
    def __init__(self, rank: int, world: int, hang_timeout_s: float, interval_s: float | None = None):
        self.rank, self.world, self.timeout = rank, world, hang_timeout_s
        self.interval = interval_s or max(0.5, min(2.0, hang_timeout_s / 10))
        self.step, self.current_phase, self.since = 0, "start", time.time()
        self._progress = time.monotonic()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._store = None
        self._stopped = STOPPED.format(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self._thread = threading.Thread(target=self._run, name="brivl-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        if self.timeout > 0 and dist.is_initialized():
            self._store = _store_client(max(5.0, self.interval * 3))
            self._publish()
            self._thread.start()
        return self

    def stop(self) -> None:
        """Join the thread and close its store client before the interpreter exits: a C++ client torn down at
        interpreter shutdown, under a live thread, aborts the process ('terminate called without an active
        exception')."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + 5)
        self._store = None

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def beat(self, step: int, phase: str) -> None:
        """The main thread reached `phase` of `step` (cheap: the thread publishes it)."""
        self.step, self.current_phase, self.since = step, phase, time.time()
        self._progress = time.monotonic()
        self._wake.set()

    @contextlib.contextmanager
    def phase(self, step: int, phase: str) -> Iterator[None]:
        """The main thread works on `phase` of `step` inside the block (progress is stamped on entry)."""
        self.beat(step, phase)
        yield

    # ------------------------------------------------------------------------------------------------ the thread
    def _publish(self) -> None:
        record = {"step": self.step, "phase": self.current_phase, "since": self.since, "alive": time.time()}
        self._store.set(f"brivl/heartbeat/{self.rank}", json.dumps(record))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            peer_stopped = False
            try:
                self._publish()
                peer_stopped = self._store.check([self._stopped])  # another rank's watchdog stops the job
            except Exception:  # rank 0 (the store's host) is gone; the diagnosis below says so
                pass
            if peer_stopped or time.monotonic() - self._progress > self.timeout:
                say(f"ERROR: {self.diagnose()} (resilience.hang_timeout_s={self.timeout:g})")
                self._stop_job()
                os._exit(EXIT_STALLED)  # the main thread is blocked; nothing else can stop it

    def _stop_job(self) -> None:
        """Say that this rank stops, then wait (3 intervals at most: a dead rank never answers) until every rank's
        watchdog has printed its own diagnosis: each names the culprit before the launcher kills the job."""
        try:
            self._store.add(self._stopped, 1)
            deadline = time.monotonic() + 3 * self.interval
            while time.monotonic() < deadline and self._store.add(self._stopped, 0) < self.world:
                time.sleep(0.1)
        except Exception:  # the store's host is gone: nobody to wait for
            pass

    # --------------------------------------------------------------------------------------------- the diagnosis
    def records(self) -> dict[int, dict | None]:
        out: dict[int, dict | None] = {}
        for rank in range(self.world):
            key = f"brivl/heartbeat/{rank}"
            # check first: get() would block until the key appears (a rank that never published)
            out[rank] = json.loads(self._store.get(key)) if self._store.check([key]) else None
        return out

    def diagnose(self, settle: bool = False) -> str:
        """Which rank holds the job up, and where: a sentence for the on-call engineer. `settle`: right after a
        failed collective, watch the liveness stamps for a few intervals to tell a dead peer from a slow one."""
        here = f"rank {self.rank} has waited {time.time() - self.since:.0f} s at step {self.step} ({self.current_phase})"
        try:
            records = self.records()
            if settle:
                time.sleep(2.5 * self.interval)
                later = self.records()
                stopped = {r for r in records if later[r] is None or records[r] is None
                           or later[r]["alive"] == records[r]["alive"]}
                records = later
        except Exception as err:
            return f"job stalled: {here}; the rendezvous store on rank 0's host is unreachable ({err}): rank 0 is gone"
        now = time.time()
        gone = {r: rec for r, rec in records.items() if rec is None or now - rec["alive"] > 3 * self.interval + 5
                or (settle and r in stopped)}
        if gone:
            rank, rec = min(gone.items(), key=lambda kv: kv[1]["alive"] if kv[1] else 0)
            last = f"last heard {now - rec['alive']:.0f} s ago at step {rec['step']} ({rec['phase']})" if rec \
                else "never heard from"
            return f"rank {rank} stopped responding ({last}): its process is likely gone; {here}"
        rank, rec = min(records.items(), key=lambda kv: (kv[1]["step"], PHASES.index(kv[1]["phase"]),
                                                          kv[1]["since"]))
        return (f"rank {rank} stalled at step {rec['step']} in phase '{rec['phase']}' for {now - rec['since']:.0f} s"
                f" (it is alive but makes no progress); {here}")


class StepTimes:
    """Per-rank time waiting for data and per step, summarised every N steps into one heartbeat line."""

    def __init__(self):
        self.data_wait = 0.0
        self.step_time = 0.0
        self.steps = 0

    def add(self, data_wait: float, step_time: float) -> None:
        self.data_wait += data_wait
        self.step_time += step_time
        self.steps += 1

    def heartbeat(self, step: int, device: torch.device) -> str | None:
        """All ranks call this; rank 0 gets the line. One all-gather of two numbers per rank."""
        mine = torch.tensor([self.data_wait / max(1, self.steps), self.step_time / max(1, self.steps)],
                            dtype=torch.float64, device=device)
        world = dist.get_world_size() if dist.is_initialized() else 1
        everyone = [torch.empty_like(mine) for _ in range(world)]
        if world > 1:
            dist.all_gather(everyone, mine)
        else:
            everyone = [mine]
        self.data_wait = self.step_time = 0.0
        self.steps = 0
        table = torch.stack(everyone).cpu()
        waits, steps = table[:, 0], table[:, 1]
        slowest = int(waits.argmax())
        return (f"heartbeat @ step {step}: {world} ranks alive; slowest rank {slowest} waits "
                f"{waits[slowest]:.3f} s/step for data (median {waits.median():.3f} s); step time "
                f"{steps.mean():.3f} s (max {steps.max():.3f} s on rank {int(steps.argmax())})")
