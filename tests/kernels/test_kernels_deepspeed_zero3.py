"""AdamWHalfStates as a DeepSpeed ZeRO-3 client optimizer (one process, gloo, CPU), checkpoint resume, and the
memory per parameter of the precision recipes. The first DeepSpeed run in a fresh cache JIT-builds a comm op (~40 s;
cached under TORCH_EXTENSIONS_DIR)."""
from kernel_testing import one_cpu_thread, triton_device  # noqa: F401  (fixtures; imported first)

import json
import os
import pathlib

import pytest
import torch

from brivl_kernels import AdamWHalfStates, zero_memory

deepspeed = pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

CONFIG = {
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,  # DeepSpeed's default is also 1.0; set explicitly so nobody is surprised
    "zero_optimization": {"stage": 3},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 10**9,
}


@pytest.fixture(scope="module", autouse=True)
def process_group():
    saved = dict(os.environ)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/brivl_ds/torch_extensions"))
    zero_memory.init_single_process()  # RANK=0 WORLD_SIZE=1, a free MASTER_PORT, DS_ACCELERATOR=cpu, gloo
    yield
    # Leave nothing behind: later tests start subprocesses that inherit os.environ (a stale MASTER_PORT that this
    # process still listens on would make their rendezvous fail).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def make_engine(impl, init_seed):
    torch.manual_seed(init_seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    opt = AdamWHalfStates([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=1e-2, impl=impl)
    engine, zero_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=CONFIG)
    return engine, zero_opt


def data(n):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 4, generator=g)
    xs = [torch.randn(8, 16, generator=g) for _ in range(n)]
    return [(x, torch.tanh(x @ w)) for x in xs]


def run(engine, batches):
    losses = []
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_zero3_client_optimizer_trains_saves_and_resumes(tmp_path, impl, request):
    if impl == "triton":
        request.getfixturevalue("triton_device")  # CUDA or the interpreter, else skip
    batches = data(30)
    engine, zero_opt = make_engine(impl, init_seed=0)
    first = run(engine, batches[:20])
    assert sum(first[-5:]) < 0.5 * sum(first[:5])  # it trains
    inner = zero_opt.optimizer
    assert isinstance(inner, AdamWHalfStates)
    states = [st for st in inner.state.values() if st]
    assert states and all(st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg"].dim() == 1 for st in states)
    engine.save_checkpoint(str(tmp_path), tag="step20")
    expected = run(engine, batches[20:])

    fresh, fresh_opt = make_engine(impl, init_seed=123)  # different weights until the checkpoint is loaded
    fresh.load_checkpoint(str(tmp_path), tag="step20")
    loaded = [st for st in fresh_opt.optimizer.state.values() if st]
    assert all(st["exp_avg_sq"].dtype == torch.bfloat16 and st["step"] == 20 for st in loaded)
    assert run(fresh, batches[20:]) == expected  # bit-identical continuation


def test_memory_per_parameter_of_the_recipes():
    """Bytes per parameter ZeRO-3 holds, counted from the live tensors, column by column: the README's "12 bytes per
    parameter with bf16 weights instead of 16" (AdamWHalfStates vs torch AdamW) and "10 instead of 12" (DeepSpeed's
    bf16 master weights and states vs AdamWHalfStates)."""
    columns = ("weights (partitions)", "master weights", "gradients", "optimizer states", "total")
    expected = {  # weights, fp32 (or bf16) master, gradients, two Adam moments
        "fp32 weights, torch AdamW (fp32 states)": (4, 4, 4, 8, 20),
        "fp32 weights, AdamWHalfStates": (4, 4, 4, 4, 16),
        "bf16 weights + fp32 master, torch AdamW (fp32 states)": (2, 4, 2, 8, 16),
        "bf16 weights + fp32 master, AdamWHalfStates": (2, 4, 2, 4, 12),
        "bf16 weights, DeepSpeed bf16_master_weights_and_grads + bf16_optimizer_states": (2, 2, 2, 4, 10),
    }
    assert list(expected) == list(zero_memory.RECIPES)
    for name, row in expected.items():
        measured = zero_memory.measure(name, width=128, layers=2)
        # abs 0.05: ZeRO-3 pads each partition to an alignment, a fraction of a percent of these 33 k parameters
        assert [measured[c] for c in columns] == pytest.approx(row, abs=0.05), name
        assert measured["state dtypes"] == ("float32" if "torch AdamW" in name else "bfloat16"), name


def _example_config():
    path = pathlib.Path(__file__).resolve().parents[2] / "ds_configs" / "paper-1b-bf16-states.json"
    return json.loads(path.read_text())


def test_bf16_optimizer_states_example_config_keeps_bf16_master_and_states():
    """The example ds_config builds a ZeRO-3 engine whose master weights and Adam moments are bf16 (a client
    torch AdamW here: its state follows the bf16 master partitions, as DeepSpeed's own AdamW does on GPU)."""
    cfg = {**_example_config(), "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0}
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    engine, zero_opt, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                                  config=cfg)
    for _ in range(2):
        engine.backward(engine(torch.randn(4, 16, dtype=torch.bfloat16)).float().pow(2).mean())
        engine.step()
    assert all(t.dtype == torch.bfloat16 for t in zero_opt.fp32_partitioned_groups_flat)
    states = [v for st in zero_opt.optimizer.state.values() for k, v in st.items() if k.startswith("exp_avg")]
    assert states and all(v.dtype == torch.bfloat16 for v in states)
