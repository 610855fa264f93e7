"""What the wheel ships: every package of faas_provider, and the templates beside it."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed_for_the_wheel() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    on_disk = {
        ".".join(path.parent.relative_to(REPO).parts)
        for path in (REPO / "faas_provider").rglob("*.py")
    }
    assert on_disk - listed == set(), "a package missing here is missing from the wheel"
    assert "faas_provider.templates" in listed
    link = REPO / "faas_provider" / "templates"
    assert link.is_symlink() and link.resolve() == REPO / "templates"


def test_the_templates_are_package_data() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["faas_provider.templates"]
    templates = sorted(path.name for path in (REPO / "templates").iterdir())
    assert templates and all(any(Path(t).match(p) for p in patterns) for t in templates)
