"""The import rules of docs/design.md ("Where things are") that a newcomer cannot see by reading
one file: the library imports no click (only the commands do), and ``progressive/`` imports
nothing of ``metrics/`` (the demo's scorer is passed in by the script ``progressive/train.py``)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import triangle

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"triangle.progressive.train"}  # a command that lives in the library's folder
PACKAGES = ("networks", "datasets", "progressive", "metrics")


def library_modules() -> list[str]:
    names = [triangle.__name__ + "." + m.name for m in pkgutil.iter_modules(triangle.__path__)]
    for package in PACKAGES:
        module = __import__(f"triangle.{package}", fromlist=["_"])
        names.append(module.__name__)
        names += [f"{module.__name__}.{m.name}" for m in pkgutil.iter_modules(module.__path__)]
    return sorted(set(names) - SCRIPTS)


def loaded_after_importing(modules: list[str]) -> set[str]:
    """The names in ``sys.modules`` of a fresh interpreter after importing ``modules``."""
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print('\\n'.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    return set(out.split())


def test_the_library_imports_no_click():
    modules = library_modules()
    assert "triangle.progressive.training_loop" in modules and "triangle.networks.__main__" in modules
    assert "click" not in loaded_after_importing(modules)


def test_progressive_imports_nothing_of_metrics():
    modules = [m for m in library_modules() if m.startswith("triangle.progressive")]
    assert "triangle.progressive.reporter" in modules
    loaded = loaded_after_importing(modules)
    assert "triangle.progressive.training_loop" in loaded
    assert not [m for m in loaded if m.startswith("triangle.metrics")]
