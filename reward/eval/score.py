"""`lpo eval score` and the scoring of every run: each image against its own prompt with every metric, resumable
per metric and image; and pairing images that exist with their prompts (a manifest, or files named by index)."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import polars as pl
import torch
from PIL import Image

from lpo.core import config as cfg
from lpo.core import rundir
from lpo.core.device import resolve_device, resolve_dtype
from lpo.core.errors import InputError
from lpo.core.files import write_text_atomic
from lpo.core.parts import RecordLog
from lpo.core.progress import progress
from lpo.curate.prompts import read_prompts
from lpo.curate.scorers import METRICS, check_model_spec, load_scorer, prefetch, resolve_specs
from lpo.curate.scorers.base import score_each
from lpo.curate.scorers.geneval import read_records
from lpo.curate.scorers.specs import RECORD_METRICS
from lpo.reward.eval.config import EvalScoreConfig
from lpo.reward.eval.items import SCORES_DIR, TABLE_FILE, EvalItem
from lpo.reward.eval.stats import write_outputs
from lpo.reward.serve.client import remote_scorers

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PATH_COLUMNS = ("path", "image_path", "image", "file")
PROMPT_COLUMNS = ("prompt", "caption")


def resolve_prompts(path: str | Path, max_prompts: int | None = None) -> list[str]:
    """Prompts from a file, a manifest with `caption`, a curation directory (its pairs.parquet), or GenEval's
    metadata file (its records' prompts)."""
    return resolve_prompt_records(path, max_prompts)[0]


def resolve_prompt_records(path: str | Path, max_prompts: int | None = None
                           ) -> tuple[list[str], list[dict[str, Any]] | None]:
    """(prompts, one benchmark record per prompt or None): GenEval's `evaluation_metadata.jsonl` gives each prompt
    its record (the task and the objects asked for, which `geneval` scores against); any other prompt file none."""

    path = Path(path)
    first = slice(max_prompts or None)
    records = read_records(path) if path.is_file() else None
    if records is not None:
        prompts = [record["prompt"] for record in records]
        if len(set(prompts)) != len(prompts):
            raise InputError(f"{path} gives one prompt two records; each prompt of a GenEval metadata file must be "
                             "unique.")
        return prompts[first], records[first]
    return read_prompts(path)[first], None


def check_records(metrics: Sequence[str], records: list[dict[str, Any]] | None, prompts_file: Any) -> None:
    """A metric that scores against each prompt's record (geneval) needs a prompt file that carries them."""

    needing = [m for m in metrics if m in RECORD_METRICS]
    if needing and records is None:
        raise InputError(f"--metrics {','.join(needing)} scores each image against its prompt's GenEval record, "
                         f"but {prompts_file} carries none: pass GenEval's prompts/evaluation_metadata.jsonl as "
                         "--prompts.")


def with_records(items: list[EvalItem], records: list[dict[str, Any]] | None) -> list[EvalItem]:
    """Each item with its prompt's record (by prompt text, so manifests in any order match)."""

    if records is None:
        return items
    by_prompt = {record["prompt"]: record for record in records}
    return [dataclasses.replace(item, record=by_prompt.get(item.prompt)) for item in items]


def resolve_metric_specs(metrics: Sequence[str], models: dict[str, str], models_dir: Path | None
                         ) -> dict[str, str]:
    """The model spec of each metric (explicit, else models_dir/<metric>, else the registry default), checked
    without loading any weights (hub checkpoints of HPS and ImageReward are downloaded here)."""

    if not metrics:
        raise InputError(f"no metrics selected; pass --metrics, e.g. {','.join(METRICS[:5])}.")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise InputError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}.")
    specs = resolve_specs(list(metrics), models, models_dir)
    for metric, spec in specs.items():
        check_model_spec(metric, spec)
    for metric, spec in specs.items():
        prefetch(metric, spec)
    return specs


@contextmanager
def _progress(description: str, total: int) -> Iterator[Any]:
    with progress(description, total, unit="images", transient=True) as tracker:
        yield tracker.advance


def _read_scores(out: Path, metric: str, spec: str) -> dict[str, tuple[float | None, str | None]]:
    """Scores already computed for `metric` with the same spec; a changed spec starts the metric over."""
    header, lines = out / SCORES_DIR / f"{metric}.json", out / SCORES_DIR / f"{metric}.jsonl"
    if not header.is_file() or not lines.is_file():
        return {}
    if json.loads(header.read_text()).get("spec") != spec:
        logger.warning("%s: scored with another model before; rescoring every image with %s", metric, spec)
        lines.unlink()
        return {}
    return {key: (record["score"], record.get("error")) for key, record in RecordLog(lines).records().items()}


