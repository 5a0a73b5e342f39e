"""`lpo eval`: generate with one seed per (prompt, image), score every image, summarise, and compare two runs.

The reference evaluation scored only the first of the four images of each prompt and paired prompts with the wrong
images at batch size > 1 (design/method.md section 6). Here every image is an `EvalItem` that carries its own
prompt, seed and file from generation through scoring to the per-image table, so a score can only ever be computed
against its own prompt, whatever the batch sizes.

Run directory (schemas in manifests/README.md):
- `images/p<prompt>-i<image>.png`, each written atomically, and `generated.jsonl`, one record per finished image:
  together the resume unit (an image counts as done when its record names the same prompt and seed and the file
  exists).
- `scores/<metric>.json` (spec, model id, scale) and `scores/<metric>.jsonl` (one score per image key): scoring
  resumes per metric and per image; a changed model spec rescores that metric.
- `images.parquet` (one row per image, one column per metric), `summary.json`, `summary.md`, `grid.png`,
  `config.json` (the resolved config) and `run.json` (the generation settings a resume must match).

Statistics: mean over images; std per image (ddof 1); 95% confidence interval = mean +- 1.96 standard errors,
the standard error clustered by prompt (CR1: the images of one prompt are not independent draws). With equal
images per prompt this equals the standard deviation of the per-prompt means over sqrt(prompts).
`compare` pairs images by (prompt, image index), reports the mean paired difference with the same clustered
normal interval, and the share of prompts whose mean score went up (ties count half).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from curate.errors import InputError
from curate.manifest import write_atomic, write_text_atomic
from reward.configs import EvalCompareConfig, EvalConfig, EvalScoreConfig

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
RECORDS_FILE = "generated.jsonl"
IMAGES_DIR = "images"
SCORES_DIR = "scores"
TABLE_FILE = "images.parquet"
SUMMARY_FILE = "summary.json"
SUMMARY_MD = "summary.md"
GRID_FILE = "grid.png"
Z_95 = NormalDist().inv_cdf(0.975)
MAX_IMAGES_PER_PROMPT = 1000  # the seed of image i of prompt p is seed + 1000 * p + i
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PATH_COLUMNS = ("path", "image_path", "image", "file")
PROMPT_COLUMNS = ("prompt", "caption")
STATISTICS = ("mean over images; std per image (ddof 1); ci95: normal interval, mean +- 1.96 standard errors "
              "clustered by prompt (CR1)")
COMPARE_STATISTICS = ("delta = mean over paired images of (B - A), paired by (prompt, image index); ci95: normal "
                      "interval, standard error clustered by prompt (CR1); win rate: share of prompts whose mean "
                      "score is higher in B (ties count half)")
# The settings a resumed run must share with the images already on disk.
GENERATION_KEYS = ("base", "lora", "lrm", "candidates", "steps", "guidance", "eta", "seed", "dtype")


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One image: its prompt, its index among the prompt's images, its seed and its file."""

    prompt_index: int
    image_index: int
    prompt: str
    seed: int | None
    path: Path

    @property
    def key(self) -> str:
        return f"p{self.prompt_index:05d}-i{self.image_index:02d}"


def table_schema(metrics: Sequence[str]) -> pa.Schema:
    """The per-image table: ids, prompt, seed, file, one float64 column per metric, error."""
    return pa.schema([("prompt_index", pa.int32()), ("image_index", pa.int32()), ("prompt", pa.string()),
                      ("seed", pa.int64()), ("image_path", pa.string())]
                     + [(m, pa.float64()) for m in metrics] + [("error", pa.string())])


# ----------------------------------------------------------------------------------------------------------------
# Statistics


