"""The metric registry: one `Metric` record per metric, from which every table and option is derived. Each record's
function names resolve in its scorer module, its load options are parameters of that loader, and the views agree
with the records."""

from __future__ import annotations

import inspect

import pytest

from lpo.core.errors import InputError
from lpo.curate import scorers
from lpo.curate.options import help_for, model_options
from lpo.curate.scorers import specs


@pytest.mark.parametrize("metric", specs.METRICS)
def test_each_record_names_functions_its_scorer_module_has(metric: str) -> None:
    record = specs.METRIC_RECORDS[metric]
    for role in ("check", "load", "prefetch"):
        function = record.function(role)
        if role == "prefetch" and record.prefetch is None:
            assert function is None
            continue
        assert callable(function), (metric, role)
        parameters = list(inspect.signature(getattr(function, "func", function)).parameters)
        assert parameters[0] == ("metric" if record.by_name else "spec"), (metric, role, parameters)
    loader = inspect.signature(getattr(record.function("load"), "func", record.function("load"))).parameters
    assert set(record.options) <= set(loader), (metric, record.options)  # every option the loader takes
    assert record.default_model in help_for(metric) and help_for(metric).startswith(record.model_help)


def test_the_views_are_the_records() -> None:
    records = specs.REGISTRY
    assert specs.METRICS == tuple(r.name for r in records)
    assert specs.DEFAULT_MODELS == {r.name: r.default_model for r in records}
    assert specs.CURATION_METRICS == ("pickscore", "clip", "vqa", "aesthetic")  # the curation tables' order
    assert specs.DEFAULT_CURATION_METRICS == ("pickscore", "clip", "vqa")
    assert specs.DEFAULT_EVAL_METRICS == ("pickscore", "hpsv2", "hpsv21", "imagereward", "aesthetic")
    assert specs.RECORD_METRICS == ("geneval",) and specs.T2I_METRICS == ("t2i-color", "t2i-shape", "t2i-texture")
    assert specs.PAPER_FILTER_MODELS["vqa"] == "t2v:clip-flant5-xxl"
    group = model_options(specs.METRICS)
    assert [f.flags[0] for f in group.options][:2] == ["--pickscore-model", "--hpsv2-model"]
    assert group.collect({"pickscore_model": "a/b", "clip_model": None}) == {"pickscore": "a/b"}
    assert group.collect({"pickscore_model": None}) is None


def test_load_scorer_refuses_options_the_record_does_not_list() -> None:
    with pytest.raises(InputError, match="unknown clip scorer option"):
        scorers.load_scorer("clip", "ViT-B-32:openai", head_file="x")
