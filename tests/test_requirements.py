"""requirements.txt declares what the code imports from outside the standard library, and nothing beyond the agreed
set of dependencies."""
import ast
import importlib
import re
import sys

from conftest import ROOT

AGREED = {"torch", "torchvision", "numpy", "pillow", "einops", "matplotlib", "tqdm"}
IMPORT_NAME = {"pillow": "PIL"}


def _declared():
    names = set()
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[<>=!~\[ ]", line)[0].lower())
    return names


def _third_party_imports():
    local = {p.stem for p in ROOT.glob("*.py")}
    found = set()
    for path in ROOT.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - local - set(sys.stdlib_module_names) - {"__future__"}


def test_requirements_match_the_imports_and_the_agreed_set():
    """Every package the scripts import is declared, every declared package is agreed and imports, none is unused."""
    declared = _declared()
    assert declared <= AGREED, f"requirements.txt names packages outside the agreed set: {sorted(declared - AGREED)}"
    imported = _third_party_imports()
    by_import_name = {IMPORT_NAME.get(name, name): name for name in declared}
    assert imported <= set(by_import_name), f"imported but not declared: {sorted(imported - set(by_import_name))}"
    assert set(by_import_name) <= imported, f"declared but never imported: {sorted(set(by_import_name) - imported)}"
    for name in by_import_name:
        importlib.import_module(name)