def clustered_mean_ci(values: np.ndarray, clusters: np.ndarray) -> dict[str, Any]:
    """Mean, per-value std (ddof 1), and a normal 95% interval with a standard error clustered by `clusters`."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "sem": None, "ci95": None, "n_images": 0, "n_prompts": 0}
    mean = float(values.mean())
    _, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    groups = int(inverse.max()) + 1
    result = {"mean": mean, "std": float(values.std(ddof=1)) if n > 1 else None, "sem": None, "ci95": None,
              "n_images": n, "n_prompts": groups}
    if groups > 1:
        residual_sums = np.bincount(inverse, weights=values - mean)
        sem = math.sqrt(groups / (groups - 1) * float((residual_sums ** 2).sum())) / n
        result["sem"] = sem
        result["ci95"] = [mean - Z_95 * sem, mean + Z_95 * sem]
    return result


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def resolve_prompts(path: str | Path, max_prompts: int | None = None) -> list[str]:
    """Prompts from a file, a manifest with `caption`, or a curation directory (its pairs.parquet)."""
    from curate.prompts import read_prompts

    path = Path(path)
    if path.is_dir():
        if not (path / "pairs.parquet").is_file():
            raise InputError(f"prompt directory {path} has no pairs.parquet; pass a prompt file, a manifest with a "
                             "`caption` column, or a directory written by `lpo curate ingest`.")
        path = path / "pairs.parquet"
    prompts = read_prompts(path)
    return prompts[:max_prompts] if max_prompts else prompts


def resolve_metric_specs(metrics: Sequence[str], models: dict[str, str], models_dir: Path | None
                         ) -> dict[str, str]:
    """The model spec of each metric (explicit, else models_dir/<metric>, else the registry default), checked
    without loading any weights (hub checkpoints of HPS and ImageReward are downloaded here)."""
    from curate.eval_metrics import DEFAULT_EVAL_MODELS, EVAL_METRICS, check_eval_spec, prefetch

    if not metrics:
        raise InputError(f"no metrics selected; pass --metrics, e.g. {','.join(EVAL_METRICS[:5])}.")
    unknown = [m for m in metrics if m not in EVAL_METRICS]
    if unknown:
        raise InputError(f"unknown metric(s) {unknown}; choose from {list(EVAL_METRICS)}.")
    if len(set(metrics)) != len(metrics):
        raise InputError(f"--metrics {','.join(metrics)} names a metric twice; list each once.")
    extra = sorted(set(models) - set(metrics))
    if extra:
        raise InputError(f"models given for {extra}, which are not among --metrics {list(metrics)}; add them to "
                         "--metrics or drop those model options.")
    specs = {}
    for metric in metrics:
        if metric in models:
            specs[metric] = models[metric]
        elif models_dir is not None:
            specs[metric] = str(Path(models_dir) / metric)
        else:
            specs[metric] = DEFAULT_EVAL_MODELS[metric]
        check_eval_spec(metric, specs[metric])
    for metric, spec in specs.items():
        prefetch(metric, spec)
    return specs


def _check_positive(**values: int | None) -> None:
    bad = [f"--{name.replace('_', '-')} {value}" for name, value in values.items() if value is not None and value < 1]
    if bad:
        raise InputError(f"{', '.join(bad)}: must be at least 1.")


def _torch_dtype(name: str, option: str, auto: Any = None) -> Any:
    """The torch dtype `name` names; "auto" gives `auto` where the option has one."""
    import torch

    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name == "auto" and auto is not None:
        return auto
    if name not in table:
        choices = (["auto"] if auto is not None else []) + list(table)
        raise InputError(f"{option} {name} is not one of {', '.join(choices)}.")
    return table[name]


def generation_settings(config: EvalConfig) -> dict[str, Any]:
    eta = config.eta if config.eta is not None else (1.0 if config.lrm is not None else 0.0)
    return {"base": config.base, "lora": str(config.lora) if config.lora else None,
            "lrm": str(config.lrm) if config.lrm else None, "candidates": config.candidates, "steps": config.steps,
            "guidance": config.guidance, "eta": eta, "seed": config.seed, "dtype": config.dtype}


def validate(config: EvalConfig) -> tuple[list[str], dict[str, str]]:
    """Check everything that can be checked before a model loads; return the prompts and the metric specs."""
    from reward.diffusion import check_lrm_matches
    from reward.lrm import family_of, read_lrm_config, read_unet_config

    missing = [f"--{name}" for name in ("base", "prompts", "out") if not getattr(config, name)]
    if missing:
        raise InputError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required, e.g. "
                         "`lpo eval --base DIR --prompts prompts.txt --out runs/eval-base`.")
    _check_positive(images_per_prompt=config.images_per_prompt, steps=config.steps, batch_size=config.batch_size,
                    score_batch_size=config.score_batch_size, candidates=config.candidates,
                    max_prompts=config.max_prompts)
    if config.images_per_prompt > MAX_IMAGES_PER_PROMPT:
        raise InputError(f"--images-per-prompt {config.images_per_prompt}: at most {MAX_IMAGES_PER_PROMPT} (image i "
                         "of prompt p uses seed + 1000 * p + i, so more would share seeds).")
    if config.grid_prompts < 0:
        raise InputError(f"--grid-prompts {config.grid_prompts} must be 0 or more.")
    if config.candidates > 1 and config.lrm is None and config.reward_url is None:
        raise InputError("--candidates > 1 needs --lrm (or --reward-url) to choose between the candidates.")
    eta = generation_settings(config)["eta"]
    if config.lrm is not None and eta <= 0:
        raise InputError(f"--eta {eta}: LRM-guided sampling needs eta > 0 (with eta 0 every candidate is the same).")
    _torch_dtype(config.dtype, "--dtype", auto="auto")
    _torch_dtype(config.score_dtype, "--score-dtype")
    if config.lora is not None and not Path(config.lora).is_dir():
        raise InputError(f"LoRA directory {config.lora} does not exist; pass the lora/ folder `lpo optimize` wrote.")
    prompts = resolve_prompts(config.prompts, config.max_prompts)
    family = family_of(read_unet_config(config.base))
    if config.lrm is not None:
        read_lrm_config(Path(config.lrm))
        check_lrm_matches(family, config.lrm, config.base)
    specs = resolve_metric_specs(config.metrics, config.models, config.models_dir)
    if config.reward_url is not None:
        remote_scorers(config.reward_url, list(specs))  # reachable, before anything is generated
    _check_same_run(Path(config.out), generation_settings(config))
    return prompts, specs


def _check_same_run(out: Path, settings: dict[str, Any]) -> None:
    path = out / RUN_FILE
    if not path.is_file():
        return
    stored = json.loads(path.read_text())
    changed = [f"{k}={stored.get(k)!r} (now {settings[k]!r})" for k in GENERATION_KEYS if stored.get(k) != settings[k]]
    if changed:
        raise InputError(f"{out} holds a run made with {', '.join(changed)}; resume with the same generation "
                         "settings, or pick a new --out.")


# ----------------------------------------------------------------------------------------------------------------
# Generation


def plan(prompts: Sequence[str], images_per_prompt: int, seed: int, out: Path) -> list[EvalItem]:
    """Every (prompt, image) of a run, with its seed and file."""
    from reward.generate import image_seed

    items = []
    for p, prompt in enumerate(prompts):
        for i in range(images_per_prompt):
            item = EvalItem(p, i, prompt, image_seed(seed, p, i), Path())
            items.append(dataclasses.replace(item, path=out / IMAGES_DIR / f"{item.key}.png"))
    return items


def finished(out: Path, items: Sequence[EvalItem]) -> set[str]:
    """Keys of the items whose record and image file are on disk. A torn last record line (an interrupted write) is
    dropped; a record that names another prompt or seed than the plan stops the run."""
    path = out / RECORDS_FILE
    if not path.is_file():
        return set()
    lines = path.read_text().splitlines()
    records, kept = {}, []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        records[record["key"]] = record
        kept.append(line)
    if len(kept) != len(lines):
        logger.warning("%s: dropped %d unreadable record line(s) of an interrupted write", path,
                       len(lines) - len(kept))
        write_text_atomic("".join(f"{line}\n" for line in kept), path)
    done = set()
    for item in items:
        record = records.get(item.key)
        if record is None:
            continue
        if record["prompt"] != item.prompt or record["seed"] != item.seed:
            raise InputError(f"{out}: image {item.key} was made for prompt {record['prompt']!r} with seed "
                             f"{record['seed']}, but prompt {item.prompt_index} is now {item.prompt!r} with seed "
                             f"{item.seed}: the prompt file changed. Use the same prompts to resume, or a new --out.")
        if item.path.is_file():
            done.add(item.key)
    return done


def _save_image_atomic(image: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)


@contextmanager
def _progress(description: str, total: int) -> Iterator[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


def load_generator(config: EvalConfig, device: str) -> tuple[Any, Any]:
    """The diffusion model (LoRA loaded; the VAE kept in float32 under half precision) and the LRM, if any."""
    import torch

    from reward.diffusion import DiffusionModel
    from reward.lrm import LatentRewardModel

    auto = torch.float16 if device.startswith("cuda") else torch.float32
    dtype = _torch_dtype(config.dtype, "--dtype", auto=auto)
    model = DiffusionModel.load(config.base, dtype=dtype, device=device)
    if dtype != torch.float32:
        model.vae.to(torch.float32)  # decoding in half precision overflows on the SDXL VAE
    if config.lora is not None:
        model.pipeline.load_lora_weights(str(config.lora))
    if config.lrm is not None:
        lrm = LatentRewardModel.from_pretrained(config.lrm).to(device)
    elif config.reward_url is not None and config.candidates > 1:
        from reward.lpo_train import remote_lrm

        lrm = remote_lrm(config.reward_url, model.family, config.base)
    else:
        lrm = None
    return model, lrm


def generate(config: EvalConfig, todo: Sequence[EvalItem], out: Path, device: str) -> None:
    """Generate `todo` in batches, each image from its own generator; append a record once its file is in place."""
    import torch

    from reward.sampler import sample

    model, lrm = load_generator(config, device)
    eta = generation_settings(config)["eta"]
    logger.info("generating %d images (%d steps, CFG %s, eta %s, batch %d) on %s", len(todo), config.steps,
                config.guidance, eta, config.batch_size, device)
    with open(out / RECORDS_FILE, "a") as records, _progress("generating", len(todo)) as advance:
        for start in range(0, len(todo), config.batch_size):
            batch = todo[start : start + config.batch_size]
            prompts = [item.prompt for item in batch]
            cond = model.encode_prompts(prompts)
            generators = [torch.Generator().manual_seed(item.seed) for item in batch]
            latents = sample(model, cond, generators, config.steps, config.guidance, eta, lrm=lrm, prompts=prompts,
                             candidates=config.candidates)["latents"]
            for item, image in zip(batch, model.decode(latents), strict=True):
                _save_image_atomic(image, item.path)
                record = {"key": item.key, "prompt_index": item.prompt_index, "image_index": item.image_index,
                          "prompt": item.prompt, "seed": item.seed, "path": f"{IMAGES_DIR}/{item.path.name}"}
                records.write(json.dumps(record) + "\n")
            records.flush()
            advance(len(batch))


# ----------------------------------------------------------------------------------------------------------------
# Scoring


def _read_scores(out: Path, metric: str, spec: str) -> dict[str, tuple[float | None, str | None]]:
    """Scores already computed for `metric` with the same spec; a changed spec starts the metric over."""
    header, lines = out / SCORES_DIR / f"{metric}.json", out / SCORES_DIR / f"{metric}.jsonl"
    if not header.is_file() or not lines.is_file():
        return {}
    if json.loads(header.read_text()).get("spec") != spec:
        logger.warning("%s: scored with another model before; rescoring every image with %s", metric, spec)
        lines.unlink()
        return {}
    scores = {}
    for line in lines.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line: that image is scored again
        scores[record["key"]] = (record["score"], record.get("error"))
    return scores


def _open_images(batch: Sequence[EvalItem]) -> tuple[list[Any], list[str | None]]:
    from PIL import Image

    images, errors = [], []
    for item in batch:
        try:
            with Image.open(item.path) as image:
                images.append(image.convert("RGB"))
            errors.append(None)
        except (OSError, ValueError) as err:
            images.append(None)
            errors.append(f"unreadable image: {err}")
    return images, errors


def _score_batch(scorer: Any, metric: str, batch: Sequence[EvalItem]) -> list[tuple[float | None, str | None]]:
    images, errors = _open_images(batch)
    good = [i for i, image in enumerate(images) if image is not None]
    scores: list[float | None] = [None] * len(batch)
    try:
        values = scorer.score([images[i] for i in good], [batch[i].prompt for i in good])
        for i, value in zip(good, values, strict=True):
            scores[i] = float(value)
    except Exception as err:  # isolate the image the model rejects
        logger.warning("%s: batch failed (%s); retrying one image at a time", metric, err)
        for i in good:
            try:
                scores[i] = float(scorer.score([images[i]], [batch[i].prompt])[0])
            except Exception as single:
                errors[i] = f"{metric} failed: {type(single).__name__}: {single}"
    return list(zip(scores, errors, strict=True))


def remote_scorers(url: str | None, metrics: Sequence[str]) -> dict[str, Any]:
    """The metrics a running reward service serves, as scorers; the others stay local."""
    if url is None:
        return {}
    from reward.client import RemoteScorer, RewardServiceError, connect

    try:
        client, models = connect(url)
    except RewardServiceError as err:
        raise InputError(str(err)) from None
    served = {m: RemoteScorer(client, m, models[m]) for m in metrics if m in models}
    logger.info("scoring %s at %s; %s locally", sorted(served) or "nothing", url,
                sorted(set(metrics) - set(served)) or "nothing")
    return served


def score_items(items: Sequence[EvalItem], specs: dict[str, str], out: Path, batch_size: int, device: str,
                dtype: Any, remote: dict[str, Any] | None = None,
                ) -> tuple[dict[str, dict[str, tuple[float | None, str | None]]], dict[str, dict]]:
    """Score every item with every metric (one model in memory at a time), resuming from scores/<metric>.jsonl.
    Returns the scores per metric by item key, and each metric's spec, model id and scale."""
    import gc

    import torch

    from curate.eval_metrics import load_metric

    all_scores, models = {}, {}
    (out / SCORES_DIR).mkdir(parents=True, exist_ok=True)
    for metric, spec in specs.items():
        scores = _read_scores(out, metric, spec)
        todo = [item for item in items if item.key not in scores]
        header = out / SCORES_DIR / f"{metric}.json"
        if todo:
            scorer = (remote or {}).get(metric) or load_metric(metric, spec, device=device, dtype=dtype)
            info = {"spec": spec, "model_id": scorer.model_id, "scale": scorer.scale}
            write_text_atomic(json.dumps(info, indent=2) + "\n", header)
            with open(out / SCORES_DIR / f"{metric}.jsonl", "a") as lines, _progress(metric, len(todo)) as advance:
                for start in range(0, len(todo), batch_size):
                    batch = todo[start : start + batch_size]
                    for item, (score, error) in zip(batch, _score_batch(scorer, metric, batch), strict=True):
                        scores[item.key] = (score, error)
                        lines.write(json.dumps({"key": item.key, "score": score, "error": error}) + "\n")
                    lines.flush()
                    advance(len(batch))
            logger.info("%s: scored %d images with %s", metric, len(todo), scorer.model_id)
            del scorer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        all_scores[metric] = scores
        models[metric] = json.loads(header.read_text())
    return all_scores, models


