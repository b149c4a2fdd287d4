"""The checkpoint store's publish / verify / fall back / retain rules, on folders of plain files, in one process
(the launcher tests in test_faults.py drive the same code through DeepSpeed)."""
import pytest

from brivl_ds.checkpointing.files import latest_tag
from brivl_ds.checkpointing.store import CheckpointStore, published_tags, sha256_of


def publish(store: CheckpointStore, tag: str, payload: bytes) -> None:
    partial = store.root / f"{tag}.partial"
    partial.mkdir(parents=True)
    files = {}
    for rank in (0, 1):
        name = f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
        (partial / name).write_bytes(payload + bytes([rank]))
        files[name] = {"size": (partial / name).stat().st_size, "sha256": sha256_of(partial / name)}
    reports = [{"rank": r, "error": None, "files": {n: e for n, e in files.items() if f"rank_{r}_" in n}}
               for r in (0, 1)]
    store._publish(partial, tag, reports)


def test_damaged_checkpoints_are_skipped_for_older_ones_and_never_silently_replaced_by_a_fresh_start(tmp_path,
                                                                                                     capsys):
    store = CheckpointStore(tmp_path, keep_last=0)
    for step in (1, 2, 3):
        publish(store, f"step{step}", b"x" * 100 * step)
    assert latest_tag(tmp_path) == "step3" and not list(tmp_path.glob("*.partial"))
    (tmp_path / "step4.partial").mkdir()  # a save that never finished
    # same size, other bytes: only the hash sees it
    victim = tmp_path / "step3" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    victim.write_bytes(b"y" * victim.stat().st_size)
    assert CheckpointStore(tmp_path, verify_checksums=False).choose() == "step3"
    assert store.choose() == "step2"
    assert "zero_pp_rank_1_mp_rank_00_model_states.pt does not match its SHA-256" in capsys.readouterr().out
    assert not (tmp_path / "step4.partial").exists()
    (tmp_path / "step2" / "zero_pp_rank_0_mp_rank_00_model_states.pt").unlink()
    assert store.choose() == "step1"
    (tmp_path / "step1" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"short")
    with pytest.raises(RuntimeError, match="no complete checkpoint"):
        store.choose()
    assert store.verify("step4.partial") and store.verify("step1")


def test_retention_keeps_the_newest_and_the_one_resumed_from(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2, resumed_tag="step1")
    for step in range(1, 6):
        publish(store, f"step{step}", b"z" * 10)
    assert sorted(published_tags(tmp_path)) == ["step1", "step4", "step5"]
    publish(store, "step5", b"w" * 10)  # the same step again (after a fall-back): replaced, not mixed
    assert (tmp_path / "step5" / "zero_pp_rank_0_mp_rank_00_model_states.pt").read_bytes() == b"w" * 10 + b"\0"
    assert not (tmp_path / "step5.replaced").exists() and store.choose() == "step5"
