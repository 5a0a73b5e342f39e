"""Ingest Pick-a-Pic-style preference pairs into a curation directory.

A curation directory holds `pairs.parquet` (one row a pair, keyed by `pair_id`) and `images/part-*.parquet`
(each unique image once, keyed by `image_uid`, with its caption and encoded bytes). Ingest runs in chunks of
source rows; each chunk's files are written atomically before the progress state moves on, so an interrupted
ingest resumes where it stopped.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import DatasetDict, load_dataset, load_from_disk
from datasets import Image as ImageFeature

from lpo.core import config as cfg
from lpo.core import rundir
from lpo.core.errors import InputError
from lpo.core.files import write_text_atomic
from lpo.core.parts import Parts
from lpo.curate.config import IngestConfig
from lpo.curate.manifest import IMAGES_SCHEMA, PAIRS_SCHEMA, concat_atomic, to_arrow

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("caption", "image_0_uid", "image_1_uid", "label_0", "label_1", "jpg_0", "jpg_1")
OPTIONAL_COLUMNS = ("has_label", "num_example_per_prompt", "user_id", "ranking_id", "created_at")
PAIRS_FILE = "pairs.parquet"
IMAGES_DIR = "images"
STATE_DIR = "ingest"


@dataclass
class IngestSummary:
    rows_read: int
    pairs: int
    unique_images: int
    skipped: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"rows_read": self.rows_read, "pairs": self.pairs, "unique_images": self.unique_images,
                "skipped": dict(self.skipped)}


def is_curation_dir(path: str | Path) -> bool:
    return (Path(path) / PAIRS_FILE).is_file() and (Path(path) / IMAGES_DIR).is_dir()


def _chunk(part: Path) -> list[int]:
    """The chunk a part was written by: `part-000003.parquet` and `pairs-000003.parquet` hold chunk 3."""
    return [int(part.stem.split("-")[1])]


def image_chunks(work_dir: str | Path) -> Parts:
    """`images/part-<chunk>.parquet`: the images a chunk saw first (a chunk of only repeated images writes none)."""
    return Parts(Path(work_dir) / IMAGES_DIR, "part-*.parquet", keys=_chunk)


def image_parts(work_dir: str | Path) -> list[Path]:
    return image_chunks(work_dir).paths()


# --------------------------------------------------------------------------------------------------------------
# Sources


class Source:
    """A stream of Arrow record batches with Pick-a-Pic's columns."""

    description: str

    def columns(self) -> list[str]:
        raise NotImplementedError

    def batches(self, skip: int, batch_rows: int) -> Iterator[pa.RecordBatch]:
        raise NotImplementedError


class ParquetSource(Source):
    def __init__(self, files: list[Path], description: str):
        self.files = files
        self.description = description

    def columns(self) -> list[str]:
        names = pq.read_schema(self.files[0]).names
        for path in self.files[1:]:
            other = pq.read_schema(path).names
            missing = [c for c in REQUIRED_COLUMNS if c not in other]
            if missing:
                raise InputError(_missing_message(str(path), missing))
        return names

    def batches(self, skip: int, batch_rows: int) -> Iterator[pa.RecordBatch]:
        wanted = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in self.columns()]
        for path in self.files:
            handle = pq.ParquetFile(path)
            rows = handle.metadata.num_rows
            if skip >= rows:
                skip -= rows
                continue
            for batch in handle.iter_batches(batch_size=batch_rows, columns=wanted):
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                if skip:
                    batch = batch.slice(skip)
                    skip = 0
                yield batch


class DatasetsSource(Source):
    """A `datasets` Dataset (from save_to_disk) or IterableDataset (streamed from a hub)."""

    def __init__(self, dataset: Any, description: str):
        self.dataset = _undecoded(dataset)
        self.description = description

    def columns(self) -> list[str]:
        return list(self.dataset.column_names or self.dataset.features.keys())

    def batches(self, skip: int, batch_rows: int) -> Iterator[pa.RecordBatch]:
        wanted = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in self.columns()]
        dataset = self.dataset.select_columns(wanted)
        if skip:
            streamed = hasattr(dataset, "_ex_iterable")
            dataset = dataset.skip(skip) if streamed else dataset.select(range(skip, len(dataset)))
        for rows in dataset.iter(batch_size=batch_rows):
            for col in ("jpg_0", "jpg_1"):
                rows[col] = [v["bytes"] if isinstance(v, dict) else v for v in rows[col]]
            yield pa.RecordBatch.from_pydict(rows)


