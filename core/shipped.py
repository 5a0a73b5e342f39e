"""The data that ships with lpo (`manifests/`: the toy models, the paper-table suites, the Pick-a-Pic sample), found
in a checkout and in an installed wheel alike: a path written as in the repository (`manifests/toy-models`) that does
not exist where the command runs is read from the installed package."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

SHIPPED_ROOT = "manifests"


def shipped(*parts: str) -> Path:
    """The installed copy of `manifests/<parts>`."""
    return Path(str(files("lpo").joinpath(SHIPPED_ROOT, *parts)))


def resolve_shipped(path: str | Path) -> Path:
    """`path` itself when it exists; else, for a relative path under `manifests/`, the shipped copy when that
    exists; else `path` (the caller reports it missing)."""
    path = Path(path)
    if path.exists() or path.is_absolute() or not path.parts or path.parts[0] != SHIPPED_ROOT:
        return path
    copy = shipped(*path.parts[1:])
    return copy if copy.exists() else path
