"""`lpo curate filter`: ingest and score whatever is missing, then apply an MPCF rule and write the manifests."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import polars as pl

from lpo.core import config as cfg
from lpo.core import rundir
from lpo.core.errors import InputError
from lpo.core.files import write_text_atomic
from lpo.core.plots import pyplot, save_figure
from lpo.curate import ingest, mpcf, score
from lpo.curate.config import FilterConfig
from lpo.curate.manifest import (
    PAIRS_SCHEMA,
    AtomicWriter,
    scan,
    scored_pairs_schema,
    scores_schema,
)

logger = logging.getLogger(__name__)

FILTERED_FILE = "filtered.parquet"
WRITE_ROWS = 100_000  # rows of the scored pairs per written piece
REJECTED_FILE = "rejected.parquet"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "gaps.png"
# what a filter run writes into --out (its curation directory's pairs, images and scores stay)
CONFIG_FILE = "filter_config.json"
FILTER_OUTPUTS = (FILTERED_FILE, REJECTED_FILE, SUMMARY_FILE, PLOT_FILE, CONFIG_FILE)
# the settings the filtered manifests depend on; the rest (batch size, device, ...) only decide how fast
DECISIVE = ("source", "rule", "metrics", "min_gap", "tie_max_gap", "keep_ties", "split", "limit", "models",
            "models_dir")


def _score_config(config: FilterConfig, work_dir: Path, rule: mpcf.Rule) -> score.ScoreConfig:
    """Scoring settings for the rule's metrics: the user's models, else `--models-dir`'s, else the rule's own (the
    paper's models for the lpo-paper rules), else the registry's defaults."""
    models = dict(config.models) if config.models_dir is not None else {**rule.models, **config.models}
    return score.ScoreConfig(
        work_dir=work_dir, metrics=list(rule.metrics), models=models, models_dir=config.models_dir,
        batch_size=config.batch_size, device=config.device, dtype=config.dtype, decode_workers=config.decode_workers,
    )


def run(config: FilterConfig) -> dict[str, Any]:
    """Run the whole curation: ingest (if SOURCE is not yet a curation dir), score missing metrics, filter."""
    if config.out is None:
        raise InputError("no output directory given; pass --out DIR.")
    rule = mpcf.build_rule(config.rule, config.metrics, config.min_gap, config.tie_max_gap, config.keep_ties)
    out = Path(config.out)
    rundir.claim(out, "curation")
    _check_same_filter(config, out)
    source_is_dir = config.source is not None and ingest.is_curation_dir(config.source)
    work_dir = Path(config.source) if source_is_dir else out
    if not source_is_dir:
        if not config.source:
            raise InputError("no SOURCE given; pass a curation directory, parquet files or a dataset id.")
        ingest.open_source(config.source, config.split)  # fail on a bad source before any model loads
        score.validate_models(_score_config(config, work_dir, rule))
        ingest.run(ingest.IngestConfig(source=config.source, out=out, split=config.split, limit=config.limit))
    score.run(_score_config(config, work_dir, rule))
    if config.overwrite:
        rundir.replace(out, FILTER_OUTPUTS)
    summary = filter_dir(work_dir, out, rule, plot=config.plot)
    cfg.save(config, out / CONFIG_FILE)
    return summary


def _decisive(values: dict[str, Any]) -> dict[str, Any]:
    """The decisive settings, with local paths resolved (the same folder by a relative or an absolute path is the
    same source)."""
    out = {}
    for key in DECISIVE:
        value = values.get(key)
        if key in ("source", "models_dir") and value is not None and Path(value).exists():
            value = str(Path(value).resolve())
        if key == "models" and value:
            value = {m: str(Path(v).resolve()) if Path(v).exists() else v for m, v in value.items()}
        out[key] = value
    return out


def _check_same_filter(config: FilterConfig, out: Path) -> None:
    """A filter run already in `out` is continued (rewritten with the same results) when its settings are these,
    replaced with --overwrite, and otherwise refused before anything is written."""
    path = out / CONFIG_FILE
    if not path.is_file() or config.overwrite:
        return
    saved, now = _decisive(json.loads(path.read_text())), _decisive(cfg.to_dict(config))
    changed = [f"{k}={saved[k]!r} (now {now[k]!r})" for k in DECISIVE if saved[k] != now[k]]
    if changed:
        raise InputError(f"{out} holds a filter run made with {', '.join(changed)}; pass --overwrite to replace "
                         "it, or a new --out to keep it.")

def filter_dir(work_dir: Path, out: Path, rule: mpcf.Rule, plot: bool = False) -> dict[str, Any]:
    """Apply `rule` to the scored pairs of `work_dir`; write filtered/rejected manifests and the summary to `out`."""
    pairs = scan(work_dir / ingest.PAIRS_FILE, PAIRS_SCHEMA, "pairs")
    scores = scan(work_dir / score.SCORES_FILE, scores_schema([]), "scores")
    scored = mpcf.apply(mpcf.with_gaps(pairs, scores, rule.metrics), rule).collect()
    metadata = {"lpo.curation_dir": str(work_dir.resolve()), "lpo.rule": rule.describe(),
                "lpo.schema": "filtered/v1"}
    kept_schema = scored_pairs_schema(rule.metrics).with_metadata(metadata)
    rejected_schema = scored_pairs_schema(rule.metrics, rejected=True).with_metadata(metadata)
    # slice by slice: at a million pairs, whole kept and rejected copies would double the filter's memory
    with AtomicWriter(out / FILTERED_FILE, kept_schema) as kept, \
            AtomicWriter(out / REJECTED_FILE, rejected_schema) as rejected:
        for first in range(0, max(scored.height, 1), WRITE_ROWS):
            piece = scored.slice(first, WRITE_ROWS)
            kept.write(piece.filter(pl.col("reason").is_null()))
            rejected.write(piece.filter(pl.col("reason").is_not_null()))
    summary = summarise(scored, rule, work_dir)
    write_text_atomic(json.dumps(summary, indent=2) + "\n", out / SUMMARY_FILE)
    if plot:
        plot_gaps(scored, rule, out / PLOT_FILE)
    return summary


def summarise(scored: pl.DataFrame, rule: mpcf.Rule, work_dir: Path) -> dict[str, Any]:
    # counts from narrow selections: a filtered copy of the million-row wide table would double the memory
    kept = scored.select("reason", "is_tie").filter(pl.col("reason").is_null())
    reasons = scored.select("reason").group_by("reason").len().drop_nulls("reason").sort(
        ["len", "reason"], descending=[True, False])
    images_with_errors = pl.concat([
        scored.select(pl.col(f"image_{k}_uid").alias("u"), pl.col(f"_error_{k}").alias("e")).filter(
            pl.col("e").is_not_null()) for k in (0, 1)])
    return {
        "rule": rule.name,
        "rule_description": rule.describe(),
        "metrics": list(rule.metrics),
        "min_gap": rule.min_gap,
        "tie_max_gap": rule.tie_max_gap,
        "keep_ties": rule.keep_ties,
        "curation_dir": str(work_dir.resolve()),
        "models": {m: score.recorded_model(work_dir, m) or "not recorded (scored before lpo recorded models)"
                   for m in rule.metrics},
        "pairs": scored.height,
        "kept": kept.height,
        "kept_ties": kept.filter(pl.col("is_tie")).height,
        "rejected": scored.height - kept.height,
        "rejected_by_reason": dict(reasons.rows()),
        "images_with_errors": images_with_errors["u"].n_unique(),
        "agreement": mpcf.agreement(scored, rule.metrics),
    }


def plot_gaps(scored: pl.DataFrame, rule: mpcf.Rule, path: Path) -> Path:
    plt = pyplot()

    labelled = scored.filter(pl.col("winner").is_not_null())
    fig, axes = plt.subplots(1, len(rule.metrics), figsize=(4 * len(rule.metrics), 3), squeeze=False)
    for ax, m in zip(axes[0], rule.metrics):
        gaps = labelled.get_column(f"{m}_gap").drop_nulls().to_numpy()
        ax.hist(gaps, bins=40, color="#4c72b0")
        ax.axvline(rule.min_gap[m], color="#c44e52", linestyle="--", label=f"keep if > {rule.min_gap[m]:g}")
        ax.set_title(f"{m}: winner minus loser")
        ax.set_xlabel("gap")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("labelled pairs")
    return save_figure(fig, path)
