"""The ground floor's config machinery: key=value options, builds from files and overrides."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from lpo.core import config as cfg
from lpo.core.errors import InputError


def test_parse_key_values() -> None:
    assert cfg.parse_key_values(["clip=0.01", "vqa=-1e-3"], "--min-gap") == {"clip": 0.01, "vqa": -0.001}
    with pytest.raises(InputError, match="metric=value"):
        cfg.parse_key_values(["clip:0.01"], "--min-gap")
    with pytest.raises(InputError, match="metric=value"):
        cfg.parse_key_values(["clip=high"], "--min-gap")


@dataclass
class Small:
    steps: int = cfg.option(3, "Steps.")
    name: str = cfg.option("a", "Name.")


def test_build_takes_defaults_then_the_file_then_the_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("steps: 5\nname: b\n")
    assert cfg.build(Small) == Small(3, "a")
    assert cfg.build(Small, path) == Small(5, "b")
    assert cfg.build(Small, path, steps=7, name=None) == Small(7, "b")
    path.write_text("stepz: 5\n")
    with pytest.raises(InputError, match=r"unknown keys \['stepz'\]"):
        cfg.build(Small, path)
    assert cfg.help_of(Small, "steps") == "Steps. (default: 3)"
