"""Commands from config dataclasses: each field becomes one option (its default and help string from the
dataclass, `lpo.curate.config`), `--config FILE` fills the same dataclass, bad input (an `InputError`) exits with
code 2; and the rich tables the commands print. The command line (`lpo.cli`) registers every command with
`command`."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from lpo.curate.config import help_of
from lpo.curate.errors import InputError
from lpo.curate.scorers.specs import DEFAULT_MODELS, PAPER_FILTER_MODELS

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


def _thresholds(option: str) -> Callable[[list[str] | None], dict[str, float] | None]:
    def parse(values: list[str] | None) -> dict[str, float] | None:
        from lpo.curate.mpcf import parse_thresholds

        return parse_thresholds(values, option) or None

    return parse


@dataclasses.dataclass
class Field:
    """How one config field shows on the command line."""

    name: str
    annotation: Any  # the Python type Typer parses
    default: Any  # typer.Option(...) or typer.Argument(...)
    parse: Callable[[Any], Any] = lambda value: value


def _option_for(cls: type, name: str, hint: Any, *, argument: bool, required: bool, flags: tuple[str, ...],
                repeatable: bool, help_text: str | None) -> Field:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    help_text = help_text or help_of(cls, name)
    dashed = name.replace("_", "-")
    flag = flags or ((f"--{dashed}/--no-{dashed}",) if hint is bool else (f"--{dashed}",))
    if origin is list and repeatable:
        annotation, parse = Optional[list[args[0]]], lambda values: list(values) if values else None  # noqa: UP045
    elif origin is list:
        annotation = Optional[str]  # noqa: UP045
        parse = {int: _numbers(int, "1,251,501"), float: _numbers(float, "0.35,0.5")}.get(args[0], _split)
    elif origin is dict:
        annotation, parse = Optional[list[str]], _thresholds(flag[0])  # noqa: UP045
        help_text = f"metric=value: {help_text} Repeatable."
    else:
        annotation, parse = Optional[hint], lambda value: value  # noqa: UP045
    if argument:
        default = typer.Argument(... if required else None, help=help_text)
    else:
        default = typer.Option(... if required else None, *flag, help=help_text)
    return Field(name, annotation, default, parse)


def _model_option(metric: str) -> str:
    """The parameter name of a metric's model option (`t2i-color` -> `t2i_color_model`)."""
    return f"{metric.replace('-', '_')}_model"


def _model_fields(metrics: tuple[str, ...]) -> list[Field]:
    helps = {"pickscore": "PickScore model: hub id or local directory.",
             "clip": "CLIP model: hf-hub:ID, ARCH:TAG or local open_clip directory.",
             "vqa": "VQA model: vision-language hub id or directory, or t2v:MODEL.",
             "aesthetic": "Aesthetic predictor: hub id or local directory.",
             "hpsv2": "HPS v2 model: hub repo with HPS_v2_compressed.pt, a folder holding it, or the file.",
             "hpsv21": "HPS v2.1 model: hub repo with HPS_v2.1_compressed.pt, a folder holding it, or the file.",
             "imagereward": "ImageReward model: hub id or a folder with ImageReward.pt and med_config.json.",
             "geneval": "GenEval detector (a transformers Mask2Former COCO instance model), optionally ',CLIP' for "
                        "the colour classifier (open_clip spec; default ViT-L-14:openai), or a folder with "
                        "detector/ and clip/."}
    helps |= {f"t2i-{kind}": f"T2I-CompBench++ {kind} B-VQA model: a transformers BLIP VQA hub id or directory."
              for kind in ("color", "shape", "texture")}
    helps = {metric: f"{text} Default: {DEFAULT_MODELS[metric]}." for metric, text in helps.items()}
    helps["vqa"] += f" The lpo-paper filter rules: the paper's {PAPER_FILTER_MODELS['vqa']}."
    flags = {"geneval": ("--geneval-model", "--geneval-detector")}
    return [Field(_model_option(metric), Optional[str],  # noqa: UP045
                  typer.Option(None, *flags.get(metric, (f"--{metric}-model",)), help=helps[metric]))
            for metric in metrics]


def command(group: typer.Typer, name: str | None, cls: type, run: Callable[[Any], Any],
            report: Callable[[Any, Any], None], *, help: str, arguments: tuple[str, ...] = (),  # noqa: A002
            required: tuple[str, ...] = (), fixed: dict[str, Any] | None = None,
            flags: dict[str, tuple[str, ...]] | None = None, repeatable: tuple[str, ...] = (),
            helps: dict[str, str] | None = None, model_metrics: tuple[str, ...] = (), config_file: bool = True,
            callback: bool = False) -> None:
    """Register `lpo ... name`: one option per field of `cls` (arguments first), `--config FILE`, and per-metric
    `--<metric>-model` options filling the `models` field; the body builds the config and calls `run`, then
    `report(config, result)`. Bad input (an InputError) exits with code 2."""
    from lpo.curate import config as cfg

    hints = typing.get_type_hints(cls)
    fixed, flags, helps = fixed or {}, flags or {}, helps or {}
    # with `model_metrics`, the `models` field (metric -> spec) is filled from the --<metric>-model options
    names = [f.name for f in dataclasses.fields(cls) if f.name not in fixed
             and not (model_metrics and f.name == "models")]
    order = list(arguments) + [n for n in names if n not in arguments]
    fields = [_option_for(cls, n, hints[n], argument=n in arguments, required=n in required, flags=flags.get(n, ()),
                          repeatable=n in repeatable, help_text=helps.get(n)) for n in order]
    if model_metrics:
        fields += _model_fields(model_metrics)
    if config_file:
        fields.append(Field("config", Optional[Path], typer.Option(None, "--config",  # noqa: UP045
                                                                   help="YAML/JSON file with config fields.")))
    parameters = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.annotation)
                  for f in fields]
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
        models = {m: given.pop(_model_option(m)) for m in model_metrics if given.get(_model_option(m))}
        for m in model_metrics:
            given.pop(_model_option(m), None)
        try:
            overrides = {k: parse[k](v) for k, v in given.items()}
            if model_metrics:
                overrides["models"] = models or None
            config = cfg.build(cls, config_path, **overrides, **fixed)
            result = run(config)
        except InputError as err:
            console.print(f"[bold red]error:[/] {err}")
            raise typer.Exit(code=2) from None
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
    """A library function imported when the command runs (heavy imports stay out of `lpo --help`)."""

    def call(config: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), function)(config)

    return call


def stops_with_code_1(failure: str, label: str) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    """A run failure that is not bad input (training diverged, a server worker died): message and exit code 1."""

    def wrap(run: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def call(config: Any) -> Any:
            try:
                return run(config)
            except Exception as err:
                if type(err).__name__ != failure:
                    raise
                console.print(f"[bold red]{label}:[/] {err}")
                raise typer.Exit(code=1) from None

        return call

    return wrap


def table(title: str, columns: tuple[str, ...], rows: list[tuple], right: tuple[str, ...] = ()) -> None:
    rich_table = Table(title=title)
    for column in columns:
        rich_table.add_column(column, justify="right" if column in right else "left")
    for row in rows:
        rich_table.add_row(*[str(cell) for cell in row])
    out_console.print(rich_table)
