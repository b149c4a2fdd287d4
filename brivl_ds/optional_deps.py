"""Optional dependencies: the packages only the after-training commands need come with pip extras of brivl-ds
(setup.py), so that a training node installs none of them. `require` turns a missing one into an error that names
the extra to install."""
from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {
    "serve": "the HTTP service (python -m brivl_ds.serve)",
    "index": "the vector index (python -m brivl_ds.index, and the service's search)",
    "zeroshot": "the zero-shot confusion-matrix plot (python -m brivl_ds.zeroshot)",
}


def require(module: str, extra: str) -> ModuleType:
    """`module` imported, or an ImportError naming the pip extra of brivl-ds that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{module} is not installed; it is needed by {EXTRAS[extra]}: "
                          f"pip install 'brivl-ds[{extra}]' (or '.[{extra}]' in a clone)") from err
