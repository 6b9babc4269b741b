"""Imports only go down: each package imports only the packages below it, and nothing imports a script.

Floors: the scripts and ``benchmarks/`` on top, ``transformer/`` in the middle, ``vqgan/``, ``dataloader/``
and ``utils/`` at the ground, where ``utils/`` imports none of the others. Imports inside functions count.
"""

from __future__ import annotations

import ast

import pytest
from tiny_training import REPO

SCRIPTS = {"train_vqgan", "train_transformer", "generate"}
FORBIDDEN = {
    "utils": {"vqgan", "transformer", "dataloader", "benchmarks", *SCRIPTS},
    "dataloader": {"vqgan", "transformer", "benchmarks", *SCRIPTS},
    "vqgan": {"transformer", "dataloader", "benchmarks", *SCRIPTS},
    "transformer": {"dataloader", "benchmarks", *SCRIPTS},
    "benchmarks": SCRIPTS,
}


def imported_packages(path) -> set[str]:
    """The top-level names of every absolute import in the file at ``path``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_only_go_down(package: str) -> None:
    upward = {str(path.relative_to(REPO)): sorted(imported_packages(path) & FORBIDDEN[package])
              for path in sorted((REPO / package).rglob("*.py"))}
    assert {path: names for path, names in upward.items() if names} == {}
