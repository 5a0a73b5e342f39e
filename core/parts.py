"""Resumable work: what is done is what is on disk, written whole. Every skip-what-is-done scheme in the project is
one of two storages of this one idea, and a rerun asks either the same two questions (`done()`, `todo(wanted)`):

- `Parts`: a folder of part files, each written atomically (a temp file renamed into place) and each holding the
  keys of the work it finished: ingest chunks, score parts, latent-cache parts, demo stages. A crash leaves the
  parts written before it and no partial one.
- `RecordLog`: one append-only JSON-lines file, one record per finished unit, flushed per batch: the evaluation's
  generated images and per-metric scores, where a unit (one image, one score) is too small for a file of its own.
  A torn last line (a write cut short) is dropped on read and the file rewritten without it, so the next append
  starts on a line of its own and that unit is simply done again.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lpo.core.files import atomic_path, write_text_atomic

logger = logging.getLogger(__name__)


def stem_key(path: Path) -> list[str]:
    """A part that stands for one unit named by its file: `stages/lpo.json` holds `lpo`."""
    return [path.name.split(".", 1)[0]]


class Parts:
    """Part files `directory/pattern`, each holding the keys `keys(path)` reads from it.

        parts = Parts(work_dir / "scores" / "clip", "part-*.parquet", keys=uid_column)
        for uid in parts.todo(all_uids): ...
        with parts.writing(f"part-{rank}-{seq}.parquet") as tmp:
            pq.write_table(table, tmp)
    """

    def __init__(self, directory: str | Path, pattern: str = "part-*",
                 keys: Callable[[Path], Iterable[Hashable]] = stem_key):
        self.directory = Path(directory)
        self.pattern = pattern
        self.keys = keys

    def paths(self) -> list[Path]:
        """The finished parts, in name order (a temp file of a write in progress is not one)."""
        if not self.directory.is_dir():
            return []
        return sorted(path for path in self.directory.glob(self.pattern) if path.is_file())

    def done(self) -> set[Hashable]:
        done: set[Hashable] = set()
        for path in self.paths():
            done.update(self.keys(path))
        return done

    def todo(self, wanted: Iterable[Hashable]) -> list[Hashable]:
        """`wanted` less what a part holds, in the order given."""
        done = self.done()
        return [key for key in wanted if key not in done]

    @contextmanager
    def writing(self, name: str) -> Iterator[Path]:
        """A temp path to write part `name` to; it becomes a part (seen by `done`) only when the block ends without
        an error. A name the pattern would not find is refused: that part would be written and never counted."""
        if not fnmatch.fnmatch(name, self.pattern):
            raise ValueError(f"part name {name!r} does not match {self.pattern!r}")
        with atomic_path(self.directory / name, prefix=f".{name}.") as tmp:
            yield tmp


class RecordLog:
    """An append-only JSON-lines file at `path`, one record (a dict holding `key`) per finished unit; the last
    record of a key wins."""

    def __init__(self, path: str | Path, key: str = "key"):
        self.path = Path(path)
        self.key = key

    def records(self) -> dict[Any, dict[str, Any]]:
        """key -> record; unreadable lines (a write cut short) are dropped and the file rewritten without them."""
        if not self.path.is_file():
            return {}
        lines = self.path.read_text().splitlines()
        records: dict[Any, dict[str, Any]] = {}
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or self.key not in record:
                continue
            records[record[self.key]] = record
            kept.append(line)
        if len(kept) != len(lines) or (lines and not self.path.read_bytes().endswith(b"\n")):
            logger.warning("%s: dropped %d unreadable line(s) of an interrupted write; those units run again",
                           self.path, len(lines) - len(kept))
            write_text_atomic("".join(f"{line}\n" for line in kept), self.path)
        return records

    def done(self) -> set[Any]:
        return set(self.records())

    def todo(self, wanted: Iterable[Any]) -> list[Any]:
        done = self.done()
        return [key for key in wanted if key not in done]

    @contextmanager
    def appending(self) -> Iterator[Callable[[Iterable[dict[str, Any]]], None]]:
        """`append(records)`: write finished units' records and flush them to the file (call once per batch)."""
        self.records()  # a torn last line is dropped first, so the next record starts a line of its own
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            def append(records: Iterable[dict[str, Any]]) -> None:
                for record in records:
                    if self.key not in record:
                        raise ValueError(f"a record of {self.path.name} needs {self.key!r}: {record}")
                    handle.write(json.dumps(record) + "\n")
                handle.flush()

            yield append


def run_stages(stages: list[tuple[str, Callable[[], dict[str, Any]]]], directory: Path,
               results: dict[str, Any]) -> dict[str, Any]:
    """Run each stage not done in an earlier run, in order, into `results` (a later stage reads the earlier ones');
    a finished stage is one part, `directory/<name>.json`, holding its results (a JSON object) and seconds."""

    parts = Parts(directory, "*.json")
    done = parts.done()
    for index, (name, stage) in enumerate(stages, 1):
        if name in done:
            results[name] = json.loads((directory / f"{name}.json").read_text())
            logger.info("stage %d/%d %s: done in an earlier run", index, len(stages), name)
            continue
        logger.info("stage %d/%d %s", index, len(stages), name)
        start = time.perf_counter()
        results[name] = stage() | {"seconds": round(time.perf_counter() - start, 1)}
        with parts.writing(f"{name}.json") as tmp:
            tmp.write_text(json.dumps(results[name], indent=2) + "\n")
    return results
