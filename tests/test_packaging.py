"""One installed package: the wheel holds ``pollen`` and nothing else at the top level.

The wheel is built offline from a copy of the sources pyproject.toml names, so the build
leaves nothing (build/, *.egg-info) in the working tree.
"""

import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Iterator[zipfile.ZipFile]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", pyproject["project"]["readme"]):
        shutil.copy(ROOT / name, source / name)
    for folder in {"pollen", *pyproject["tool"]["setuptools"]["package-dir"].values()}:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "--no-index", "--quiet", "-w", str(out)], check=True, cwd=source)
    (path,) = out.glob("pollen-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def test_pollen_is_the_only_top_level_name(wheel):
    names = wheel.namelist()
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"pollen"}
    (top_level,) = [name for name in names if name.endswith(".dist-info/top_level.txt")]
    assert wheel.read(top_level).decode().split() == ["pollen"]


def test_subpackages_and_default_config_are_inside(wheel):
    assert {"pollen/simulations/configs/default.yaml", "pollen/server/app.py", "pollen/client/app.py",
            "pollen/strategies/__init__.py", "pollen/cli/__init__.py"} <= set(wheel.namelist())
