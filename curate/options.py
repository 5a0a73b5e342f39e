"""The scorer registry on the command line: one `--<metric>-model` option per metric, filling a config's `models`
field (metric -> model spec), each help naming the metric's default model."""

from __future__ import annotations

from typing import Any, Optional

from lpo.core.commands import Field, OptionGroup
from lpo.curate.scorers.specs import METRIC_RECORDS


def parameter_name(metric: str) -> str:
    """The parameter name of a metric's model option (`t2i-color` -> `t2i_color_model`)."""
    return f"{metric.replace('-', '_')}_model"


def help_for(metric: str) -> str:
    record = METRIC_RECORDS[metric]
    text = f"{record.model_help} Default: {record.default_model}."
    if record.paper_filter_model not in (None, record.default_model):
        text += f" The lpo-paper filter rules: the paper's {record.paper_filter_model}."
    return text


def model_options(metrics: tuple[str, ...]) -> OptionGroup:
    """`--<metric>-model` for each of `metrics`, collected into the `models` field (None when none is given)."""
    names = {parameter_name(m): m for m in metrics}

    def collect(given: dict[str, Any]) -> dict[str, str] | None:
        return {names[name]: value for name, value in given.items() if value} or None

    options = [Field(parameter_name(m), Optional[str], METRIC_RECORDS[m].flags or (f"--{m}-model",),  # noqa: UP045
                     help_for(m)) for m in metrics]
    return OptionGroup("models", options, collect)