def _open_images(batch: Sequence[EvalItem]) -> tuple[list[Any], list[str | None]]:
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


def score_items(items: Sequence[EvalItem], specs: dict[str, str], out: Path, batch_size: int, device: str,
                dtype: Any, remote: dict[str, Any] | None = None,
                ) -> tuple[dict[str, dict[str, tuple[float | None, str | None]]], dict[str, dict]]:
    """Score every item with every metric (one model in memory at a time), resuming from scores/<metric>.jsonl.
    Returns the scores per metric by item key, and each metric's spec, model id and scale."""

    all_scores, models = {}, {}
    (out / SCORES_DIR).mkdir(parents=True, exist_ok=True)
    for metric, spec in specs.items():
        scores = _read_scores(out, metric, spec)
        todo = [item for item in items if item.key not in scores]
        header = out / SCORES_DIR / f"{metric}.json"
        by_record = metric in RECORD_METRICS  # scored against the prompt's record, not its text
        if by_record and any(item.record is None for item in todo):
            raise InputError(f"{metric} needs each image's GenEval record; pass GenEval's evaluation_metadata.jsonl "
                             "as --prompts.")
        if todo:
            scorer = (remote or {}).get(metric) or load_scorer(metric, spec, device=device, dtype=dtype)
            info = {"spec": spec, "model_id": scorer.model_id, "scale": scorer.scale}
            earlier = json.loads(header.read_text())["model_id"] if scores and header.is_file() else None
            if earlier not in (None, scorer.model_id):  # e.g. a scorer whose computation changed since
                raise InputError(f"{len(scores)} {metric} scores in {out / SCORES_DIR} were made as {earlier!r}; "
                                 f"this run scores as {scorer.model_id!r}, and the two would mix in one mean: "
                                 f"delete {out / SCORES_DIR / metric}.json and .jsonl to score {metric} again.")
            write_text_atomic(json.dumps(info, indent=2) + "\n", header)
            log = RecordLog(out / SCORES_DIR / f"{metric}.jsonl")
            with log.appending() as append, _progress(metric, len(todo)) as advance:
                for start in range(0, len(todo), batch_size):
                    batch = todo[start : start + batch_size]
                    images, errors = _open_images(batch)
                    texts = [item.record if by_record else item.prompt for item in batch]
                    scored = list(zip(*score_each(scorer, images, texts, errors), strict=True))
                    details = _details(scorer, images)
                    lines = []
                    for j, (item, (score, error)) in enumerate(zip(batch, scored, strict=True)):
                        scores[item.key] = (score, error)
                        lines.append({"key": item.key, "score": score, "error": error}
                                     | ({"detail": details[j]} if j in details else {}))
                    append(lines)
                    advance(len(batch))
            logger.info("%s: scored %d images with %s", metric, len(todo), scorer.model_id)
            del scorer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        all_scores[metric] = scores
        models[metric] = json.loads(header.read_text())
    return all_scores, models


def _details(scorer: Any, images: Sequence[Any]) -> dict[int, Any]:
    """Per image of the batch, what a scorer reports beside its score (GenEval's task, reasons and detections), when
    the batch was scored in one call."""
    details = getattr(scorer, "details", None)
    good = [j for j, image in enumerate(images) if image is not None]
    return dict(zip(good, details)) if details is not None and len(details) == len(good) else {}


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
    prompts, records = resolve_prompt_records(prompts_file) if prompts_file is not None else (None, None)
    return with_records(_resolve_images(images, prompts), records)


def _resolve_images(images: Path, prompts: list[str] | None) -> list[EvalItem]:
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

    if not config.images or not config.out:
        raise InputError("--images and --out are required, e.g. `lpo eval score --images runs/samples --out DIR`.")
    cfg.check_positive(score_batch_size=config.score_batch_size)
    resolve_dtype(config.score_dtype, option="--score-dtype", auto=None)
    rundir.claim(config.out, "eval")
    resolve_device(config.device)
    items = resolve_images(Path(config.images), config.prompts)
    if any(item.record is None for item in items):  # a metric that reads records needs them for every image
        check_records(config.metrics, None, config.prompts)
    specs = resolve_metric_specs(config.metrics, config.models, config.models_dir)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(config, out / "config.json")
    device, dtype = resolve_device(config.device), resolve_dtype(config.score_dtype, option="--score-dtype", auto=None)
    scores, models = score_items(items, specs, out, config.score_batch_size, device, dtype,
                                 remote_scorers(config.reward_url, list(specs)))
    meta = {"generation": None, "source": str(config.images), "versions": _versions()}
    return write_outputs(items, scores, models, out, meta, config.grid_prompts)


def _versions() -> dict[str, str]:
    found = {}
    for package in ("torch", "diffusers", "transformers", "open_clip_torch", "timm"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found
