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
    with pytest.raises(InputError, match=r"unknown keys 'stepz' \(did you mean 'steps'\?\)"):
        cfg.build(Small, path)
    assert cfg.help_of(Small, "steps") == "Steps. (default: 3)"


@dataclass
class Typed:
    max_steps: int = cfg.option(3, "Updates.")
    lr: float = cfg.option(1e-3, "Rate.")
    plot: bool = cfg.option(False, "Plot.")
    out: Path | None = cfg.option(None, "Folder.")
    timesteps: list[int] = cfg.option(help="Levels.", factory=list)
    min_gap: dict[str, float] = cfg.option(help="Gaps.", factory=dict)


@pytest.mark.parametrize(("text", "expected"), [
    ("max-steps: 7\nlr: 1e-5\n", Typed(max_steps=7, lr=1e-5)),  # dashed keys; YAML reads 1e-5 as a string
    ("lr: 2\nout: runs/x\ntimesteps: 1,501\nmin_gap: {clip: 0}\n",
     Typed(lr=2.0, out=Path("runs/x"), timesteps=[1, 501], min_gap={"clip": 0.0})),
    ("out: null\nplot: true\n", Typed(plot=True)),
])
def test_a_config_file_gives_each_field_its_type(tmp_path: Path, text: str, expected: Typed) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    built = cfg.build(Typed, path)
    assert built == expected and type(built.lr) is float


@pytest.mark.parametrize(("text", "message"), [
    ("max_steps: five\n", "max_steps: 'five' is not an integer"),
    ("max_steps: 2.5\n", "max_steps: 2.5 is not an integer"),
    ("plot: 1\n", "plot: 1 is not true or false"),
    ("timesteps: [1, x]\n", r"timesteps\[1\]: 'x' is not an integer"),
    ("min_gap: 3\n", "min_gap: 3 is not a mapping"),
    ("max_steps: [1\n", "is not valid YAML"),
    ("- 1\n", "must hold a mapping"),
])
def test_a_config_file_with_a_wrong_value_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        cfg.build(Typed, path)
