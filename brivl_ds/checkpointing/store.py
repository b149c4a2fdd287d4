"""Checkpoints that are either complete or never loaded: written under a temporary name, verified, then published.

DeepSpeed's `save_checkpoint` writes <dir>/<tag>/ file by file and then points <dir>/latest at it, so a crash or a
full disk mid-save leaves a torn folder that a restart may load. Here every save goes to <tag>.partial/; each rank
records the files DeepSpeed wrote for it (through a wrapper around DeepSpeed's checkpoint engine), with sizes and
SHA-256; only when every rank succeeded does rank 0 write manifest.json, rename the folder to <tag> and replace
`latest` (both atomic renames). A failed save on any rank removes the partial folder on every rank's word and stops
the run: the previous checkpoint was never touched.

On resume the candidates are tried newest first (`latest`, then every published tag by step): a checkpoint whose
files do not match its manifest (missing, other size, other hash) is skipped with a warning for the previous one.
Retention keeps the newest `keep_last` published checkpoints and never the one this run resumed from.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from brivl_ds.checkpointing.files import LATEST, latest_tag
from brivl_ds.distributed import gather_objects

MANIFEST = "manifest.json"
PARTIAL = ".partial"
_STEP_TAG = re.compile(r"^step(\d+)$")


class CheckpointSaveError(RuntimeError):
    """A checkpoint save failed on some rank; the previous checkpoint is intact."""


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def step_of(tag: str) -> int:
    match = _STEP_TAG.match(tag)
    return int(match.group(1)) if match else -1


@dataclass
class SaveFaults:
    """Fault drills for the save path (see DrillConfig): this rank fails or dies while writing checkpoint `tag`."""
    fail_tag: str | None = None
    crash_tag: str | None = None


class RecordingCheckpointEngine:
    """Wraps DeepSpeed's checkpoint engine: records the files this rank writes (for the manifest) and runs the save
    drills exactly where a real disk error or crash would strike, inside DeepSpeed's own write.

    A write error is recorded, not raised: DeepSpeed's save runs collectives after the writes (ZeRO-3 re-gathers
    its persistent parameters, then a barrier), and a rank that left early would deadlock the others in them."""

    def __init__(self, inner, faults: SaveFaults):
        self.inner, self.faults = inner, faults
        self.written: list[Path] = []
        self.error: OSError | None = None
        self.tag: str | None = None

    def __getattr__(self, name):  # everything else is DeepSpeed's
        return getattr(self.inner, name)

    def save(self, state_dict, path):
        if self.error is not None:  # this checkpoint is lost already; spare the disk
            return None
        try:
            if self.tag is not None and self.tag == self.faults.fail_tag:
                raise OSError(errno.ENOSPC, f"No space left on device (fault drill) writing {path}")
            result = self.inner.save(state_dict, path)
        except OSError as err:
            self.error = err
            return None
        self.written.append(Path(path))
        if self.tag is not None and self.tag == self.faults.crash_tag:
            print(f"fault drill: rank {dist.get_rank() if dist.is_initialized() else 0} killed (SIGKILL) after "
                  f"writing {Path(path).name}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return result


@dataclass
class CheckpointStore:
    root: Path
    keep_last: int = 3
    verify_checksums: bool = True
    faults: SaveFaults = field(default_factory=SaveFaults)
    resumed_tag: str | None = None  # never deleted by retention

    # ------------------------------------------------------------------------------------------------------ save
    def save(self, engine, tag: str, client_state: dict) -> None:
        """Save through DeepSpeed under <tag>.partial, verify every rank's files, publish. Raises
        CheckpointSaveError on every rank if any rank failed."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        partial = self.root / (tag + PARTIAL)
        recorder = engine.checkpoint_engine
        if not isinstance(recorder, RecordingCheckpointEngine):
            recorder = engine.checkpoint_engine = RecordingCheckpointEngine(engine.checkpoint_engine, self.faults)
        recorder.written, recorder.error, recorder.tag = [], None, tag
        error = None
        if rank == 0:  # a leftover of an earlier attempt at this tag (a crash mid-save) must not mix in
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(partial, ignore_errors=True)
            except OSError as err:
                error = err
        if any(gather_objects(repr(error) if error else None)):  # nobody enters DeepSpeed's collectives alone
            raise CheckpointSaveError(f"cannot prepare checkpoint folder {partial}: {error}")
        try:
            engine.save_checkpoint(str(self.root), tag=partial.name, client_state=client_state, save_latest=False)
        finally:
            recorder.tag = None
        files = {}
        try:
            if recorder.error:
                raise recorder.error
            files = {str(p.relative_to(partial)): {"size": p.stat().st_size, "sha256": sha256_of(p)}
                     for p in recorder.written}
        except OSError as err:
            error = err
        reports = gather_objects({"rank": rank, "error": f"{error}" if error else None, "files": files})
        failed = [r for r in reports if r["error"]]
        if failed:
            if rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            previous = latest_tag(self.root)
            raise CheckpointSaveError(
                f"saving checkpoint {tag} failed on rank {failed[0]['rank']}: {failed[0]['error']}. The partial "
                f"folder was removed; the last complete checkpoint, {previous or '(none)'}, is intact. Free space "
                f"or fix permissions in {self.root}, then restart to resume from it.")
        publish_error = None
        if rank == 0:
            try:
                self._publish(partial, tag, reports)
            except (OSError, CheckpointSaveError) as err:
                publish_error = f"{err}"
        publish_error = gather_objects(publish_error)[0]  # every rank learns rank 0's outcome
        if publish_error:
            raise CheckpointSaveError(f"publishing checkpoint {tag} failed: {publish_error}. The last complete "
                                      f"checkpoint, {latest_tag(self.root) or '(none)'}, is intact.")

    def _publish(self, partial: Path, tag: str, reports: list[dict]) -> None:
        files = {}
        for report in reports:
            for name, entry in report["files"].items():
                files[name] = {**entry, "rank": report["rank"]}
        manifest = {"tag": tag, "step": step_of(tag), "world": len(reports), "time": time.time(), "files": files}
        problems = check_files(partial, files, checksums=False)
        if problems:  # e.g. a file another rank wrote is not visible here: not a shared filesystem
            shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointSaveError(f"checkpoint {tag} failed verification after writing: {problems[0]}")
        write_atomically(partial / MANIFEST, json.dumps(manifest, indent=1))
        final = self.root / tag
        replaced = self.root / (tag + ".replaced")
        if final.exists():  # a published checkpoint of the same step (e.g. one we fell back from): moved aside
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
        os.rename(partial, final)
        _fsync_dir(self.root)
        shutil.rmtree(replaced, ignore_errors=True)
        write_atomically(self.root / LATEST, tag)
        self._apply_retention()

    def _apply_retention(self) -> None:
        if self.keep_last <= 0:
            return
        published = sorted(published_tags(self.root), key=step_of, reverse=True)
        keep = set(published[:self.keep_last]) | {self.resumed_tag}
        for tag in published[self.keep_last:]:
            if tag not in keep:
                shutil.rmtree(self.root / tag, ignore_errors=True)

    def latest(self) -> str | None:
        return latest_tag(self.root)

    # ------------------------------------------------------------------------------------------------------ load
    def choose(self) -> str | None:
        """The newest complete checkpoint, agreed by every rank (rank 0 decides after a shared verification);
        warns for every newer one that is skipped, and removes folders of saves that never finished."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        candidates = resume_candidates(self.root)
        # Hashing is shared: rank r checks every world-th file of each candidate, until one passes.
        for tag in candidates:
            manifest = read_manifest(self.root / tag)
            if manifest is None:  # a checkpoint from before manifests (DeepSpeed's own publish): trust `latest`
                chosen = tag if tag == latest_tag(self.root) else None
                if chosen:
                    break
                continue
            names = sorted(manifest["files"])
            mine = {n: manifest["files"][n] for n in names[rank::world]}
            problems = check_files(self.root / tag, mine, checksums=self.verify_checksums)
            problems = [p for rank_problems in gather_objects(problems) for p in rank_problems]
            if not problems:
                chosen = tag
                break
            if rank == 0:
                print(f"WARNING: checkpoint {self.root / tag} is incomplete or damaged ({problems[0]}"
                      f"{f' and {len(problems) - 1} more' if len(problems) > 1 else ''}): not loading it, "
                      "trying the previous one", flush=True)
        else:
            chosen = None
        if chosen is None and candidates:  # never restart a long run from scratch behind the operator's back
            raise RuntimeError(f"no complete checkpoint in {self.root}: every one of {candidates} failed "
                               "verification (warnings above). Restore one, or set train.resume=none to start over.")
        if rank == 0:
            for stale in self.root.glob("*" + PARTIAL):
                print(f"removing {stale}: a save that never finished", flush=True)
                shutil.rmtree(stale, ignore_errors=True)
        return chosen

    def verify(self, tag: str) -> list[str]:
        if tag.endswith(PARTIAL):
            return [f"{self.root / tag} is a save that never finished"]
        manifest = read_manifest(self.root / tag)
        if manifest is None:
            return [] if (self.root / tag).is_dir() else [f"{self.root / tag} does not exist"]
        return check_files(self.root / tag, manifest["files"], checksums=self.verify_checksums)


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def published_tags(root: Path) -> list[str]:
    return [p.name for p in Path(root).iterdir() if p.is_dir() and (p / MANIFEST).exists()] if Path(root).is_dir() \
        else []


def resume_candidates(root: Path) -> list[str]:
    """`latest` first, then every published checkpoint by step, newest first."""
    latest = latest_tag(root)
    tags = sorted(published_tags(root), key=step_of, reverse=True)
    return ([latest] if latest and (Path(root) / latest).is_dir() else []) + [t for t in tags if t != latest]


def check_files(folder: Path, files: dict[str, dict], checksums: bool) -> list[str]:
    problems = []
    for name, entry in files.items():
        path = folder / name
        if not path.exists():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {entry['size']}")
        elif checksums and sha256_of(path) != entry["sha256"]:
            problems.append(f"{name} does not match its SHA-256")
    return problems
