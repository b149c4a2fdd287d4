"""DeepSpeed's checkpoint file names, parsed in one place.

A ZeRO-3 save of tag T writes <dir>/T/zero_pp_rank_{D}_mp_rank_{TT:02d}_model_states.pt and ..._optim_states.pt
for data-parallel rank D and tensor-parallel (model-parallel) rank TT, and <dir>/latest holds the newest tag.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

LATEST = "latest"  # DeepSpeed's pointer file to the newest tag (written atomically by store.py)
_NAME = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")


@dataclass(frozen=True)
class RankFile:
    path: Path
    dp_rank: int
    tp_rank: int
    kind: str  # "model" or "optim"


def parse(path: Path) -> RankFile | None:
    """The ranks and kind a DeepSpeed ZeRO checkpoint file was written by; None for any other file."""
    match = _NAME.match(Path(path).name)
    if match is None:
        return None
    return RankFile(Path(path), int(match.group(1)), int(match.group(2)), match.group(3))


def rank_files(folder: Path, kind: str | None = None, tp_rank: int | None = None) -> list[RankFile]:
    """The checkpoint files in `folder`, sorted by (tp_rank, dp_rank), optionally of one kind or TP rank."""
    found = [f for p in Path(folder).iterdir() if (f := parse(p)) is not None
             and (kind is None or f.kind == kind) and (tp_rank is None or f.tp_rank == tp_rank)]
    return sorted(found, key=lambda f: (f.tp_rank, f.dp_rank, f.kind))


def checkpoint_world(folder: Path) -> tuple[int, int]:
    """(data-parallel, tensor-parallel) sizes a checkpoint was written with, from its file names."""
    ranks = [(f.dp_rank, f.tp_rank) for f in rank_files(folder, "model")]
    if not ranks:
        raise FileNotFoundError(f"no ZeRO-3 model states in {folder}")
    return max(d for d, _ in ranks) + 1, max(t for _, t in ranks) + 1


def tp_size(folder: Path) -> int:
    """The tensor-parallel size a checkpoint was written with (1 when it has no ZeRO model states)."""
    ranks = {f.tp_rank for f in rank_files(folder, "model")}
    return max(ranks) + 1 if ranks else 1


def dp_rank_files(folder: Path, kind: str, tp_rank: int) -> list[Path]:
    """One TP rank's files of `kind`, in data-parallel rank order 0..n-1 (an error if one is missing)."""
    found = {f.dp_rank: f.path for f in rank_files(folder, kind, tp_rank)}
    if sorted(found) != list(range(len(found))):
        raise FileNotFoundError(f"{folder}: {kind} states of data-parallel ranks {sorted(found)}, not 0..n-1")
    return [found[d] for d in range(len(found))]


def as_tp_rank0(path: Path, tp_rank: int) -> str:
    """The file's name as TP rank 0 would have written it (DeepSpeed's zero_to_fp32 reads mp_rank_00 only)."""
    return Path(path).name.replace(f"_mp_rank_{tp_rank:02d}_", "_mp_rank_00_")


def latest_tag(checkpoint_dir: str | Path) -> str | None:
    """The tag DeepSpeed recorded in <dir>/latest, if a checkpoint was completed there."""
    latest = Path(checkpoint_dir) / LATEST
    return latest.read_text().strip() if latest.exists() else None
