"""Score every unique image of a curation directory once per metric.

Layout under the curation directory:
- `scores/<metric>/part-<run>-r<rank>-<seq>.parquet`: scores written as they are produced (atomic files), so an
  interrupted run loses at most one flush of work; a rerun scores only the images no part file holds yet.
- `scores/<metric>/model.json`: the model the metric's scores were made with; a rerun with another model for a
  metric that has scores stops (scores of two models never mix in one column).
- `scores.parquet`: the merged manifest (`image_uid`, one column per metric, `error`), rebuilt from the parts.

Run under `accelerate launch`, each process scores a disjoint shard of the images (a stable hash of `image_uid`)
and writes its own part files; the main process merges once all are done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from accelerate import PartialState

from lpo.core import config as cfg
from lpo.core.device import resolve_device, resolve_dtype
from lpo.core.errors import InputError
from lpo.core.files import write_text_atomic
from lpo.core.parts import Parts
from lpo.core.progress import progress
from lpo.curate import images
from lpo.curate.config import ScoreConfig
from lpo.curate.ingest import image_parts, is_curation_dir
from lpo.curate.manifest import scores_schema, write_atomic
from lpo.curate.scorers import CURATION_METRICS, check_model_spec, load_scorer, resolve_specs
from lpo.curate.scorers.base import score_each
from lpo.curate.scorers.specs import DEFAULT_MODELS

logger = logging.getLogger(__name__)

SCORES_FILE = "scores.parquet"
SCORES_DIR = "scores"
MODEL_FILE = "model.json"


def validate_models(config: ScoreConfig) -> dict[str, str | None]:
    """Check metrics, batch options and model specs (no weights load); return the resolved model specs (None: the
    registry default)."""

    if not config.metrics:
        raise InputError("no metrics selected; pass --metrics, e.g. pickscore,clip,vqa.")
    unknown = [m for m in config.metrics if m not in CURATION_METRICS]
    if unknown:
        raise InputError(f"unknown metric(s) {unknown}; choose from {list(CURATION_METRICS)}.")
    if config.batch_size < 1 or config.flush_every < 1 or config.decode_workers < 1:
        raise InputError("--batch-size, --flush-every and --decode-workers must be at least 1.")
    specs = resolve_specs(config.metrics, config.models, config.models_dir, default=lambda metric: None)
    for metric, spec in specs.items():
        if spec is not None:
            check_model_spec(metric, spec)
    return specs


def model_id(metric: str, spec: str | None) -> str:
    """The model a metric is scored with: its spec (a local path made absolute) or the registry's default."""
    spec = spec or DEFAULT_MODELS[metric]
    return str(Path(spec).expanduser().resolve()) if Path(spec).expanduser().exists() else spec


def recorded_model(work_dir: Path, metric: str) -> str | None:
    """The model the scores of `metric` in `work_dir` were made with, None when none is recorded."""
    path = Path(work_dir) / SCORES_DIR / metric / MODEL_FILE
    return json.loads(path.read_text())["model"] if path.is_file() else None


def validate(config: ScoreConfig) -> dict[str, str | None]:
    """Check everything that can be checked before a model loads; return the resolved model specs."""
    if config.work_dir is None or not is_curation_dir(config.work_dir):
        raise InputError(f"{config.work_dir} is not a curation directory (no pairs.parquet and images/); "
                         "run `lpo curate ingest SOURCE --out DIR` first.")
    specs = validate_models(config)
    for metric, spec in specs.items():
        recorded = recorded_model(config.work_dir, metric)
        if recorded is not None and recorded != model_id(metric, spec):
            raise InputError(
                f"the {metric} scores in {Path(config.work_dir) / SCORES_DIR / metric} were made with {recorded}, "
                f"and this run asks for {model_id(metric, spec)}: pass --{metric}-model {recorded} to use them, or "
                f"delete that folder to score {metric} again with the new model.")
    return specs


def shard_of(uid: str, world: int) -> int:
    """A stable shard index for an image uid (the same on every machine and Python run)."""
    return int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=8).digest(), "little") % world


def _uids(part: Path) -> list[str]:
    return pq.read_table(part, columns=["image_uid"]).column("image_uid").to_pylist()


def score_parts(work_dir: Path, metric: str) -> Parts:
    """A metric's part files, each holding the uids it scored."""
    return Parts(work_dir / SCORES_DIR / metric, "part-*.parquet", keys=_uids)


def scored_uids(work_dir: Path, metric: str) -> set[str]:
    return score_parts(work_dir, metric).done()


class _PartWriter:
    """Collects scores and flushes them to atomic part files."""

    def __init__(self, parts: Parts, metric: str, rank: int, flush_every: int):
        self.parts = parts
        self.metric = metric
        self.prefix = f"part-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}-r{rank:04d}"
        self.flush_every = flush_every
        self.rows: dict[str, list] = {"image_uid": [], metric: [], "error": []}
        self.seq = 0
        self.written = 0

    def add(self, uids: list[str], scores: list[float | None], errors: list[str | None]) -> None:
        self.rows["image_uid"] += uids
        self.rows[self.metric] += scores
        self.rows["error"] += errors
        if len(self.rows["image_uid"]) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self.rows["image_uid"]:
            return
        table = pa.table(self.rows, schema=scores_schema([self.metric]))
        with self.parts.writing(f"{self.prefix}-{self.seq:06d}.parquet") as tmp:
            pq.write_table(table, tmp, compression="zstd")
        self.written += table.num_rows
        self.seq += 1
        self.rows = {k: [] for k in self.rows}


