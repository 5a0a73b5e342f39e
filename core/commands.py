"""Commands from config dataclasses: each field becomes one option (its default and help string from the
dataclass, `lpo.core.config`), `--config FILE` fills the same dataclass; bad input (an `InputError`) exits with
code 2 and a run that failed after it started (a `RunFailed`) with code 1; and the rich tables the commands print.
The command line (`lpo.cli`) registers every command with `command`."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from lpo.core import config as cfg
from lpo.core.errors import InputError, RunFailed

console = Console(stderr=True)
out_console = Console()


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _numbers(kind: type, example: str) -> Callable[[str | None], list | None]:
    def parse(value: str | None) -> list | None:
        try:
            return [kind(v) for v in _split(value)] if value else None
        except ValueError:
            raise InputError(f"'{value}' is not a comma-separated list of numbers, e.g. {example}.") from None

    return parse


def _key_values(option: str) -> Callable[[list[str] | None], dict[str, float] | None]:
    def parse(values: list[str] | None) -> dict[str, float] | None:
        return cfg.parse_key_values(values, option) or None

    return parse


@dataclasses.dataclass
class Field:
    """How one config field (or one extra option) shows on the command line."""

    name: str  # the Python parameter name
    annotation: Any  # the Python type Typer parses
    flags: tuple[str, ...]  # empty for a positional argument
    help: str
    required: bool = False
    parse: Callable[[Any], Any] = lambda value: value

    def parameter(self) -> inspect.Parameter:
        # a required value may come from --config too, so the command checks it once the config is built
        text = f"{self.help} Required (here or in --config)." if self.required else self.help
        if self.flags:
            default = typer.Option(None, *self.flags, help=text, show_default=False)
        else:
            default = typer.Argument(None, help=text, show_default=False)
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                 annotation=self.annotation)


@dataclasses.dataclass
class OptionGroup:
    """Options that fill one config field together, e.g. the `--<metric>-model` options that fill `models`:
    `collect` turns their given values (by parameter name; None when not given) into the field's value (None:
    keep the config's)."""

    field: str
    options: list[Field]
    collect: Callable[[dict[str, Any]], Any]


def _field_for(cls: type, name: str, hint: Any, *, argument: bool, required: bool, flags: tuple[str, ...],
               repeatable: bool, help_text: str | None) -> Field:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    help_text = help_text or cfg.help_of(cls, name)
    dashed = name.replace("_", "-")
    flag = flags or ((f"--{dashed}/--no-{dashed}",) if hint is bool else (f"--{dashed}",))
    parse: Callable[[Any], Any] = lambda value: value  # noqa: E731
    if origin is list and repeatable:
        annotation, parse = Optional[list[args[0]]], lambda values: list(values) if values else None  # noqa: UP045
    elif origin is list:
        annotation = Optional[str]  # noqa: UP045
        parse = {int: _numbers(int, "1,251,501"), float: _numbers(float, "0.35,0.5")}.get(args[0], _split)
    elif origin is dict:
        annotation, parse = Optional[list[str]], _key_values(flag[0])  # noqa: UP045
        help_text = f"metric=value: {help_text} Repeatable."
    else:
        annotation = Optional[hint]  # noqa: UP045
    return Field(name, annotation, () if argument else flag, help_text, required, parse)


def command(group: typer.Typer, name: str | None, cls: type, run: Callable[[Any], Any],
            report: Callable[[Any, Any], None], *, help: str, arguments: tuple[str, ...] = (),  # noqa: A002
            required: tuple[str, ...] = (), fixed: dict[str, Any] | None = None,
            flags: dict[str, tuple[str, ...]] | None = None, repeatable: tuple[str, ...] = (),
            helps: dict[str, str] | None = None, options: OptionGroup | None = None, config_file: bool = True,
            callback: bool = False, failure: str = "run failed") -> None:
    """Register `lpo ... name`: one option per field of `cls` (arguments first), `--config FILE`, and the options
    of `options` filling their field; the body builds the config and calls `run`, then `report(config, result)`.
    Bad input (an InputError) exits with code 2; a RunFailed prints `failure: message` and exits with code 1."""
    hints = typing.get_type_hints(cls)
    fixed, flags, helps = fixed or {}, flags or {}, helps or {}
    names = [f.name for f in dataclasses.fields(cls) if f.name not in fixed
             and not (options and f.name == options.field)]
    order = list(arguments) + [n for n in names if n not in arguments]
    fields = [_field_for(cls, n, hints[n], argument=n in arguments, required=n in required, flags=flags.get(n, ()),
                         repeatable=n in repeatable, help_text=helps.get(n)) for n in order]
    extra = options.options if options else []
    fields += extra
    if config_file:
        fields.append(Field("config", Optional[Path], ("--config",), "YAML/JSON file with config fields."))  # noqa: UP045
    parameters = [f.parameter() for f in fields]
    if callback:
        parameters.insert(0, inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))
    parse = {f.name: f.parse for f in fields}

    def body(**given: Any) -> None:
        ctx = given.pop("ctx", None)
        if ctx is not None:
            if ctx.invoked_subcommand is not None:
                return
            if all(v is None for v in given.values()):
                typer.echo(ctx.get_help())
                raise typer.Exit(0)
        config_path = given.pop("config", None)
        grouped = {f.name: given.pop(f.name, None) for f in extra}
        try:
            overrides = {k: parse[k](v) for k, v in given.items()}
            if options:
                overrides[options.field] = options.collect(grouped)
            config = cfg.build(cls, config_path, **overrides, **fixed)
            missing = [f.flags[0].split("/")[0] if f.flags else f.name.upper() for f in fields
                       if f.required and getattr(config, f.name, None) in (None, "", [])]
            if missing:
                raise InputError(f"missing {', '.join(missing)}: give {'it' if len(missing) == 1 else 'them'} on "
                                 "the command line or in --config.")
            result = run(config)
        except InputError as err:
            console.print(f"[bold red]error:[/] {err}")
            raise typer.Exit(code=2) from None
        except RunFailed as err:
            console.print(f"[bold red]{failure}:[/] {err}")
            raise typer.Exit(code=1) from None
        report(config, result)

    body.__signature__ = inspect.Signature(parameters)
    body.__annotations__ = {p.name: p.annotation for p in parameters}
    body.__doc__ = help
    body.__name__ = (name or "callback").replace("-", "_")
    if callback:
        group.callback()(body)
    else:
        group.command(name, help=help)(body)


def lazy(module: str, function: str) -> Callable[[Any], Any]:
    """A library function imported when the command runs: the command line's edge, where heavy imports stay out of
    `lpo --help`."""

    def call(config: Any) -> Any:
        return getattr(importlib.import_module(module), function)(config)

    return call


def table(title: str, columns: tuple[str, ...], rows: list[tuple], right: tuple[str, ...] = ()) -> None:
    rich_table = Table(title=title)
    for column in columns:
        rich_table.add_column(column, justify="right" if column in right else "left")
    for row in rows:
        rich_table.add_row(*[str(cell) for cell in row])
    out_console.print(rich_table)