# ----------------------------------------------------------------------------------------------------------------
# Outputs


def _relative(path: Path, out: Path) -> str:
    try:
        return str(path.resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path.resolve())


def write_outputs(items: Sequence[EvalItem], scores: dict[str, dict], models: dict[str, dict], out: Path,
                  meta: dict[str, Any], grid_prompts: int) -> dict[str, Any]:
    """images.parquet, summary.json, summary.md and grid.png of a scored run; returns the summary."""
    metrics = list(scores)
    rows: dict[str, list] = {name: [] for name in table_schema(metrics).names}
    for item in items:
        rows["prompt_index"].append(item.prompt_index)
        rows["image_index"].append(item.image_index)
        rows["prompt"].append(item.prompt)
        rows["seed"].append(item.seed)
        rows["image_path"].append(_relative(item.path, out))
        errors = []
        for metric in metrics:
            score, error = scores[metric].get(item.key, (None, "not scored"))
            rows[metric].append(score)
            if error and error not in errors:
                errors.append(error)
        rows["error"].append("; ".join(errors) or None)
    table = pa.Table.from_pydict(rows, schema=table_schema(metrics))
    write_atomic(table, out / TABLE_FILE)
    frame = pl.from_arrow(table)
    summary = {**meta, "images": len(items), "prompts": frame["prompt_index"].n_unique(),
               "images_with_errors": int(frame["error"].is_not_null().sum()), "statistics": STATISTICS,
               "metrics": {}}
    for metric in metrics:
        scored = frame.filter(pl.col(metric).is_not_null())
        stats = clustered_mean_ci(scored[metric].to_numpy(), scored["prompt_index"].to_numpy())
        summary["metrics"][metric] = {**stats, "model_id": models[metric]["model_id"],
                                      "scale": models[metric]["scale"]}
    write_text_atomic(json.dumps(summary, indent=2) + "\n", out / SUMMARY_FILE)
    write_text_atomic(summary_markdown(summary), out / SUMMARY_MD)
    if grid_prompts > 0 and items:
        save_grid(items, grid_prompts, out / GRID_FILE)
    return summary


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _fmt_ci(ci: Sequence[float] | None) -> str:
    return "n/a" if ci is None else f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def summary_markdown(summary: dict[str, Any]) -> str:
    """A markdown table of one run's metrics, with the generation settings under it."""
    lines = ["| metric | mean | 95% CI | std | images | model | scale |", "|---|---|---|---|---|---|---|"]
    for metric, s in summary["metrics"].items():
        lines.append(f"| {metric} | {_fmt(s['mean'])} | {_fmt_ci(s['ci95'])} | {_fmt(s['std'])} | {s['n_images']} "
                     f"| {_cell(s['model_id'])} | {_cell(s['scale'])} |")
    lines.append("")
    lines.append(f"{summary['images']} images over {summary['prompts']} prompts. {summary['statistics']}.")
    generation = summary.get("generation")
    if generation:
        settings = ", ".join(f"{k} {v}" for k, v in generation.items() if v is not None)
        lines.append(f"Generation: {settings}.")
    return "\n".join(lines) + "\n"


