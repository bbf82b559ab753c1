"""Imports flow one way: cli -> simulations -> server, client -> strategies -> core.

Every module of the installed ``pollen`` package (the packages pyproject.toml lists,
found where the install maps them) is read with ``ast``, imports inside functions
included; nothing is imported, so a broken module is still checked.
"""

import ast
import importlib.util
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
UPPER = ("cli", "simulations", "server", "client", "strategies")
# What each layer may import (itself included), and the rule a violation breaks.
ALLOWED = {
    "core": ({"core"}, "core imports none of cli, simulations, server, client, strategies"),
    "strategies": ({"strategies", "core"}, "strategies import only core"),
    "server": ({"server", "strategies", "core"}, "server imports only strategies and core"),
    "client": ({"client", "strategies", "core"}, "client imports only strategies and core"),
    "simulations": ({"simulations", "server", "client", "strategies", "core"}, "simulations never import cli"),
    "cli": ({"core", *UPPER}, ""),
}
BARE = {"server", "client", "strategies", "simulations"}  # installed only as pollen.<name>


def modules() -> dict[str, Path]:
    """Module name -> source file, for every module of every package of the install."""
    found = {}
    for package in PACKAGES:
        folder = Path(importlib.util.find_spec(package).submodule_search_locations[0])
        for path in sorted(folder.glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imported(module: str, path: Path, known: set[str]) -> list[str]:
    """Absolute names ``module`` imports anywhere in its source; ``from a import b`` names a.b if b is a module."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]) if node.level else ""
            source = ".".join(part for part in (base, node.module) if part)
            names += [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                      for alias in node.names]
    return names


def layer(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "pollen":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in UPPER else "core"


def test_every_layer_is_a_package_of_the_install():
    assert {"pollen", *(f"pollen.{name}" for name in UPPER)} <= set(PACKAGES) <= set(modules())


def test_imports_flow_one_way():
    found = modules()
    violations = []
    for module, path in found.items():
        allowed, rule = ALLOWED[layer(module)]
        violations += [f"{module} -> {name} ({rule})" for name in imported(module, path, set(found))
                       if layer(name) not in (None, *allowed)]
    assert not violations, "imports against the direction:\n" + "\n".join(sorted(set(violations)))


def test_nothing_imports_the_bare_top_level_names():
    files = {**modules(), **{str(path.relative_to(ROOT)): path for folder in ("tests", "benchmarks")
                             for path in sorted((ROOT / folder).rglob("*.py"))}}
    violations = [f"{module} -> {name} (import pollen.{name.split('.')[0]}, the installed name)"
                  for module, path in files.items() for name in imported(module, path, set())
                  if name.split(".")[0] in BARE]
    assert not violations, "imports of names that are not installed:\n" + "\n".join(sorted(set(violations)))
