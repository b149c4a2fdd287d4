"""What `pip install .` ships: every package folder of brivl_ds is listed in setup.py (a missing one installs
fine in editable mode and breaks a regular install)."""
import ast

from conftest import REPO


def test_setup_lists_every_package():
    tree = ast.parse((REPO / "setup.py").read_text())
    listed = next(ast.literal_eval(k.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                  for k in node.keywords if k.arg == "packages")
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "brivl_ds").rglob("__init__.py")}
    assert found <= set(listed), found - set(listed)
