"""Make a plain `pytest` (CI's command) exercise the Triton path on a CPU-only machine.

Triton picks interpreted or compiled kernels when they are defined, so `TRITON_INTERPRET=1` cannot be switched on
inside a running pytest. When neither CUDA nor the interpreter is active here, the Triton-path tests skip in this
process and this test runs tests/kernels again in a fresh interpreter with TRITON_INTERPRET=1 (about 30 s).
"""
from kernel_testing import one_cpu_thread  # noqa: F401  (fixture; imported first)

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from brivl_kernels import _dispatch, contrastive


@pytest.mark.slow
def test_triton_path_under_the_interpreter():
    if torch.cuda.is_available() or _dispatch.is_interpreted(contrastive._fwd_kernel):
        pytest.skip("the Triton-path tests already run in this process")
    here = pathlib.Path(__file__).parent
    # A process group of this process may hold MASTER_PORT: let the child pick its own rendezvous.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE",
                                                            "LOCAL_RANK")}
    env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-m", "pytest", str(here), "-q", "-p", "no:cacheprovider", "-x"],
                         cwd=here.parents[1], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in out.stdout.splitlines()[-1]
