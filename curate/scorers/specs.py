"""The metrics, their default models, and the checks of a model spec (a hub id or a local folder) that run before
any weights load: a wrong folder, a missing file or a model of another type stops a run with a message naming it.

Local folders are checked from their config files; for a hub id at most a config file is fetched (the check is
skipped with a warning when the hub cannot be reached)."""

from __future__ import annotations

import functools
import importlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from lpo.core import refs
from lpo.core.errors import InputError
from lpo.core.refs import cached_download, is_path_like

logger = logging.getLogger(__name__)

HPS_REPO = "xswu/HPSv2"
IMAGEREWARD_REPO = "THUDM/ImageReward"
BVQA_MODEL = "Salesforce/blip-vqa-capfilt-large"


@dataclass(frozen=True)
class Metric:
    """One metric of the registry: what varies by metric is a field here, so a new metric is one record (plus its
    scorer's check and load functions, and its tests).

    `check`, `load` and `prefetch` name functions of the scorer module `lpo.curate.scorers.<module>`, imported when
    the metric is first used: `check(spec)` refuses an unusable model spec before any weights load,
    `load(spec, device=, dtype=, **options)` returns the Scorer, `prefetch(spec)` downloads what the load will need.
    With `by_name` each takes the metric's name first (one function serving several metrics)."""

    name: str
    default_model: str
    model_help: str  # the `--<name>-model` option's help; the default model is appended
    module: str
    check: str
    load: str
    options: tuple[str, ...] = ()  # the load options `load_scorer` accepts
    prefetch: str | None = None
    by_name: bool = False
    curation_rank: int = 0  # its place among the curation metrics (scoring, MPCF, the reward service); 0: not one
    curation_default: bool = False  # scored by default and filtered on by the `all` rule
    eval_default: bool = False  # in `lpo eval`'s default metrics (the LPO paper's Pick-a-Pic table)
    needs_record: bool = False  # scored against each prompt's benchmark record, not its text (GenEval)
    paper_filter_model: str | None = None  # the model the LPO paper's filter thresholds were set on
    flags: tuple[str, ...] = ()  # the model option's flags (default: --<name>-model)

    def function(self, role: str) -> Callable[..., Any]:
        """The scorer module's `check`, `load` or `prefetch` function (None when the metric has no such step)."""
        name = getattr(self, role)
        if name is None:
            return None
        function = getattr(importlib.import_module(f"lpo.curate.scorers.{self.module}"), name)
        return functools.partial(function, self.name) if self.by_name else function


# Every metric, in the order tables list them (the LPO paper's table first).
REGISTRY: tuple[Metric, ...] = (
    Metric("pickscore", "yuvalkirstain/PickScore_v1", "PickScore model: hub id or local directory.", "clip",
           "check_pickscore", "load_pickscore", options=("processor", "text_cache_size"), curation_rank=1,
           curation_default=True, eval_default=True),
    Metric("hpsv2", HPS_REPO, "HPS v2 model: hub repo with HPS_v2_compressed.pt, a folder holding it, or the file.",
           "clip", "check_hps", "load_hps", prefetch="prefetch_hps", by_name=True, eval_default=True),
    Metric("hpsv21", HPS_REPO, "HPS v2.1 model: hub repo with HPS_v2.1_compressed.pt, a folder holding it, or the "
           "file.", "clip", "check_hps", "load_hps", prefetch="prefetch_hps", by_name=True, eval_default=True),
    Metric("imagereward", IMAGEREWARD_REPO, "ImageReward model: hub id or a folder with ImageReward.pt and "
           "med_config.json.", "imagereward", "check_imagereward", "load_imagereward",
           prefetch="prefetch_imagereward", eval_default=True),
    Metric("aesthetic", "trl-lib/ddpo-aesthetic-predictor", "Aesthetic predictor: hub id or local directory.",
           "aesthetic", "check_aesthetic", "load_aesthetic", options=("clip_model", "head_file"), curation_rank=4,
           eval_default=True, paper_filter_model="trl-lib/ddpo-aesthetic-predictor"),
    Metric("clip", "hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "CLIP model: hf-hub:ID, ARCH:TAG or local "
           "open_clip directory.", "clip", "check_clip", "load_clip", options=("text_cache_size",), curation_rank=2,
           curation_default=True, paper_filter_model="hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    Metric("vqa", "Qwen/Qwen2.5-VL-7B-Instruct", "VQA model: vision-language hub id or directory, or t2v:MODEL.",
           "vqa", "check_vqa", "load_vqa", options=("question_template", "answer"), curation_rank=3,
           curation_default=True, paper_filter_model="t2v:clip-flant5-xxl"),
    Metric("geneval", "facebook/mask2former-swin-small-coco-instance",  # + the colour CLIP, ViT-L-14:openai
           "GenEval detector (a transformers Mask2Former COCO instance model), optionally ',CLIP' for the colour "
           "classifier (open_clip spec; default ViT-L-14:openai), or a folder with detector/ and clip/.", "geneval",
           "check_geneval", "load_geneval", needs_record=True, flags=("--geneval-model", "--geneval-detector")),
    *(Metric(f"t2i-{kind}", BVQA_MODEL, f"T2I-CompBench++ {kind} B-VQA model: a transformers BLIP VQA hub id or "
             "directory.", "bvqa", "check_bvqa", "load_bvqa", by_name=True) for kind in ("color", "shape", "texture")),
)
METRIC_RECORDS: dict[str, Metric] = {metric.name: metric for metric in REGISTRY}

