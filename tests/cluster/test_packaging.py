"""The wheel holds every package: pyproject.toml lists packages by hand (package-dir maps
top-level folders into one namespace), and an editable install finds a package that the
list forgets, so only a wheel (the Docker image) would miss it."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir = setuptools["package-dir"]
    found = set()
    for package, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            if "__pycache__" not in relative:
                found.add(".".join((package, *relative)))
    assert sorted(found - set(setuptools["packages"])) == [], "add them to packages"
    assert sorted(set(setuptools["packages"]) - found) == [], "listed but not folders"