def save_grid(items: Sequence[EvalItem], prompts: int, path: Path) -> Path | None:
    """A PNG grid, one row per prompt (the first `prompts` by index), its images in image order."""
    from PIL import Image

    from reward.diffusion import save_image_grid

    rows: dict[int, list[EvalItem]] = {}
    for item in sorted(items, key=lambda it: (it.prompt_index, it.image_index)):
        if item.prompt_index in rows or len(rows) < prompts:
            rows.setdefault(item.prompt_index, []).append(item)
    cols = max(len(row) for row in rows.values())
    cell = None
    images = []
    for row in rows.values():
        for index in range(cols):
            image = None
            if index < len(row):
                try:
                    with Image.open(row[index].path) as opened:
                        image = opened.convert("RGB")
                except (OSError, ValueError):
                    image = None
            cell = cell or (image.size if image is not None else None)
            images.append(image)
    if cell is None:
        return None
    blank = Image.new("RGB", cell, "white")
    images = [blank if image is None else image if image.size == cell else image.resize(cell) for image in images]
    return save_image_grid(images, len(rows), path)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "diffusers", "transformers", "open_clip_torch", "timm"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def _score_device_dtype(device: str, score_dtype: str) -> tuple[str, Any]:
    from reward.lrm import resolve_device

    device = resolve_device(device)
    return device, _torch_dtype(score_dtype, "--score-dtype")