def _process_device(requested: str, state: Any) -> str:
    """Under accelerate launch each process scores on its own device; alone, the one asked for."""

    if state.num_processes > 1 or requested == "auto":
        return str(state.device)
    return resolve_device(requested)


def score_metric(work_dir: Path, metric: str, scorer: Any, todo: set[str], config: ScoreConfig, rank: int,
                 progress: Any = None) -> int:
    """Score the images in `todo` with `scorer`, writing part files as it goes. Returns the number scored."""

    writer = _PartWriter(score_parts(work_dir, metric), metric, rank, config.flush_every)
    try:
        batches = images.prefetch(images.iter_images(work_dir, todo, config.batch_size, config.decode_workers))
        for batch in batches:
            scores, errors = score_each(scorer, batch.images, batch.captions, batch.errors)
            writer.add(batch.uids, scores, errors)
            if progress is not None:
                progress(len(batch.uids))
    finally:
        writer.flush()
    return writer.written


def merge_scores(work_dir: Path) -> Path:
    """Rebuild `scores.parquet` from every metric's part files (one row per image, outer-joined by uid)."""
    metric_dirs = sorted(p for p in (work_dir / SCORES_DIR).glob("*") if p.is_dir())
    frames = []
    metrics = []
    for directory in metric_dirs:
        parts = score_parts(work_dir, directory.name).paths()
        if not parts:
            continue
        metric = directory.name
        metrics.append(metric)
        frame = pl.concat([pl.read_parquet(p) for p in parts]).unique("image_uid", keep="first", maintain_order=True)
        frames.append(frame.rename({"error": f"_error_{metric}"}))
    if not frames:
        merged = pl.DataFrame(schema={"image_uid": pl.String, "error": pl.String})
    else:
        merged = frames[0]
        for frame in frames[1:]:
            merged = merged.join(frame, on="image_uid", how="full", coalesce=True)
        error_cols = [f"_error_{m}" for m in metrics]
        # An image's errors are usually identical across metrics (a decode failure): keep each message once.
        merged = merged.with_columns(
            pl.concat_list(error_cols).list.drop_nulls().list.unique(maintain_order=True).list.join("; ")
            .replace("", None).alias("error")
        ).drop(error_cols)
    return write_atomic(merged.sort("image_uid"), work_dir / SCORES_FILE, scores_schema(metrics))


def run(config: ScoreConfig) -> dict[str, Any]:
    """Score the images of `config.work_dir` with each metric; resumable and shardable across processes."""
    specs = validate(config)
    work_dir = Path(config.work_dir)
    cpu = config.device == "cpu"
    state = PartialState(cpu=cpu)
    device = _process_device(config.device, state)
    dtype = resolve_dtype(config.dtype, device)
    all_uids: list[str] = []
    for part in image_parts(work_dir):
        all_uids += pq.read_table(part, columns=["image_uid"]).column("image_uid").to_pylist()
    mine = {u for u in all_uids if shard_of(u, state.num_processes) == state.process_index}
    report: dict[str, Any] = {"images": len(all_uids), "processes": state.num_processes, "metrics": {}}
    for metric in config.metrics:
        model = model_id(metric, specs[metric])
        done = scored_uids(work_dir, metric)
        # scores made before models were recorded stay unattributed rather than credited to this run's model
        if state.is_main_process and not done and recorded_model(work_dir, metric) is None:
            write_text_atomic(json.dumps({"metric": metric, "model": model}) + "\n",
                              work_dir / SCORES_DIR / metric / MODEL_FILE)
        todo = mine - done
        scored = 0
        if todo:
            scored = _score_with_progress(work_dir, metric, specs[metric], todo, config, state, device, dtype)
        report["metrics"][metric] = {"scored_now": scored, "model": model}
        logger.info("%s: scored %d images on rank %d", metric, scored, state.process_index)
    state.wait_for_everyone()
    if state.is_main_process:
        merge_scores(work_dir)
        counts = pl.scan_parquet(work_dir / SCORES_FILE).select(
            [pl.col(m).is_not_null().sum().alias(m) for m in config.metrics]
            + [pl.col("error").is_not_null().sum().alias("errors")]
        ).collect().row(0, named=True)
        report["scored_total"] = counts
        write_text_atomic(json.dumps(report, indent=2) + "\n", work_dir / SCORES_DIR / "last_run.json")
        cfg.save(config, work_dir / SCORES_DIR / "config.json")
    state.wait_for_everyone()
    return report


def _score_with_progress(work_dir, metric, spec, todo, config, state, device, dtype) -> int:
    scorer = load_scorer(metric, spec, device=device, dtype=dtype)
    if not state.is_main_process:
        return score_metric(work_dir, metric, scorer, todo, config, state.process_index)
    with progress(f"{metric} (rank 0)", len(todo), unit="images", transient=True) as tracker:
        return score_metric(work_dir, metric, scorer, todo, config, state.process_index, progress=tracker.advance)
