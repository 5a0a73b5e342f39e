"""Write docs/cli.md, the command-line reference, from the `lpo` Typer app itself.

Every option of every command is a field of that command's config dataclass (`lpo.cli` registers them with their
help strings and defaults), so the reference is read from the built click commands and cannot drift from the code:
`tests/test_docs.py` regenerates it and fails when the committed page differs. Run after changing an option:

    python docs/gen_cli_reference.py

The output depends on the code alone (no terminal width, no environment). Importing `lpo.cli` loads no torch.
"""

from __future__ import annotations

import re
import sys
import textwrap
import typing
from pathlib import Path

PAGE = Path(__file__).with_name("cli.md")
WIDTH = 119

HEADER = """\
# Command-line reference

Generated from the `lpo` command line by `python docs/gen_cli_reference.py`; do not edit by hand
(`tests/test_docs.py` fails when this page and the code disagree). Every command's options are the fields of its
config dataclass: `--config FILE` (YAML or JSON) takes the same field names, with `_` for `-`, and options given on
the command line override the file. `lpo COMMAND --help` prints the same text in the terminal.
"""


def _type_name(param: typing.Any) -> str:
    """A short name for the value an option takes."""
    if getattr(param, "is_flag", False):
        return "flag"
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if annotation is None:  # a plain click parameter
        return getattr(getattr(param, "type", None), "name", "text")
    if typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    names = {str: "text", int: "integer", float: "number", bool: "flag", Path: "path"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _escape(text: str) -> str:
    """Markdown-safe text: code spans kept as they are, the characters Markdown would read escaped elsewhere."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(part)
        else:
            part = part.replace("\\", "\\\\")
            for char in "*_[]":
                part = part.replace(char, "\\" + char)
            out.append(part.replace("<", "&lt;").replace(">", "&gt;"))
    return "".join(out)


def _wrap(text: str, first: str, rest: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=rest, break_long_words=False,
                         break_on_hyphens=False)


def _param_line(param: typing.Any) -> list[str]:
    if getattr(param, "hidden", False):
        return []
    argument = type(param).__name__.endswith("Argument")
    names = [param.name.upper()] if argument else list(param.opts) + list(param.secondary_opts)
    shown = " / ".join(f"`{name}`" for name in names)
    facts = [("argument, " if argument else "") + _type_name(param)]
    if getattr(param, "multiple", False):
        facts.append("repeatable")
    if param.required:
        facts.append("required")
    help_text = " ".join((getattr(param, "help", None) or "").split())
    default = param.default
    if (default not in (None, False, (), []) and not param.required and "default:" not in help_text
            and not callable(default)):
        help_text = f"{help_text} (default: {default})".strip()
    line = f"- {shown} ({', '.join(facts)})" + (f": {_escape(help_text)}" if help_text else "")
    return _wrap(line, "", "  ")


def _commands(command: typing.Any, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], typing.Any]]:
    found = [(path, command)]
    for name, sub in getattr(command, "commands", {}).items():
        if not getattr(sub, "hidden", False):
            found += _commands(sub, (*path, name))
    return found


def _slug(title: str) -> str:
    return re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", title.lower()).strip())


def render() -> str:
    """The page, as a string."""
    import typer.main

    from lpo.cli import app

    root = typer.main.get_command(app)
    commands = _commands(root, ("lpo",))
    lines = HEADER.splitlines() + ["", "Commands:", ""]
    for path, _ in commands:
        title = " ".join(path)
        lines.append(f"{'  ' * (len(path) - 1)}- [{title}](#{_slug(title)})")
    for path, command in commands:
        title = " ".join(path)
        lines += ["", f"## {title}", ""]
        help_text = " ".join((command.help or "").split())
        if help_text:
            lines += _wrap(_escape(help_text), "", "")
            lines.append("")
        subcommands = [name for name, sub in getattr(command, "commands", {}).items()
                       if not getattr(sub, "hidden", False)]
        usage = title + (" [OPTIONS]" if command.params else "")
        usage += "".join(f" {p.name.upper()}" for p in command.params if type(p).__name__.endswith("Argument"))
        if subcommands:
            usage += " COMMAND"
        lines += ["```", usage, "```", ""]
        params = [line for param in command.params for line in _param_line(param)]
        if params:
            lines += params
        if subcommands:
            if params:
                lines.append("")
            links = ", ".join(f"[{name}](#{_slug(f'{title} {name}')})" for name in subcommands)
            lines += _wrap(f"Commands: {links}.", "", "")
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    PAGE.write_text(render())
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