def run(config: EvalConfig) -> dict[str, Any]:
    """Generate every (prompt, image) with its own seed (skipping finished images), score every image with every
    metric, and write the per-image table, the summary and the grid."""
    import torch
    from PIL import Image

    from curate import config as cfg
    from reward.lrm import resolve_device

    prompts, specs = validate(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = generation_settings(config)
    cfg.save(config, out / "config.json")
    write_text_atomic(json.dumps(settings, indent=2) + "\n", out / RUN_FILE)
    items = plan(prompts, config.images_per_prompt, config.seed, out)
    done = finished(out, items)
    todo = [item for item in items if item.key not in done]
    device = resolve_device(config.device)
    if todo:
        logger.info("%d of %d images already generated; generating %d", len(done), len(items), len(todo))
        generate(config, todo, out, device)
    else:
        logger.info("all %d images already generated", len(items))
    with Image.open(items[0].path) as first:
        resolution = list(first.size)
    score_device, score_dtype = _score_device_dtype(config.device, config.score_dtype)
    scores, models = score_items(items, specs, out, config.score_batch_size, score_device, score_dtype,
                                 remote_scorers(config.reward_url, list(specs)))
    auto = torch.float16 if device.startswith("cuda") else torch.float32
    generation = {"sampler": "DDIM", **settings,
                  "torch_dtype": str(_torch_dtype(config.dtype, "--dtype", auto=auto)).removeprefix("torch."),
                  "images_per_prompt": config.images_per_prompt, "resolution": resolution,
                  "prompts_file": str(config.prompts)}
    meta = {"generation": generation, "generated_now": len(todo), "versions": _versions()}
    return write_outputs(items, scores, models, out, meta, config.grid_prompts)


# ----------------------------------------------------------------------------------------------------------------
# Scoring images that exist


_INDEXED_NAME = re.compile(r"^p?(\d+)(?:[-_]i?(\d+))?$")


def _manifest_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of an image manifest: .json (a list of objects, or samples.json of `lpo sample`), .csv or .parquet."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except ValueError as err:
            raise InputError(f"{path} is not valid JSON ({err}); give a JSON list of {{path, prompt}} objects.") \
                from None
        if isinstance(data, dict) and isinstance(data.get("images"), list):  # samples.json of `lpo sample`
            data = data["images"]
            kinds = {row.get("kind") for row in data if isinstance(row, dict)} - {None}
            if len(kinds) > 1:
                raise InputError(f"{path} holds {sorted(kinds)} images of the same prompts and seeds; write a "
                                 "manifest listing the ones to score (path and prompt per image).")
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise InputError(f"{path} must hold a JSON list of objects with a path and a prompt.")
        return data
    if path.suffix in (".csv", ".parquet"):
        frame = pl.read_csv(path) if path.suffix == ".csv" else pl.read_parquet(path)
        return frame.to_dicts()
    raise InputError(f"image manifest {path} is not .json, .csv or .parquet; give one of those, or an images folder.")


def _column(row: dict[str, Any], names: Sequence[str]) -> Any:
    return next((row[name] for name in names if row.get(name) is not None), None)


def _items_from_manifest(path: Path, prompts: list[str] | None) -> list[EvalItem]:
    rows = _manifest_rows(path)
    if not rows:
        raise InputError(f"image manifest {path} lists no images.")
    base = path.parent
    # Prompt indices follow --prompts when given, else the order in which prompts first appear.
    index_of = {prompt: i for i, prompt in enumerate(prompts)} if prompts is not None else {}
    counts: dict[str, int] = {}
    items, seen = [], set()
    for number, row in enumerate(rows):
        file, prompt = _column(row, PATH_COLUMNS), _column(row, PROMPT_COLUMNS)
        if not isinstance(file, str) or not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{path}, row {number}: expected a path ({'/'.join(PATH_COLUMNS)}) and a non-empty "
                             f"prompt ({'/'.join(PROMPT_COLUMNS)}), found {sorted(row)}.")
        if prompts is not None and prompt not in index_of:
            raise InputError(f"{path}, row {number}: prompt {prompt!r} is not in the --prompts file: the images and "
                             "the prompts do not match. Drop --prompts or fix the manifest.")
        index_of.setdefault(prompt, len(index_of))
        image_index = row.get("image_index")
        image_index = counts.get(prompt, 0) if image_index is None else int(image_index)
        counts[prompt] = max(counts.get(prompt, 0), image_index + 1)
        if (prompt, image_index) in seen:
            raise InputError(f"{path}, row {number}: prompt {prompt!r} has image index {image_index} twice; each "
                             "(prompt, image index) must name one image.")
        seen.add((prompt, image_index))
        file_path = Path(file) if Path(file).is_absolute() else base / file
        seed = row.get("seed")
        items.append(EvalItem(index_of[prompt], image_index, prompt, None if seed is None else int(seed),
                              file_path))
    return items


