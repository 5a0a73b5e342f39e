"""Config dataclass helpers: one default per field, help text beside it, YAML files and CLI overrides on top."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from lpo.core.errors import InputError
from lpo.core.files import write_text_atomic

T = TypeVar("T")


def option(default: Any = None, help: str = "", factory: Any = None) -> Any:  # noqa: A002 - mirrors Typer's name
    """A dataclass field that carries its help string (shown by `--help` and in manifests/README.md)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def help_of(cls: type, name: str) -> str:
    """The help string of field `name`, with its default, for a Typer option."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    text = field.metadata.get("help", "")
    if default is None or default == "" or default == [] or default == {}:
        return text
    return f"{text} (default: {_show(default)})"


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def build(cls: type[T], config_file: str | Path | None = None, **overrides: Any) -> T:
    """Fill `cls` from defaults, then a YAML/JSON file, then the overrides that are not None."""
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(_read_config_file(Path(config_file), cls.__name__))
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(
            f"config file {config_file} has unknown keys {unknown} for {cls.__name__}; "
            f"the known keys are {sorted(known)}."
        )
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"{cls.__name__} has no fields {unknown}")
    return cls(**values)


def _read_config_file(path: Path, name: str) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"config file {path} does not exist; pass a YAML or JSON file with {name} fields.")
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(
            f"config file {path} must hold a mapping of field names to values, not {type(data).__name__}."
        )
    return data


def parse_key_values(values: list[str] | None, option_name: str) -> dict[str, float]:
    """Parse repeated `key=value` options (`--min-gap clip=0.01`) into numbers by key."""
    out: dict[str, float] = {}
    for item in values or []:
        key, sep, number = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[key.strip()] = float(number)
        except ValueError:
            raise InputError(
                f"{option_name} '{item}' is not of the form metric=value, e.g. {option_name} clip=0.01."
            ) from None
    return out


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (paths as strings)."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        out[field.name] = str(value) if isinstance(value, Path) else value
    return out


def save(config: Any, path: str | Path) -> Path:
    """Write the resolved config next to an output, so every run says how it was made."""
    return write_text_atomic(json.dumps(to_dict(config), indent=2, default=str) + "\n", path)
