"""Configs of `lpo eval`, `lpo eval score` and `lpo eval compare` (light imports only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lpo.core.config import option
from lpo.curate.scorers.specs import DEFAULT_EVAL_METRICS
from lpo.reward.lpo.config import GenerationOptions

EVAL_METRICS_HELP = ("Comma-separated metrics, from: pickscore, hpsv2, hpsv21, imagereward, aesthetic, clip, vqa, "
                     "geneval (with GenEval's metadata file as --prompts), t2i-color, t2i-shape, t2i-texture "
                     "(T2I-CompBench++ B-VQA).")


def _default_eval_metrics() -> list[str]:
    return list(DEFAULT_EVAL_METRICS)


@dataclass
class EvalConfig(GenerationOptions):
    prompts: Path = option(None, "Prompts: .txt, .json, a manifest with `caption`, a curation directory (e.g. "
                                 "`lpo curate ingest ID --split validation_unique --out DIR`), or GenEval's "
                                 "evaluation_metadata.jsonl (each prompt keeps its record for --metrics geneval).")
    out: Path = option(None, "Run directory: images/, images.parquet, summary.json, summary.md, grid.png.")
    metrics: list[str] = option(help=EVAL_METRICS_HELP, factory=_default_eval_metrics)
    models: dict[str, str] = option(help="Model per metric (hub id or local directory); unset metrics use the "
                                         "registry default.", factory=dict)
    models_dir: Path | None = option(None, "A directory with one model folder per metric (as `lpo dev tiny-models` "
                                           "writes); used for metrics without an explicit model.")
    reward_url: str | None = option(None, "Score the metrics that a running `lpo reward serve` at this URL serves "
                                          "there (and guide with its LRM when --candidates > 1 and no --lrm).")
    images_per_prompt: int = option(4, "Images per prompt; image i of prompt p uses seed + 1000 * p + i.")
    max_prompts: int | None = option(None, "Use only the first N prompts (default: all).")
    seed: int = option(42, "Base seed.")
    batch_size: int = option(4, "Images per generation batch (a seed gives the same image in any batch).")
    score_batch_size: int = option(16, "Images per scorer forward.")
    grid_prompts: int = option(4, "Prompts shown in grid.png (one row each).")
    device: str = option("auto", "auto, cpu or cuda.")
    dtype: str = option("auto", "Generation dtype: auto (on CUDA float16, flux bfloat16, the VAE in float32; "
                                "float32 on CPU), float32, float16, bfloat16.")
    score_dtype: str = option("float32", "Scorer dtype: float32, float16, bfloat16.")


@dataclass
class EvalScoreConfig:
    images: Path = option(None, "Images: a manifest (.json/.csv/.parquet with `path` and `prompt` columns, a "
                                "samples.json of `lpo sample`, or an eval run directory), or a folder of files "
                                "named <prompt index>_<image index>.png or <prompt index>.png matched to --prompts.")
    out: Path = option(None, "Run directory: images.parquet, summary.json, summary.md, grid.png.")
    prompts: Path | None = option(None, "Prompts of an images folder (index = line / item, from 0); with a "
                                        "manifest, a check that every image's prompt is in this set. GenEval's "
                                        "evaluation_metadata.jsonl also gives each image its record (--metrics "
                                        "geneval).")
    metrics: list[str] = option(help=EVAL_METRICS_HELP, factory=_default_eval_metrics)
    models: dict[str, str] = option(help="Model per metric (hub id or local directory).", factory=dict)
    models_dir: Path | None = option(None, "A directory with one model folder per metric.")
    reward_url: str | None = option(None, "Score the metrics a running `lpo reward serve` at this URL serves there.")
    score_batch_size: int = option(16, "Images per scorer forward.")
    grid_prompts: int = option(4, "Prompts shown in grid.png (one row each).")
    device: str = option("auto", "auto, cpu or cuda.")
    score_dtype: str = option("float32", "Scorer dtype: float32, float16, bfloat16.")


@dataclass
class EvalCompareConfig:
    run_a: Path = option(None, "Baseline run directory (`lpo eval` or `lpo eval score` output).")
    run_b: Path = option(None, "Run to compare against the baseline.")
    out: Path | None = option(None, "Write the comparison here as markdown (and JSON beside it, same stem).")


@dataclass
class EvalSuiteConfig:
    suite: Path = option(None, "Suite file (YAML or JSON): the prompts, sampler settings and metrics shared by every "
                               "row, and the rows (shipped: manifests/suites/).")
    out: Path = option(None, "Suite directory: rows/<row>/ (one `lpo eval` run each), table.md, table.json, "
                             "table.png.")
    rows: list[str] = option(help="Run only these rows (names, comma-separated; the first row is always run: it is "
                                  "the baseline of the paired differences).", factory=list)
    max_prompts: int | None = option(None, "Use only the first N prompts in every row (a quick look; a new --out).")
    models_dir: Path | None = option(None, "A directory with one model folder per metric, for metrics the suite "
                                           "gives no model.")
    batch_size: int = option(4, "Images per generation batch.")
    score_batch_size: int = option(16, "Images per scorer forward.")
    device: str = option("auto", "auto, cpu or cuda.")
    dtype: str = option("auto", "Generation dtype (as `lpo eval --dtype`).")
    score_dtype: str = option("float32", "Scorer dtype: float32, float16, bfloat16.")
