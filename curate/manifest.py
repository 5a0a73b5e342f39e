"""Manifest schemas (the contract documented in manifests/README.md), checked reads and atomic writes."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from lpo.core.errors import InputError
from lpo.core.files import atomic_path

SCHEMA_VERSION = 1

PAIRS_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("caption", pa.string()),
        ("image_0_uid", pa.string()),
        ("image_1_uid", pa.string()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("winner", pa.int8()),
        ("is_tie", pa.bool_()),
        ("num_example_per_prompt", pa.int64()),
        ("source", pa.string()),
    ]
)

IMAGES_SCHEMA = pa.schema([("image_uid", pa.string()), ("caption", pa.string()), ("image", pa.binary())])


def scores_schema(metrics: Iterable[str]) -> pa.Schema:
    """`image_uid`, one float64 column per metric, `error`."""
    return pa.schema([("image_uid", pa.string())] + [(m, pa.float64()) for m in metrics] + [("error", pa.string())])


def scored_pairs_schema(metrics: Iterable[str], rejected: bool = False) -> pa.Schema:
    """The pairs columns plus `<metric>_0`, `<metric>_1`, `<metric>_gap` per metric (and `reason` when rejected)."""
    fields = list(PAIRS_SCHEMA)
    for m in metrics:
        fields += [(f"{m}_0", pa.float64()), (f"{m}_1", pa.float64()), (f"{m}_gap", pa.float64())]
    if rejected:
        fields.append(("reason", pa.string()))
    return pa.schema(fields)


def _polars_dtype(arrow_type: pa.DataType) -> pl.DataType:
    return pl.from_arrow(pa.table({"c": pa.array([], arrow_type)})).schema["c"]


def check_schema(path: str | Path, expected: pa.Schema, kind: str, strict_extra: bool = False) -> None:
    """Raise InputError naming the file, the column and the expected type when `path` does not match."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{kind} manifest {path} does not exist; run the step that writes it first.")
    try:
        actual = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(
            f"{kind} manifest {path} is not a readable parquet file ({err}); pass the parquet manifest written by "
            "lpo (schemas in manifests/README.md)."
        ) from err
    for field in expected:
        if field.name not in actual.names:
            raise InputError(
                f"{kind} manifest {path} lacks column '{field.name}' (expected {field.type}); "
                f"see manifests/README.md for the {kind} schema."
            )
        got = actual.field(field.name).type
        if _polars_dtype(got) != _polars_dtype(field.type):
            raise InputError(
                f"{kind} manifest {path}: column '{field.name}' has type {got}, expected {field.type}; "
                f"see manifests/README.md for the {kind} schema."
            )
    if strict_extra:
        extra = [n for n in actual.names if n not in expected.names]
        if extra:
            raise InputError(f"{kind} manifest {path} has unexpected columns {extra}; see manifests/README.md.")


def scan(path: str | Path, expected: pa.Schema, kind: str) -> pl.LazyFrame:
    """A lazy, schema-checked view of a manifest."""
    check_schema(path, expected, kind)
    return pl.scan_parquet(path)


def to_arrow(df: pl.DataFrame, schema: pa.Schema) -> pa.Table:
    """Select and cast `df` to `schema` exactly (column order and types)."""
    table = df.select(schema.names).to_arrow()
    return table.cast(schema)


def write_atomic(table: pa.Table | pl.DataFrame, path: str | Path, schema: pa.Schema | None = None) -> Path:
    """Write a parquet file so that readers only ever see a complete file (temp file in the same dir, then rename)."""
    if isinstance(table, pl.DataFrame):
        table = to_arrow(table, schema) if schema is not None else table.to_arrow()
    elif schema is not None:
        table = table.select(schema.names).cast(schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(path)


class AtomicWriter:
    """A parquet file written in pieces and renamed into place once complete, so readers never see a partial file;
    an error leaves no file. Memory holds one piece at a time.

        with AtomicWriter(path, schema) as out:
            for frame in pieces:
                out.write(frame)
    """

    def __init__(self, path: str | Path, schema: pa.Schema):
        self.path, self.schema, self.rows = Path(path), schema, 0

    def __enter__(self) -> AtomicWriter:
        self.target = atomic_path(self.path)
        self.writer = pq.ParquetWriter(self.target.__enter__(), self.schema, compression="zstd")
        return self

    def write(self, table: pa.Table | pl.DataFrame) -> None:
        table = to_arrow(table, self.schema) if isinstance(table, pl.DataFrame) else \
            table.select(self.schema.names).cast(self.schema)
        self.writer.write_table(table)
        self.rows += table.num_rows

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        self.writer.close()
        self.target.__exit__(exc_type, exc, traceback)


def concat_atomic(parts: list[Path], path: str | Path, schema: pa.Schema) -> int:
    """Write the rows of parquet `parts` into one file, atomically, one part in memory at a time; returns the rows."""
    with AtomicWriter(path, schema) as out:
        for part in parts:
            out.write(pq.read_table(part))
    return out.rows


def curation_dir_of(path: str | Path) -> Path:
    """Where the image bytes of a pairs/filtered manifest live: its `lpo.curation_dir` metadata, or its own
    directory when it is a curation directory's pairs.parquet."""
    path = Path(path)
    metadata = pq.read_schema(path).metadata or {}
    if b"lpo.curation_dir" in metadata:
        directory = Path(metadata[b"lpo.curation_dir"].decode())
    else:
        directory = path.parent
    if not (directory / "images").is_dir():
        raise InputError(f"the images of {path} are not found: {directory / 'images'} does not exist; point to a "
                         "manifest written by `lpo curate filter` whose curation directory is still in place.")
    return directory


def read_pairs(path: str | Path, kind: str = "filtered") -> pl.DataFrame:
    """Read a pairs-shaped manifest (pairs, filtered or rejected), checking the pairs columns."""
    check_schema(path, PAIRS_SCHEMA, kind)
    return pl.read_parquet(path)