def _undecoded(dataset: Any) -> Any:
    """Image-typed columns come back as encoded bytes, never as decoded PIL images."""
    features = dataset.features or {}
    for col in ("jpg_0", "jpg_1"):
        if isinstance(features.get(col), ImageFeature):
            dataset = dataset.cast_column(col, ImageFeature(decode=False))
    return dataset


def _missing_message(where: str, missing: list[str]) -> str:
    return (
        f"source {where} lacks the required column(s) {missing}; a Pick-a-Pic-style source needs "
        f"{list(REQUIRED_COLUMNS)} (see manifests/README.md, 'Sources')."
    )


def open_source(source: str, split: str) -> Source:
    """Resolve SOURCE to parquet files, a save_to_disk directory, or a hub dataset id, and check its columns."""
    path = Path(source)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        result = _open_saved(path, split)
    elif path.is_dir() or path.suffix == ".parquet" or any(ch in source for ch in "*?["):
        result = _open_parquet(source, split)
    elif path.exists():
        raise InputError(
            f"source {source} is a file but not parquet; give parquet files, a directory, or a dataset id."
        )
    else:
        result = _open_hub(source, split)
    missing = [c for c in REQUIRED_COLUMNS if c not in result.columns()]
    if missing:
        raise InputError(_missing_message(result.description, missing))
    return result


def _open_parquet(source: str, split: str) -> ParquetSource:
    path = Path(source)
    if path.is_dir():
        files = sorted(Path(p) for p in glob.glob(str(path / "**" / "*.parquet"), recursive=True))
        in_split = [p for p in files if p.name.startswith(f"{split}-") or p.parent.name == split]
        files = in_split or files
    else:
        files = sorted(Path(p) for p in glob.glob(source))
    if not files:
        raise InputError(f"source {source} holds no parquet files; point it at Pick-a-Pic parquet data.")
    return ParquetSource(files, source)


def _open_saved(path: Path, split: str) -> DatasetsSource:
    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise InputError(f"dataset {path} has no split '{split}'; available: {sorted(dataset)}. Pass --split.")
        dataset = dataset[split]
    return DatasetsSource(dataset, f"{path}[{split}]")


def _open_hub(source: str, split: str) -> DatasetsSource:
    try:
        dataset = load_dataset(source, split=split, streaming=True)
    except Exception as err:  # datasets raises many types for a missing id, offline mode or a bad split
        raise InputError(
            f"could not open '{source}' as a local path or a hub dataset ({type(err).__name__}: {err}). "
            "Give an existing parquet file/directory, a save_to_disk directory, or a reachable dataset id."
        ) from err
    return DatasetsSource(dataset, f"{source}[{split}]")


# --------------------------------------------------------------------------------------------------------------
# Rows -> pairs and images


def _pair_ids(frame: pl.DataFrame) -> list[str]:
    keys = ["image_0_uid", "image_1_uid", "label_0", "label_1"] + [
        c for c in ("user_id", "ranking_id", "created_at") if c in frame.columns
    ]
    rows = frame.select([pl.col(k).cast(pl.String).fill_null("") for k in keys]).rows()
    return [hashlib.blake2b("\x1f".join(r).encode(), digest_size=10).hexdigest() for r in rows]