# The registry's views, for the code that asks one question of it.
METRICS: tuple[str, ...] = tuple(METRIC_RECORDS)
CURATION_METRICS: tuple[str, ...] = tuple(m.name for m in sorted((m for m in REGISTRY if m.curation_rank),
                                                                 key=lambda m: m.curation_rank))
DEFAULT_CURATION_METRICS: tuple[str, ...] = tuple(m for m in CURATION_METRICS if METRIC_RECORDS[m].curation_default)
T2I_METRICS: tuple[str, ...] = tuple(m.name for m in REGISTRY if m.module == "bvqa")
RECORD_METRICS: tuple[str, ...] = tuple(m.name for m in REGISTRY if m.needs_record)
DEFAULT_EVAL_METRICS: tuple[str, ...] = tuple(m.name for m in REGISTRY if m.eval_default)
DEFAULT_MODELS: dict[str, str] = {m.name: m.default_model for m in REGISTRY}
# The models the LPO paper's filter thresholds were set on (design/method.md section 3): VQAScore from CLIP-FlanT5-XXL
# (t2v_metrics), LAION's ViT-H-14 CLIP and the LAION aesthetic predictor (the last two are the registry's defaults).
PAPER_FILTER_MODELS: dict[str, str] = {m.name: m.paper_filter_model for m in REGISTRY if m.paper_filter_model}


def check_metric(metric: str, metrics: tuple[str, ...] = METRICS) -> None:
    if metric not in metrics:
        raise InputError(f"unknown metric {metric!r}: expected one of {', '.join(metrics)}; fix the metric name")


def resolve_specs(metrics: list[str] | tuple[str, ...], models: dict[str, str], models_dir: str | Path | None,
                  default: Callable[[str], str | None] = DEFAULT_MODELS.get) -> dict[str, str | None]:
    """The model spec of each metric: explicit (`models`), else `models_dir/<metric>`, else `default(metric)`."""
    unknown = sorted(set(models) - set(metrics))
    if unknown:
        raise InputError(f"models given for {unknown}, which are not among --metrics {list(metrics)}; add them to "
                         "--metrics or drop those model options.")
    if len(set(metrics)) != len(metrics):
        raise InputError(f"--metrics {','.join(metrics)} names a metric twice; list each once.")
    specs: dict[str, str | None] = {}
    for metric in metrics:
        if metric in models:
            specs[metric] = models[metric]
        elif models_dir is not None:
            specs[metric] = str(Path(models_dir) / metric)
        else:
            specs[metric] = default(metric)
    return specs