def _items_from_folder(folder: Path, prompts: list[str]) -> list[EvalItem]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    unmatched = [p.name for p in files if not _INDEXED_NAME.match(p.stem)]
    if unmatched:
        raise InputError(f"{folder}: {len(unmatched)} file(s) such as {unmatched[:3]} are not named "
                         "<prompt index>.png or <prompt index>_<image index>.png, so they cannot be matched to "
                         "--prompts; rename them or pass a manifest listing path and prompt.")
    items, seen = [], {}
    for file in files:
        match = _INDEXED_NAME.match(file.stem)
        p, i = int(match.group(1)), int(match.group(2) or 0)
        if p >= len(prompts):
            raise InputError(f"{folder}: {file.name} is for prompt {p}, but --prompts has {len(prompts)} prompts "
                             f"(indices 0-{len(prompts) - 1}): the images folder does not match the prompts.")
        if (p, i) in seen:
            raise InputError(f"{folder}: {seen[(p, i)]} and {file.name} are both image {i} of prompt {p}.")
        seen[(p, i)] = file.name
        items.append(EvalItem(p, i, prompts[p], None, file))
    without = sorted(set(range(len(prompts))) - {item.prompt_index for item in items})
    if without:
        raise InputError(f"{folder}: prompts {without[:10]}{' ...' if len(without) > 10 else ''} of --prompts have no "
                         f"image ({len(without)} of {len(prompts)}): the images folder does not match the prompts.")
    return items


