"""What `pip install .` ships: every package folder of brivl_ds is listed in setup.py (a missing one installs
fine in editable mode and breaks a regular install); the after-training packages are extras, and a command that
needs a missing one names the extra."""
import ast

from conftest import REPO


def test_setup_lists_every_package():
    tree = ast.parse((REPO / "setup.py").read_text())
    listed = next(ast.literal_eval(k.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                  for k in node.keywords if k.arg == "packages")
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "brivl_ds").rglob("__init__.py")}
    assert found <= set(listed), found - set(listed)


AFTER_TRAINING = {"faiss-cpu", "fastapi", "uvicorn", "prometheus-client", "matplotlib"}
EXTRA_MODULES = ("faiss", "fastapi", "uvicorn", "prometheus_client", "matplotlib")
NEEDS_AN_EXTRA = {"brivl_ds.serving.app", "brivl_ds.index", "brivl_ds.inference.vector_index"}  # at import


def setup_arguments() -> dict:
    """The keyword arguments setup.py passes to setuptools.setup."""
    import runpy
    from unittest import mock

    import setuptools

    captured = {}
    with mock.patch.object(setuptools, "setup", lambda **kw: captured.update(kw)):
        runpy.run_path(str(REPO / "setup.py"))
    return captured


def test_after_training_packages_are_extras():
    """`pip install -e .` (a training node) pulls none of them; the extras do, and `.[test]` (README command 2,
    which runs every test) all of them."""
    import re

    args = setup_arguments()
    required = {re.split(r"[<>=!~\[; ]", r)[0].lower() for r in args["install_requires"]}
    assert not required & AFTER_TRAINING, required & AFTER_TRAINING
    extras = {name: set(packages) for name, packages in args["extras_require"].items()}
    assert extras["serve"] == {"fastapi", "uvicorn", "prometheus-client", "faiss-cpu"}
    assert extras["index"] == {"faiss-cpu"} and extras["zeroshot"] == {"matplotlib"}
    assert extras["inference"] == AFTER_TRAINING
    assert AFTER_TRAINING | {"pytest", "hypothesis", "httpx"} <= extras["test"]


def test_only_the_after_training_modules_need_an_extra():
    """Every module of brivl_ds imports with the extras' packages missing (the trainer, the launcher, the eval,
    export, embed, zeroshot and retrieval commands among them), except the service app and the vector index."""
    import subprocess
    import sys

    code = f"""
import importlib, pkgutil, sys
for name in {EXTRA_MODULES!r}:
    sys.modules[name] = None  # as if not installed
import brivl_ds
failed = []
for module in pkgutil.walk_packages(brivl_ds.__path__, "brivl_ds."):
    if module.name in {sorted(NEEDS_AN_EXTRA)!r}:
        continue
    try:
        importlib.import_module(module.name)
    except ImportError as err:
        failed.append(f"{{module.name}}: {{err}}")
print(failed)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-3000:]


def test_a_missing_extra_is_named(monkeypatch):
    """Where an extra's package is imported, its absence is an ImportError that says what to install."""
    import importlib
    import sys

    import pytest

    from brivl_ds.optional_deps import require

    for module, extra, importer in (("faiss", "index", "brivl_ds.inference.vector_index"),
                                    ("fastapi", "serve", "brivl_ds.serving.app"),
                                    ("prometheus_client", "serve", "brivl_ds.serving.app"),
                                    ("uvicorn", "serve", None), ("matplotlib", "zeroshot", None)):
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, module, None)  # as if not installed
            message = rf"{module} is not installed.* pip install 'brivl-ds\[{extra}\]'"
            with pytest.raises(ImportError, match=message):
                require(module, extra)
            if importer:  # imported afresh, as in a process without the package
                patch.delitem(sys.modules, importer, raising=False)
                with pytest.raises(ImportError, match=message):
                    importlib.import_module(importer)
    from brivl_ds.evaluation.zeroshot import plot_confusion

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'brivl-ds\[zeroshot\]'"):
        plot_confusion([[1]], ["a"], "unused.png")