def local_path(metric: str, spec: str) -> Path | None:
    """The local path `spec` names, None when it reads as a hub id; a path-like spec that does not exist fails."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if is_path_like(spec) or spec.strip("/").count("/") > 1:
        inside = "" if is_path_like(spec) else " (a folder inside a hub repository is not read for scorers)"
        raise InputError(
            f"{metric} model path {spec!r} does not exist: it is neither an existing path nor a hub id (ORG/NAME) "
            f"such as {DEFAULT_MODELS[metric]!r}{inside}; fix the path"
        )
    return None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {path}: {err}; expected a JSON model config, fix or rewrite the file") from err


def describe_dir(path: Path) -> str:
    if (path / "model_index.json").is_file():
        return "a diffusers pipeline (model_index.json)"
    if (path / "open_clip_config.json").is_file():
        return "an open_clip model (open_clip_config.json)"
    if (path / "config.json").is_file():
        config = read_json(path / "config.json")
        if "lpo_scorer" in config:
            return f"an lpo {config['lpo_scorer']!r} scorer folder"
        if "model_type" in config:
            return f"a transformers model of type {config['model_type']!r}"
        if "_class_name" in config:
            return f"a diffusers {config['_class_name']} folder"
        return "a config.json without model_type"
    return "no model config (config.json, open_clip_config.json or model_index.json)"


def hub_json(metric: str, repo_id: str, filename: str) -> dict | None:
    """`filename` of a hub repo, parsed; None when the hub cannot be reached (the load reports it later)."""
    try:
        path = cached_download(repo_id, filename)
    except GatedRepoError as err:
        raise InputError(
            f"{metric} model {repo_id!r} is gated on the Hugging Face Hub: accept its licence on the model page, "
            "then log in with `hf auth login`"
        ) from err
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as err:
        raise InputError(
            f"{metric} model {repo_id!r} is neither an existing local path nor a model on the Hub: "
            f"expected e.g. {DEFAULT_MODELS[metric]!r}; fix the name (or log in for a private repo)"
        ) from err
    except RemoteEntryNotFoundError as err:
        raise InputError(
            f"{metric} model {repo_id!r} has no {filename} on the Hugging Face Hub, so it is not a model of the "
            f"expected type; pass a model such as {DEFAULT_MODELS[metric]!r}"
        ) from err
    except (LocalEntryNotFoundError, OSError) as err:
        logger.warning("could not fetch %s of %s to check it (%s); check skipped", filename, repo_id, err)
        return None
    return read_json(Path(path))


def hub_file(metric: str, repo: str, filename: str) -> Path:
    """A file of a hub repo from the local cache or the Hub; InputError naming the download when unavailable."""
    try:
        return refs.hub_file(repo, filename)
    except InputError as err:
        raise InputError(f"{metric} needs {filename} from the Hub repo {repo!r}: {err} (`hf download {repo} "
                         f"{filename}`, or a local folder with --{metric}-model)") from None


def check_model_type(metric: str, spec: str, config: dict | None, where: str, expected: str,
                      accept: Callable[[str], bool]) -> None:
    if config is None:
        return
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not accept(model_type):
        found = f"model_type {model_type!r}" if model_type else "no model_type"
        raise InputError(
            f"{metric} model {spec!r}: expected {expected}, found {found} in {where}; "
            f"pass a model such as {DEFAULT_MODELS[metric]!r}"
        )


def transformers_config(metric: str, spec: str, expected: str, accept: Callable[[str], bool]) -> Path | None:
    """Check that `spec` (local dir or hub id) is a transformers model whose model_type `accept`s; its local path
    (None for a hub id)."""
    return checked_config(metric, spec, expected, accept)[0]


def checked_config(metric: str, spec: str, expected: str,
                   accept: Callable[[str], bool]) -> tuple[Path | None, dict | None]:
    """`transformers_config`'s check, returning (local path or None, the parsed config.json, None when a hub config
    could not be read), so a caller checking more of the config reads it once."""
    path = local_path(metric, spec)
    if path is None:
        config = hub_json(metric, spec, "config.json")
        check_model_type(metric, spec, config, "its hub config.json", expected, accept)
        return None, config
    config_file = path / "config.json"
    config = read_json(config_file) if path.is_dir() and config_file.is_file() else None
    if config is None or "model_type" not in config:
        found = describe_dir(path) if path.is_dir() else "a file"
        raise InputError(
            f"{metric} model {str(path)!r}: expected {expected} (a folder with config.json), found {found}; "
            f"pass a model such as {DEFAULT_MODELS[metric]!r}"
        )
    check_model_type(metric, str(path), config, str(config_file), expected, accept)
    return path, config


def resolve_relative(base: Path, value: str) -> str:
    candidate = base / value
    return str(candidate) if candidate.exists() else value
