"""Config dataclass helpers: one default per field, help text beside it, YAML files and CLI overrides on top."""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

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
    """Fill `cls` from defaults, then a YAML/JSON file, then the overrides that are not None. A file's keys may be
    written with dashes as on the command line (`max-steps`); each value must have its field's type."""
    known = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    if config_file is not None:
        unknown = []
        for key, value in _read_config_file(Path(config_file), cls.__name__).items():
            name = str(key).replace("-", "_")
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                unknown.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
                continue
            values[name] = _typed(value, hints[name], key, config_file)
        if unknown:
            raise InputError(f"config file {config_file} has unknown keys {', '.join(unknown)}; the keys are the "
                             f"command's option names (with dashes or underscores): {', '.join(sorted(known))}.")
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"{cls.__name__} has no fields {unknown}")
    return cls(**values)


def _typed(value: Any, hint: Any, key: str, source: str | Path) -> Any:
    """`value` as the type `hint` names (an int where a float is asked is a float, a string a Path), or an
    InputError naming the key, the value and the type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    wanted = {int: "an integer", float: "a number", bool: "true or false", str: "a string", Path: "a path"}.get(
        hint, "a list" if origin is list else "a mapping" if origin is dict else getattr(hint, "__name__", str(hint)))

    def refuse() -> InputError:
        return InputError(f"config file {source}: {key}: {value!r} is not {wanted}; give {wanted}.")

    if origin is list:
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise refuse()
        return [_typed(item, args[0], f"{key}[{i}]", source) for i, item in enumerate(items)]
    if origin is dict:
        if not isinstance(value, dict):
            raise refuse()
        return {str(k): _typed(v, args[1], f"{key}.{k}", source) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise refuse()
        return value
    if isinstance(value, str) and hint in (int, float):  # YAML reads `1e-5` (no dot) as a string
        try:
            value = hint(value)
        except ValueError:
            raise refuse() from None
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise refuse()
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise refuse()
        return float(value)
    if hint is Path:
        if not isinstance(value, str):
            raise refuse()
        return Path(value)
    if hint is str:
        if not isinstance(value, str):
            raise refuse()
        return value
    return value


def _read_config_file(path: Path, name: str) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"config file {path} does not exist; pass a YAML or JSON file with {name} fields.")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise InputError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({err}); "
                         "fix the file.") from None
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


def check_positive(**values: int | None) -> None:
    """Each given count at least 1 (None: not given), or an InputError naming every one that is not."""
    bad = [f"--{name.replace('_', '-')} {value}" for name, value in values.items() if value is not None and value < 1]
    if bad:
        raise InputError(f"{', '.join(bad)}: must be at least 1.")


def check_rules(rules: list[tuple[str, Any, bool, str]]) -> None:
    """Each (field, value, holds, rule): an InputError naming the first option whose value breaks its rule."""
    for name, value, holds, rule in rules:
        if not holds:
            raise InputError(f"--{name.replace('_', '-')} {value} must be {rule}.")


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
