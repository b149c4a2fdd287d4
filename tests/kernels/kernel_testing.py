"""Shared set-up of the kernel tests (a helper module, not a conftest.py: tests/conftest.py is imported by name
elsewhere, and a second conftest module would shadow it). Each test module imports it first.

It makes `brivl_kernels` importable before `pip install -e .`, and picks the device the Triton path runs on: CUDA
when present, else CPU through the Triton interpreter, which tests/conftest.py switches on for the test process
before anything imports triton (Triton reads it when kernels are defined). Where it is off anyway (an explicit
`TRITON_INTERPRET=0`), the tests of the Triton path skip and say so; the reference tests still run."""
import importlib.util
import pathlib
import sys

import pytest
import torch

try:
    import brivl_kernels  # noqa: F401
except ImportError:  # not installed yet: register kernels/ under its package name
    _root = pathlib.Path(__file__).resolve().parents[2] / "kernels"
    _spec = importlib.util.spec_from_file_location("brivl_kernels", _root / "__init__.py",
                                                   submodule_search_locations=[str(_root)])
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["brivl_kernels"] = _mod
    _spec.loader.exec_module(_mod)

from brivl_kernels import _dispatch, contrastive  # noqa: E402


@pytest.fixture
def triton_device():
    """Device on which impl='triton' runs here, or skip."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _dispatch.is_interpreted(contrastive._fwd_kernel):
        return torch.device("cpu")
    pytest.skip("Triton path needs CUDA or the interpreter (TRITON_INTERPRET=1 when Python starts)")


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Kernel tests use small tensors: one intra-op thread avoids spin contention on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