def resolve_images(images: Path, prompts_file: Path | None) -> list[EvalItem]:
    """Pair each image with its prompt: a manifest (or a folder holding samples.json / images.parquet) lists both;
    a bare folder names files by prompt index, matched to `prompts_file`."""
    images = Path(images)
    prompts = resolve_prompts(prompts_file) if prompts_file is not None else None
    if not images.exists():
        raise InputError(f"--images {images} does not exist; pass an images folder or a manifest.")
    manifest = images
    if images.is_dir():
        manifest = next((images / name for name in (TABLE_FILE, "samples.json") if (images / name).is_file()), None)
        if manifest is None:
            if prompts is None:
                raise InputError(f"{images} is a folder without a manifest (images.parquet or samples.json): pass "
                                 "--prompts to match its files <prompt index>_<image index>.png to prompts.")
            return _items_from_folder(images, prompts)
    items = _items_from_manifest(manifest, prompts)
    missing = [str(item.path) for item in items if not item.path.is_file()]
    if missing:
        raise InputError(f"{len(missing)} image(s) listed in {manifest} do not exist, e.g. {missing[:3]}; fix the "
                         "paths (relative paths are read from the manifest's folder).")
    return items


def score_existing(config: EvalScoreConfig) -> dict[str, Any]:
    """Score images that already exist (paired with prompts by `resolve_images`); same outputs as `run`."""
    from curate import config as cfg

    if not config.images or not config.out:
        raise InputError("--images and --out are required, e.g. `lpo eval score --images runs/samples --out DIR`.")
    _check_positive(score_batch_size=config.score_batch_size)
    _torch_dtype(config.score_dtype, "--score-dtype")
    items = resolve_images(Path(config.images), config.prompts)
    specs = resolve_metric_specs(config.metrics, config.models, config.models_dir)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(config, out / "config.json")
    device, dtype = _score_device_dtype(config.device, config.score_dtype)
    scores, models = score_items(items, specs, out, config.score_batch_size, device, dtype,
                                 remote_scorers(config.reward_url, list(specs)))
    meta = {"generation": None, "source": str(config.images), "versions": _versions()}
    return write_outputs(items, scores, models, out, meta, config.grid_prompts)


# ----------------------------------------------------------------------------------------------------------------
# Comparing two runs