def normalise_batch(batch: pa.RecordBatch, source: str) -> tuple[pl.DataFrame, Counter]:
    """Turn source rows into pair rows plus their image bytes; drop bad rows with a counted reason."""
    frame = pl.from_arrow(batch)
    assert isinstance(frame, pl.DataFrame)
    skipped: Counter = Counter()
    labelled = pl.col("label_0").is_not_null() & pl.col("label_1").is_not_null()
    labelled = labelled & ((pl.col("label_0") + pl.col("label_1")) > 0)
    if "has_label" in frame.columns:
        labelled = labelled & pl.col("has_label").fill_null(True)
    reasons = (
        pl.when(pl.col("image_0_uid").is_null() | pl.col("image_1_uid").is_null() | (pl.col("image_0_uid") == "")
                | (pl.col("image_1_uid") == ""))
        .then(pl.lit("missing_uid"))
        .when(pl.col("image_0_uid") == pl.col("image_1_uid"))
        .then(pl.lit("same_image"))
        .when(pl.col("caption").is_null() | (pl.col("caption").str.strip_chars() == ""))
        .then(pl.lit("empty_caption"))
        .when(pl.col("jpg_0").is_null() | pl.col("jpg_1").is_null())
        .then(pl.lit("missing_image"))
        .otherwise(pl.lit(None, pl.String))
    )
    frame = frame.with_columns(
        pl.col("label_0").cast(pl.Float64),
        pl.col("label_1").cast(pl.Float64),
        reasons.alias("_skip"),
        labelled.alias("_labelled"),
    )
    for reason, count in frame.filter(pl.col("_skip").is_not_null()).group_by("_skip").len().rows():
        skipped[reason] += count
    frame = frame.filter(pl.col("_skip").is_null())
    nepp = pl.col("num_example_per_prompt").cast(pl.Int64) if "num_example_per_prompt" in frame.columns else None
    frame = frame.with_columns(
        pl.Series("pair_id", _pair_ids(frame), dtype=pl.String),
        pl.when(pl.col("_labelled") & (pl.col("label_0") > pl.col("label_1"))).then(0)
        .when(pl.col("_labelled") & (pl.col("label_1") > pl.col("label_0"))).then(1)
        .otherwise(None).cast(pl.Int8).alias("winner"),
        (pl.col("_labelled") & (pl.col("label_0") == pl.col("label_1"))).alias("is_tie"),
        (nepp if nepp is not None else pl.lit(None, pl.Int64)).alias("num_example_per_prompt"),
        pl.lit(source).alias("source"),
    )
    return frame, skipped


def _same_source(identity: dict[str, Any]) -> dict[str, Any]:
    """An ingest's identity with a local source as its resolved path: the same files by a relative or an absolute
    path (or from another working directory) are the same source."""
    source = identity.get("source")
    if isinstance(source, str) and Path(source).exists():
        identity = {**identity, "source": str(Path(source).resolve())}
    return identity


