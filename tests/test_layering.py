"""The package's layers (README: Architecture) hold: imports go only downward, and no module imports a command.

Every `import brivl_ds...` / `from brivl_ds... import` in every module is read from its source (function-level imports
included, since lazy imports are imports too), so the test sees what the interpreter would load.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "brivl_ds"

# Lowest first. A module may import its own package and any package of a lower layer; nothing imports the commands.
LAYERS: list[tuple[str, set[str]]] = [
    ("config", {"config"}),
    ("base", {"ds_config", "distributed", "optional_deps"}),
    ("models", {"models"}),
    ("moco, data", {"moco", "data"}),
    ("parallel", {"parallel"}),
    ("construction", {"construction"}),
    ("memory, evaluation, checkpointing", {"memory", "evaluation", "checkpointing"}),
    ("resilience, inference", {"resilience", "inference"}),
    ("training", {"training"}),
    ("serving", {"serving"}),
    ("package", {"__init__"}),  # brivl_ds.load_model, for users
    ("commands", {"train", "eval", "export", "embed", "zeroshot", "retrieval", "index", "serve", "plan", "presets",
                  "bench"}),
]
LAYER_OF = {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """The layering unit of a dotted module name: its subpackage (brivl_ds.data.stream -> data) or top-level module
    (brivl_ds.config -> config); the package itself is `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def brivl_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every absolute import of brivl_ds in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "brivl_ds" else [f"brivl_ds.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names if name == "brivl_ds" or name.startswith("brivl_ds.")]
    return found


def layering_violations(files: dict[str, str]) -> list[str]:
    """Every import in `files` (module name -> source) that goes up a layer, sideways into another package of the
    same layer, or into a command module."""
    problems = []
    for module, source in files.items():
        unit = unit_of(module)
        for line, target in brivl_imports(source):
            target_unit = unit_of(target)
            if target_unit == unit:
                continue
            if target_unit not in LAYER_OF:
                problems.append(f"{module}:{line} imports {target}, whose package has no layer in LAYERS")
            elif unit not in LAYER_OF:
                problems.append(f"{module} has no layer in LAYERS")
            elif LAYER_OF[target_unit] >= LAYER_OF[unit]:
                what = "a command" if LAYERS[LAYER_OF[target_unit]][0] == "commands" else \
                    f"layer '{LAYERS[LAYER_OF[target_unit]][0]}'"
                problems.append(f"{module}:{line} (layer '{LAYERS[LAYER_OF[unit]][0]}') imports {target} ({what})")
    return problems


def package_sources() -> dict[str, str]:
    return {module_name(path): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_package_has_a_layer():
    units = {unit_of(module) for module in package_sources()}
    assert units <= set(LAYER_OF), f"add these to LAYERS (and to README's Architecture): {sorted(units - set(LAYER_OF))}"


def test_imports_go_only_downward():
    assert layering_violations(package_sources()) == []


@pytest.mark.parametrize("module, back_import, expected", [
    # the model library reaching up into data (what models/brivl.py once did for normalize_images)
    ("brivl_ds.models.brivl", "from brivl_ds.data.transforms import PairTransform", "layer 'moco, data'"),
    # a lazy import inside a function counts too
    ("brivl_ds.checkpointing.store", "def f():\n    from brivl_ds.training.trainer import Trainer\n",
     "layer 'training'"),
    # sideways, within one layer
    ("brivl_ds.moco.loss", "import brivl_ds.data.stream", "layer 'moco, data'"),
    # a library importing a command module
    ("brivl_ds.inference.exported", "from brivl_ds.eval import main", "a command"),
])
def test_a_back_import_is_caught(module, back_import, expected):
    files = package_sources()
    files[module] += "\n" + back_import + "\n"
    problems = layering_violations(files)
    assert len(problems) == 1 and problems[0].startswith(module) and expected in problems[0], problems
