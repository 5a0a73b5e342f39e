"""The options of `lpo curate ingest`, `score` and `filter`, one dataclass per command (a module of its own, so the
command line reads them without loading a scorer)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lpo.core.config import option
from lpo.curate.scorers.specs import DEFAULT_CURATION_METRICS


@dataclass
class IngestConfig:
    source: str = option(None, "Hub dataset id (streamed), a save_to_disk directory, or parquet "
                               "file(s)/directory/glob.")
    out: Path = option(None, "Curation directory to write (pairs.parquet, images/).")
    split: str = option("train", "Dataset split to read.")
    limit: int | None = option(None, "Read at most this many source rows.")
    chunk_rows: int = option(512, "Source rows per chunk; each chunk is written atomically and is the resume unit.")


@dataclass
class ScoreConfig:
    work_dir: Path = option(None, "Curation directory written by `lpo curate ingest`.")
    metrics: list[str] = option(help="Metrics to compute.", factory=lambda: list(DEFAULT_CURATION_METRICS))
    models: dict[str, str] = option(
        help="Model per metric (hub id or local directory); unset metrics use the registry default.", factory=dict)
    models_dir: Path | None = option(None, "A directory with one model folder per metric (as `lpo dev tiny-models` "
                                           "writes); used for metrics without an explicit model.")
    batch_size: int = option(32, "Images per model forward.")
    device: str = option("auto", "Device: auto, cpu, cuda, cuda:N (under accelerate launch each process uses its "
                                 "own).")
    dtype: str = option("auto", "Model dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, float16, bfloat16.")
    decode_workers: int = option(4, "Threads that read and decode images while the model runs.")
    flush_every: int = option(1024, "Write a part file after this many images (the most work an interruption loses).")


@dataclass
class FilterConfig:
    source: str = option(None, "A curation directory (from `lpo curate ingest`) or any SOURCE that ingest accepts.")
    out: Path = option(None, "Output directory for filtered.parquet, rejected.parquet and summary.json.")
    rule: str = option("all", "Rule: all (every metric agrees), lpo-paper, lpo-paper-strict, lpo-paper-loose (the "
                              "reference filter's thresholds, scored by default with the paper's models: VQAScore "
                              "t2v:clip-flant5-xxl, which needs `pip install t2v-metrics==3.0`).")
    metrics: list[str] | None = option(None, "Metrics the rule uses (default: the rule's own; `all` uses "
                                             "pickscore,clip,vqa).")
    min_gap: dict[str, float] = option(help="Per-metric minimum winner-minus-loser gap (keep iff gap > value).",
                                       factory=dict)
    tie_max_gap: dict[str, float] = option(help="Per-metric maximum |gap| for a tie to be kept (keep iff < value).",
                                           factory=dict)
    keep_ties: bool | None = option(None, "Keep ties whose gaps are all under the tie thresholds (default: off "
                                          "for `all`, on for the lpo-paper rules).")
    plot: bool = option(False, "Also save a PNG of the per-metric gap histograms.")
    split: str = option("train", "Dataset split, when SOURCE is ingested.")
    limit: int | None = option(None, "Read at most this many source rows, when SOURCE is ingested.")
    models: dict[str, str] = option(help="Model per metric (hub id or local directory).", factory=dict)
    models_dir: Path | None = option(None, "A directory with one model folder per metric (`lpo dev tiny-models`).")
    batch_size: int = option(32, "Images per model forward when scoring.")
    device: str = option("auto", "Scoring device: auto, cpu, cuda, cuda:N.")
    dtype: str = option("auto", "Scoring dtype: auto, float32, float16, bfloat16.")
    decode_workers: int = option(4, "Image-decoding threads when scoring.")
    overwrite: bool = option(False, "Replace a filter run already in --out that was made with other settings (its "
                                    "manifests, summary and plot are removed first). Without it such a run is "
                                    "refused and left as it was.")
