"""The scorer registry: every image-text metric behind one `score(images, captions)` call, one float64 per image
(image i against caption i), on the scale of the published tables (design/field.md section 5).

| metric | module | score |
|---|---|---|
| pickscore | clip | exp(logit_scale) * cos of PickScore_v1 (about 20-23) |
| clip | clip | raw cosine of open_clip LAION ViT-H-14, as LPO's filter |
| hpsv2, hpsv21 | clip | 100 * cos with the HPS v2 / v2.1 checkpoint |
| vqa | vqa | VQAScore, P("Yes") |
| aesthetic | aesthetic | LAION improved aesthetic MLP, 1-10 |
| imagereward | imagereward | ImageReward, standardised MLP(BLIP) |
| geneval | geneval | GenEval: 1 if the image satisfies its prompt's record (objects, counts, colours, positions) |
| t2i-color, t2i-shape, t2i-texture | bvqa | T2I-CompBench++ B-VQA: product of BLIP-VQA P(yes) over noun phrases |

Each metric is one `Metric` record in `specs.REGISTRY` (default model, option help, its scorer module's check,
load and prefetch functions, load options, where it is used); every table below is a view of it. Curation (`lpo
curate score`, MPCF, the reward service's image route) uses `CURATION_METRICS`; evaluation (`lpo eval`) all of them.
`check_model_spec` validates a spec without reading weights; `load_scorer` loads. A spec pinned to a hub revision
(`owner/repo@revision`, `hf-hub:owner/repo@revision`) is read from that revision's files
(`lpo.core.refs.pinned_snapshot`). The package itself stays light (the command line reads the registry to build its
options): a scorer module, with its torch and model libraries, is imported when its record's check or load function
is first called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lpo.core.device import resolve_dtype
from lpo.core.errors import InputError
from lpo.core.refs import pinned_snapshot
from lpo.curate.scorers.specs import (
    CURATION_METRICS,
    DEFAULT_EVAL_METRICS,
    DEFAULT_MODELS,
    METRIC_RECORDS,
    METRICS,
    REGISTRY,
    Metric,
    check_metric,
    resolve_specs,
)

if TYPE_CHECKING:
    import torch

    from lpo.curate.scorers.base import Scorer

__all__ = ["CURATION_METRICS", "DEFAULT_EVAL_METRICS", "DEFAULT_MODELS", "METRICS", "METRIC_RECORDS", "REGISTRY",
           "Metric", "check_model_spec", "load_scorer", "prefetch", "resolve_specs"]

def check_model_spec(metric: str, spec: str) -> None:
    """Validate a metric name and model spec before any weights load; raise InputError when unusable.

    Local folders are checked from their config files; for a hub id at most a config file is fetched (the check is
    skipped with a warning when the hub cannot be reached).
    """
    check_metric(metric)
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(
            f"{metric} model spec {spec!r} is empty: expected a local path or a hub id such as "
            f"{DEFAULT_MODELS[metric]!r}"
        )
    METRIC_RECORDS[metric].function("check")(pinned_snapshot(spec))


def prefetch(metric: str, spec: str) -> None:
    """Download the hub files an HPS or ImageReward spec needs now, so an unavailable checkpoint stops a run before
    its images are generated rather than after (the other metrics load from the hub's cache when scoring)."""
    download = METRIC_RECORDS[metric].function("prefetch")
    if download is not None:
        download(pinned_snapshot(spec))


def load_scorer(metric: str, spec: str | None = None, *, device: str = "cpu", dtype: torch.dtype | None = None,
                **options: Any) -> Scorer:
    """Load the scorer for `metric` from `spec` (default DEFAULT_MODELS[metric]) on `device` in `dtype`.

    Options: pickscore ``processor``, ``text_cache_size``; clip ``text_cache_size``; vqa ``question_template``
    (with ``{}`` for the caption), ``answer``; aesthetic ``clip_model``, ``head_file``.
    """
    check_metric(metric)
    record = METRIC_RECORDS[metric]
    unknown = sorted(set(options) - set(record.options))
    if unknown:
        raise InputError(
            f"unknown {metric} scorer option(s) {', '.join(unknown)}: expected "
            f"{', '.join(sorted(record.options)) or 'none'}; remove or rename them"
        )
    spec = spec or record.default_model
    check_model_spec(metric, spec)
    return record.function("load")(pinned_snapshot(spec), device=device, dtype=dtype or resolve_dtype("float32"),
                                   **options)