class _Ingester:
    def __init__(self, config: IngestConfig, source: Source):
        self.config = config
        self.source = source
        self.out = Path(config.out)
        self.state_path = self.out / STATE_DIR / "state.json"
        # a chunk's parts count once state.json counts the chunk: parts of a chunk cut short before it are rewritten
        self.pair_chunks = Parts(self.out / STATE_DIR, "pairs-*.parquet", keys=_chunk)
        self.image_chunks = image_chunks(self.out)
        self.identity = {"source": source.description, "split": config.split, "limit": config.limit,
                         "chunk_rows": config.chunk_rows}

    def load_state(self) -> dict[str, Any]:
        if not self.state_path.exists():
            if (self.out / PAIRS_FILE).exists():
                raise InputError(f"{self.out} already holds {PAIRS_FILE} without ingest state; use a new --out.")
            return {"rows_done": 0, "chunks": 0, "done": False, "skipped": {}, "rows_read": 0}
        state = json.loads(self.state_path.read_text())
        if _same_source(state["identity"]) != _same_source(self.identity):
            raise InputError(
                f"{self.out} holds an ingest of {state['identity']}, not {self.identity}; "
                "use a new --out directory, or delete the old one to start over."
            )
        return state

    def save_state(self, state: dict[str, Any]) -> None:
        state["identity"] = self.identity
        write_text_atomic(json.dumps(state, indent=2) + "\n", self.state_path)

    def seen_images(self, chunks: int) -> dict[str, int]:
        """image_uid -> hash of its caption, for the images of the first `chunks` chunks (a hash, not the caption:
        at a million pairs the captions' Python strings would be most of ingest's memory)."""
        seen: dict[str, int] = {}
        for part in self.image_chunks.paths():
            if _chunk(part)[0] < chunks:
                table = pq.read_table(part, columns=["image_uid", "caption"])
                seen.update(zip(table.column("image_uid").to_pylist(), map(hash, table.column("caption").to_pylist())))
        return seen

    def run(self) -> IngestSummary:
        state = self.load_state()
        if not state["done"]:
            self.ingest(state)
        pairs = pl.scan_parquet(self.out / PAIRS_FILE).select(pl.len()).collect().item()
        unique = sum(pq.read_metadata(p).num_rows for p in image_parts(self.out))
        return IngestSummary(state["rows_read"], pairs, unique, Counter(state["skipped"]))

    def ingest(self, state: dict[str, Any]) -> None:
        seen = self.seen_images(state["chunks"])
        pair_ids: set[str] = set()
        for part in self.pair_chunks.paths():
            if _chunk(part)[0] < state["chunks"]:
                pair_ids.update(pq.read_table(part, columns=["pair_id"]).column("pair_id").to_pylist())
        skipped = Counter(state["skipped"])
        limit = self.config.limit
        for batch in self.source.batches(state["rows_done"], self.config.chunk_rows):
            if limit is not None and state["rows_done"] >= limit:
                break
            if limit is not None and state["rows_done"] + batch.num_rows > limit:
                batch = batch.slice(0, limit - state["rows_done"])
            frame, bad = normalise_batch(batch, self.source.description)
            skipped.update(bad)
            pairs, images, bad = self._new_rows(frame, seen, pair_ids)
            skipped.update(bad)
            chunk = state["chunks"]
            with self.pair_chunks.writing(f"pairs-{chunk:06d}.parquet") as tmp:
                pq.write_table(to_arrow(pairs, PAIRS_SCHEMA), tmp, compression="zstd")
            if images.height:
                with self.image_chunks.writing(f"part-{chunk:06d}.parquet") as tmp:
                    pq.write_table(to_arrow(images, IMAGES_SCHEMA), tmp, compression="zstd")
            state.update(rows_done=state["rows_done"] + batch.num_rows, rows_read=state["rows_read"] + batch.num_rows,
                         chunks=chunk + 1, skipped=dict(skipped))
            self.save_state(state)
            logger.info("ingested %d rows (%d unique images)", state["rows_done"], len(seen))
        parts = [part for part in self.pair_chunks.paths() if _chunk(part)[0] < state["chunks"]]
        if not parts:
            raise InputError(f"source {self.source.description} yielded no rows; check --split and --limit.")
        pairs = concat_atomic(parts, self.out / PAIRS_FILE, PAIRS_SCHEMA)  # one chunk in memory at a time
        (self.out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        state["done"] = True
        self.save_state(state)
        write_text_atomic(json.dumps(self.summary_dict(state, pairs, len(seen)), indent=2) + "\n",
                          self.out / STATE_DIR / "summary.json")

    def summary_dict(self, state: dict[str, Any], pairs: int, images: int) -> dict[str, Any]:
        return IngestSummary(state["rows_read"], pairs, images, Counter(state["skipped"])).to_dict()

    @staticmethod
    def _new_rows(frame: pl.DataFrame, seen: dict[str, int], pair_ids: set[str]):
        keep, image_rows, skipped = [], {"image_uid": [], "caption": [], "image": []}, Counter()
        for row in frame.select("pair_id", "caption", "image_0_uid", "image_1_uid", "jpg_0", "jpg_1").iter_rows():
            pair_id, caption, uid0, uid1, jpg0, jpg1 = row
            if pair_id in pair_ids:
                skipped["duplicate_pair"] += 1
                keep.append(False)
                continue
            caption_hash = hash(caption)
            if any(seen.get(uid, caption_hash) != caption_hash for uid in (uid0, uid1)):
                skipped["caption_conflict"] += 1
                keep.append(False)
                continue
            pair_ids.add(pair_id)
            keep.append(True)
            for uid, data in ((uid0, jpg0), (uid1, jpg1)):
                if uid not in seen:
                    seen[uid] = caption_hash
                    image_rows["image_uid"].append(uid)
                    image_rows["caption"].append(caption)
                    image_rows["image"].append(data)
        pairs = frame.filter(pl.Series(keep, dtype=pl.Boolean)) if keep else frame.clear()
        images = pl.DataFrame(image_rows, schema={"image_uid": pl.String, "caption": pl.String, "image": pl.Binary})
        return pairs, images, skipped


def run(config: IngestConfig) -> IngestSummary:
    """Ingest `config.source` into `config.out`; resumes an interrupted ingest of the same source."""
    if not config.source:
        raise InputError("no source given; pass a parquet file/directory, a save_to_disk directory, or a dataset id.")
    if config.out is None:
        raise InputError("no output directory given; pass --out DIR.")
    rundir.claim(config.out, "curation")
    if config.chunk_rows < 1:
        raise InputError(f"--chunk-rows must be at least 1, got {config.chunk_rows}.")
    if config.limit is not None and config.limit < 1:
        raise InputError(f"--limit must be at least 1, got {config.limit}.")
    source = open_source(config.source, config.split)
    summary = _Ingester(config, source).run()
    cfg.save(config, Path(config.out) / STATE_DIR / "config.json")
    return summary
