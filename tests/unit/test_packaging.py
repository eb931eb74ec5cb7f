"""pyproject.toml lists its packages by hand: every package folder must be in the list, or an
installed (non-editable) onerec silently lacks it."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _packages_under(folder: str, installed_as: str) -> set[str]:
    """Dotted names of the package folders below REPO/folder, as they install."""
    names = set()
    for init in (REPO / folder).rglob("__init__.py"):
        parts = init.parent.relative_to(REPO / folder).parts
        names.add(".".join((installed_as, *parts)))
    return names


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = _packages_under("onerec", "onerec") | _packages_under("kernels", "onerec.kernels")
    assert found - listed == set(), f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert "onerec.stages" in found and "onerec.kernels.moe_routing" in found  # the walk sees real folders
