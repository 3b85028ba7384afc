"""The declared requirements are exactly what the code may import from outside the standard library."""
import importlib
import re

from conftest import ROOT

ALLOWED = {"torch", "torchvision", "numpy", "pillow", "einops", "matplotlib", "tqdm"}
IMPORT_NAME = {"pillow": "PIL"}


def _declared():
    names = set()
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[<>=!~\[ ]", line)[0].lower())
    return names


def test_requirements_are_the_agreed_set_and_import():
    """requirements.txt names exactly the agreed packages, and each of them imports."""
    declared = _declared()
    assert declared == ALLOWED, f"requirements.txt differs from the agreed set: {sorted(declared ^ ALLOWED)}"
    for name in declared:
        importlib.import_module(IMPORT_NAME.get(name, name))
