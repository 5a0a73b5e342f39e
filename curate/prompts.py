"""Prompt lists for generation and preference optimisation: a text file, a JSON list, any manifest with a `caption`
column, or a curation directory (its pairs' captions). Every command that reads prompts reads them here."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from lpo.core.errors import InputError


def read_prompts(path: str | Path) -> list[str]:
    """Unique, non-empty prompts in file order. Accepts .txt (one per line), .json (a list of strings, or of
    objects with a `caption` or `prompt` field, as SPO's and LPO's 4k-prompt files), .parquet (a `caption`
    column, e.g. a pairs or filtered manifest) and a curation directory (`lpo curate ingest`'s: its pairs.parquet)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "pairs.parquet").is_file():
            raise InputError(f"prompt directory {path} has no pairs.parquet; pass a prompt file, a manifest with a "
                             "`caption` column, or a directory written by `lpo curate ingest`.")
        path = path / "pairs.parquet"
    if not path.is_file():
        raise InputError(f"prompt file {path} does not exist; give a .txt, .json or .parquet file of prompts, or a "
                         "curation directory.")
    if path.suffix == ".parquet":
        if "caption" not in pq.read_schema(path).names:
            raise InputError(f"{path} has no 'caption' column; give a manifest with captions or a prompt file.")
        prompts = pq.read_table(path, columns=["caption"]).column("caption").to_pylist()
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"{path} is not valid JSON ({err}); give a JSON list of prompts.") from None
        if not isinstance(data, list):
            raise InputError(f"{path} must hold a JSON list of prompts (strings or objects with 'caption').")
        prompts = [item.get("caption", item.get("prompt")) if isinstance(item, dict) else item for item in data]
    else:
        prompts = path.read_text().splitlines()
    unique = list(dict.fromkeys(p.strip() for p in prompts if isinstance(p, str) and p.strip()))
    if not unique:
        raise InputError(f"prompt file {path} holds no prompts; add one prompt per line (or a JSON list).")
    return unique