def read_run(run_dir: Path) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The per-image table and summary of a run directory."""
    from curate.manifest import check_schema

    run_dir = Path(run_dir)
    table, summary = run_dir / TABLE_FILE, run_dir / SUMMARY_FILE
    if not table.is_file() or not summary.is_file():
        raise InputError(f"{run_dir} is not an evaluation run (no {TABLE_FILE} and {SUMMARY_FILE}); pass a directory "
                         "written by `lpo eval` or `lpo eval score`.")
    summary_data = json.loads(summary.read_text())
    check_schema(table, table_schema(list(summary_data["metrics"])), "evaluation")
    return pl.read_parquet(table), summary_data


def compare(config: EvalCompareConfig) -> dict[str, Any]:
    """Per-metric means of two runs over their paired images, the mean paired difference with a prompt-clustered
    95% interval, and the per-prompt win rate of B over A."""
    if not config.run_a or not config.run_b:
        raise InputError("give two run directories: `lpo eval compare RUN_A RUN_B`.")
    a, summary_a = read_run(config.run_a)
    b, summary_b = read_run(config.run_b)
    metrics = [m for m in summary_a["metrics"] if m in summary_b["metrics"]]
    if not metrics:
        raise InputError(f"{config.run_a} ({list(summary_a['metrics'])}) and {config.run_b} "
                         f"({list(summary_b['metrics'])}) share no metric; score both with the same --metrics.")
    for metric in metrics:
        model_a, model_b = summary_a["metrics"][metric]["model_id"], summary_b["metrics"][metric]["model_id"]
        if model_a != model_b:
            raise InputError(f"{metric} was computed with {model_a!r} in {config.run_a} but {model_b!r} in "
                             f"{config.run_b}: the scores are not comparable; rescore one run with the other's model.")
    keys = ["prompt", "image_index"]
    joined = a.select(keys + metrics).join(b.select(keys + metrics), on=keys, how="inner", suffix="_b")
    if joined.height == 0:
        raise InputError(f"{config.run_a} and {config.run_b} have no (prompt, image index) in common: they were made "
                         "from different prompts; compare runs of the same prompt set.")
    result: dict[str, Any] = {
        "run_a": str(config.run_a), "run_b": str(config.run_b), "pairs": joined.height,
        "prompts": joined["prompt"].n_unique(), "only_in_a": a.height - joined.height,
        "only_in_b": b.height - joined.height, "statistics": COMPARE_STATISTICS, "metrics": {},
        "generation": {"a": summary_a.get("generation"), "b": summary_b.get("generation")},
    }
    for metric in metrics:
        paired = joined.filter(pl.col(metric).is_not_null() & pl.col(f"{metric}_b").is_not_null())
        score_a, score_b = paired[metric].to_numpy(), paired[f"{metric}_b"].to_numpy()
        prompts = paired["prompt"].to_numpy()
        delta = clustered_mean_ci(score_b - score_a, prompts)
        per_prompt = paired.group_by("prompt").agg(pl.col(metric).mean().alias("a"),
                                                   pl.col(f"{metric}_b").mean().alias("b"))
        wins = int((per_prompt["b"] > per_prompt["a"]).sum())
        losses = int((per_prompt["b"] < per_prompt["a"]).sum())
        ties = per_prompt.height - wins - losses
        result["metrics"][metric] = {
            "mean_a": float(score_a.mean()) if len(score_a) else None,
            "mean_b": float(score_b.mean()) if len(score_b) else None,
            "delta": delta["mean"], "ci95": delta["ci95"], "sem": delta["sem"], "n_pairs": delta["n_images"],
            "n_prompts": delta["n_prompts"], "wins": wins, "losses": losses, "ties": ties,
            "win_rate": (wins + 0.5 * ties) / per_prompt.height if per_prompt.height else None,
            "model_id": summary_a["metrics"][metric]["model_id"], "scale": summary_a["metrics"][metric]["scale"],
        }
    if config.out is not None:
        out = Path(config.out)
        write_text_atomic(compare_markdown(result), out)
        write_text_atomic(json.dumps(result, indent=2) + "\n", out.with_suffix(".json"))
    return result


def compare_markdown(result: dict[str, Any]) -> str:
    """The comparison as a markdown table."""
    name_a, name_b = Path(result["run_a"]).name, Path(result["run_b"]).name
    lines = [f"| metric | A: {name_a} | B: {name_b} | delta (B - A) | 95% CI of delta | B wins (prompts) |",
             "|---|---|---|---|---|---|"]
    for metric, m in result["metrics"].items():
        win = "n/a" if m["win_rate"] is None else f"{100 * m['win_rate']:.1f}% ({m['wins']}/{m['n_prompts']})"
        lines.append(f"| {metric} | {_fmt(m['mean_a'])} | {_fmt(m['mean_b'])} | {_fmt(m['delta'], 4)} | "
                     f"{_fmt_ci(m['ci95'])} | {win} |")
    lines.append("")
    lines.append(f"{result['pairs']} paired images over {result['prompts']} prompts "
                 f"({result['only_in_a']} only in A, {result['only_in_b']} only in B). {result['statistics']}.")
    return "\n".join(lines) + "\n"
