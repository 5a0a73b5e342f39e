"""Run directories: each command that writes a folder of results owns it by kind, so a rerun continues its own
run and never writes into another command's. The kind is read from the file each kind writes first (its config or
run record), so folders written before this rule are recognised too.

| kind | written by | recognised by |
|---|---|---|
| curation | `lpo curate ingest`, `score`, `filter` | `pairs.parquet`, `filter_config.json` or `ingest/` |
| lrm | `lpo reward train` | `train_config.json` |
| lpo | `lpo optimize <family>` | `lpo_config.json` |
| eval | `lpo eval`, `lpo eval score` | `run.json` or `images.parquet` |
| suite | `lpo eval suite` | `suite.json` |
| demo | `lpo demo` | `demo_config.json` |
| samples | `lpo sample` | `samples.json` |
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lpo.core.errors import InputError

MARKERS: dict[str, tuple[str, ...]] = {
    "curation": ("pairs.parquet", "filter_config.json", "ingest"),
    "lrm": ("train_config.json",),
    "lpo": ("lpo_config.json",),
    "eval": ("run.json", "images.parquet"),
    "suite": ("suite.json",),
    "demo": ("demo_config.json",),
    "samples": ("samples.json",),
}
COMMANDS = {"curation": "lpo curate", "lrm": "lpo reward train", "lpo": "lpo optimize", "eval": "lpo eval",
            "suite": "lpo eval suite", "demo": "lpo demo", "samples": "lpo sample"}


def kind_of(out: str | Path) -> str | None:
    """The kind of run directory `out` is, None when it is none (absent, empty, or holding other files)."""
    out = Path(out)
    if not out.is_dir():
        return None
    return next((kind for kind, names in MARKERS.items() if any((out / name).exists() for name in names)), None)


def claim(out: str | Path, kind: str, option: str = "--out") -> bool:
    """Check, before anything is written, that `out` may hold a run of `kind`: absent, an empty folder, or a run
    directory of the same kind (the command then compares its settings). Refuses a file, another kind's run
    directory, and a folder of other files, naming the fix. Returns whether a run of this kind is already there."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{option} {out} is a file; pass a directory (new, or a {kind} run to continue).")
    found = kind_of(out)
    if found is None:
        if out.is_dir() and any(out.iterdir()):
            raise InputError(f"{option} {out} holds files but no run of `{COMMANDS[kind]}`; pass a new or empty "
                             "directory, so nothing there is overwritten.")
        return False
    if found != kind:
        raise InputError(f"{option} {out} is a {found} run directory (written by `{COMMANDS[found]}`); "
                         f"`{COMMANDS[kind]}` writes a {kind} run: pass another directory, so the {found} run stays "
                         "intact.")
    return True


def replace(out: str | Path, names: tuple[str, ...]) -> None:
    """`--overwrite`: remove the files and folders `names` of a run in `out` (everything the run wrote, so nothing
    stale stays beside the new results)."""
    for name in names:
        path = Path(out) / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
