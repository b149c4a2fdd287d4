"""Shared test set-up: CPU DeepSpeed, a cached JIT-extension directory, a small generated dataset, and a helper
that runs a function on N gloo ranks in fresh processes."""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "brivl_ds" / "torch_extensions"))


def _use_triton_interpreter() -> bool:
    """Without a GPU, the kernel tests run the Triton path in Triton's interpreter, in this process: the variable
    must be set before anything imports triton (it decides when kernels are defined), so it is set here, first.
    Processes the tests start (ranks, launchers) do not inherit it unless a test asks (`child_env`): the trainer's
    `auto` kernels would run interpreted there, which is slow and not what a CPU user runs."""
    import torch

    if "TRITON_INTERPRET" in os.environ or torch.cuda.is_available():
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True


INTERPRETER_SET_HERE = _use_triton_interpreter()


def child_env(triton_interpreter: bool = False, **extra: str) -> dict[str, str]:
    """The environment for a process a test starts: this one's, without the interpreter set for the kernel tests
    unless `triton_interpreter` (then the child runs the Triton kernels interpreted, on CPU)."""
    env = {**os.environ, **extra}
    if triton_interpreter:
        env["TRITON_INTERPRET"] = "1"
    elif INTERPRETER_SET_HERE:  # "0", not absent: a spawned rank imports this module again and would set it
        env["TRITON_INTERPRET"] = "0"
    return env

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "brivl-official"  # the official example data (MIT), shipped with the tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    try:
        fn(rank, world, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    from brivl_ds.train import exit_without_finalization

    exit_without_finalization(0)  # a ZeRO-3 engine's gloo threads can abort finalization (see there)


def run_distributed(fn, world: int, *args, triton_interpreter: bool = False, env: dict | None = None) -> None:
    """Run fn(rank, world, *args) on `world` fresh processes (spawned); raises if any rank fails.
    `triton_interpreter`: the ranks run the Triton kernels in Triton's interpreter (CPU); `env`: variables to set."""
    import torch.multiprocessing as mp

    saved, spawned = dict(os.environ), child_env(triton_interpreter, **(env or {}))
    os.environ.clear()
    os.environ.update(spawned)  # spawned processes start with this environment
    try:
        mp.spawn(_worker, args=(world, free_port(), fn, args), nprocs=world, join=True)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def deepspeed_launch(preset: str, settings: list[str], world: int = 2, timeout: int = 600,
                     env: dict | None = None) -> tuple[int, str, float]:
    """`deepspeed --num_gpus WORLD brivl_ds/train.py --preset PRESET --set ...`, as a user runs it (CPU processes
    here; `env={"DS_ACCELERATOR": "cuda"}` for GPUs): (return code, combined output, seconds)."""
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", str(world), "--master_port", str(port), "brivl_ds/train.py",
           "--preset", preset] + [a for s in settings for a in ("--set", s)]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=child_env(PYTHONUNBUFFERED="1", **(env or {})))
    # DeepSpeed's CPU all-reduce buffers (66 MiB of /dev/shm per rank) must not outlive the run, failed or not
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def deepspeed_train(preset: str, settings: list[str], world: int = 2, timeout: int = 600,
                    env: dict | None = None) -> str:
    """A run that must succeed: its output; fails the test with the output's tail otherwise."""
    returncode, output, _ = deepspeed_launch(preset, settings, world, timeout, env)
    assert returncode == 0, output[-8000:]
    return output


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Small batches: one intra-op thread avoids spin contention on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def official_fixture() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> dict[str, Path]:
    from brivl_ds.data.synthetic import ensure_shapes_dataset

    return ensure_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=256, n_eval=48, image_size=64)


@pytest.fixture(scope="session")
def tiny_model_dir(shapes_data, tmp_path_factory) -> Path:
    """An exported model folder (brivl_ds.export's layout, read by brivl_ds.load_model) of the reduced `tiny`
    preset with seeded random weights and the shapes tokenizer: for the consumers of exported models (zero-shot,
    index, service) that need the real towers but not trained ones. The quick start's trained export is in
    test_quickstart.py."""
    import torch

    from brivl_ds.config import build_config
    from brivl_ds.data.tokenizer import load_tokenizer
    from brivl_ds.inference.exported import save_exported
    from brivl_ds.models.brivl import BriVL

    cfg = build_config("tiny", ["model.image.image_size=64", f"model.text.tokenizer_path={shapes_data['tokenizer']}"])
    tokenizer = load_tokenizer(str(shapes_data["tokenizer"]))
    torch.manual_seed(0)
    towers = BriVL(cfg.model, vocab_size=len(tokenizer)).eval()
    return save_exported(towers, tokenizer, cfg, tmp_path_factory.mktemp("tiny_model"), provenance={"seed": 0})


def relative_error_to_spread(ours, reference) -> float:
    """Mean squared distance between two sets of embeddings of the same rows, as a fraction of the reference's
    variance across rows. Comparing a bf16 computation with an fp32 one, cosines alone say little: a barely
    trained model puts every row at almost the same point (cosines of 0.9999 between different captions), so
    what matters is whether the bf16 error is small against how the rows differ (about 0.04 measured for texts
    of the 6-step quick-start model; a wrong weight or input gives about 2)."""
    ours, reference = ours.double(), reference.double()
    error = (ours - reference).pow(2).sum(1).mean()
    spread = (reference - reference.mean(0)).pow(2).sum(1).mean()
    return float(error / spread)
