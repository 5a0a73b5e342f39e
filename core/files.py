"""Atomic writes: a reader never sees a partial file. Every output is written to a temp file in its own folder
and renamed into place once complete; an error leaves the old file (or none) and no temp file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path, prefix: str | None = None) -> Iterator[Path]:
    """A temp path beside `path` to write to; renamed onto `path` when the block ends without an error, removed
    when it raises.

        with atomic_path(out / "model.safetensors") as tmp:
            save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix or f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write a small text file (JSON summary, config) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(data: Any, path: str | Path) -> Path:
    """Write `data` as indented JSON (anything JSON does not know as its string) atomically."""
    return write_text_atomic(json.dumps(data, indent=2, default=str) + "\n", path)
