"""Multi-Preference Consistent Filtering (MPCF): keep a pair only when the metrics agree with its human label.

A rule is a set of metrics with, per metric, a minimum gap for labelled pairs (keep iff winner minus loser is
strictly greater) and a maximum gap for ties (keep iff |image_0 minus image_1| is strictly smaller). Filtering is
one polars expression that names, for every rejected pair, the first test it fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from lpo.core.errors import InputError
from lpo.curate.scorers.specs import CURATION_METRICS, DEFAULT_CURATION_METRICS, PAPER_FILTER_MODELS

# Tie thresholds: clip, vqa and aesthetic are the reference filter's; pickscore's is ours, on PickScore's
# ~100x-cosine scale (0.5 points is well inside the spread between images of one prompt).
TIE_MAX_GAP = {"pickscore": 0.5, "clip": 0.03, "vqa": 0.07, "aesthetic": 0.2}
PAPER_METRICS = ("aesthetic", "clip", "vqa")


@dataclass(frozen=True)
class Rule:
    name: str
    metrics: tuple[str, ...]
    min_gap: dict[str, float] = field(default_factory=dict)
    tie_max_gap: dict[str, float] = field(default_factory=dict)
    keep_ties: bool = False
    # The model each metric is scored with unless the user names another: where a rule's thresholds were set on
    # particular models (the paper's), those; otherwise the registry's defaults.
    models: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        tests = " and ".join(f"{m}_gap > {self.min_gap[m]:g}" for m in self.metrics)
        ties = " and ".join(f"|{m}_gap| < {self.tie_max_gap[m]:g}" for m in self.metrics)
        return f"labelled pairs kept iff {tests}; " + (f"ties kept iff {ties}" if self.keep_ties else "ties rejected")


def _paper(name: str, aesthetic_min: float) -> Rule:
    return Rule(name, PAPER_METRICS, {"aesthetic": aesthetic_min, "clip": 0.0, "vqa": 0.0},
                {m: TIE_MAX_GAP[m] for m in PAPER_METRICS}, keep_ties=True, models=dict(PAPER_FILTER_MODELS))


PRESETS: dict[str, Rule] = {
    "all": Rule("all", DEFAULT_CURATION_METRICS, {m: 0.0 for m in CURATION_METRICS}, dict(TIE_MAX_GAP)),
    "lpo-paper": _paper("lpo-paper", -0.5),  # the reference filter's strategy 2, used for the released models
    "lpo-paper-strict": _paper("lpo-paper-strict", 0.0),  # strategy 1
    "lpo-paper-loose": _paper("lpo-paper-loose", -1.0),  # strategy 3
}


def build_rule(
    name: str = "all",
    metrics: list[str] | tuple[str, ...] | None = None,
    min_gap: dict[str, float] | None = None,
    tie_max_gap: dict[str, float] | None = None,
    keep_ties: bool | None = None,
) -> Rule:
    """A preset rule with the user's overrides; every override is checked against the rule's metrics."""
    if name not in PRESETS:
        raise InputError(f"unknown rule '{name}'; choose one of {list(PRESETS)}.")
    preset = PRESETS[name]
    chosen = tuple(metrics) if metrics else preset.metrics
    unknown = [m for m in chosen if m not in CURATION_METRICS]
    if unknown:
        raise InputError(f"unknown metric(s) {unknown}; choose from {list(CURATION_METRICS)}.")
    if len(set(chosen)) != len(chosen):
        raise InputError(f"--metrics lists a metric twice: {list(chosen)}.")
    if name != "all" and set(chosen) != set(preset.metrics):
        raise InputError(f"rule '{name}' is defined on {list(preset.metrics)}; drop --metrics, or use --rule all "
                         "to choose metrics yourself.")
    for label, given in (("--min-gap", min_gap or {}), ("--tie-max-gap", tie_max_gap or {})):
        stray = [m for m in given if m not in chosen]
        if stray:
            raise InputError(f"{label} names {stray}, which the rule does not use (metrics: {list(chosen)}).")
    return Rule(
        name,
        chosen,
        {m: (min_gap or {}).get(m, preset.min_gap.get(m, 0.0)) for m in chosen},
        {m: (tie_max_gap or {}).get(m, preset.tie_max_gap.get(m, TIE_MAX_GAP[m])) for m in chosen},
        preset.keep_ties if keep_ties is None else keep_ties,
        preset.models,
    )


def with_gaps(pairs: pl.LazyFrame | pl.DataFrame, scores: pl.LazyFrame | pl.DataFrame,
              metrics: tuple[str, ...]) -> pl.LazyFrame:
    """Join each pair with both images' scores and add `<m>_0`, `<m>_1`, `<m>_gap` and `_error_0/1`.

    gap = winner minus loser for labelled pairs; |image_0 minus image_1| for ties; null without a label. An image
    without a row in `scores` gets null scores. Each pair finds its images' rows by a hash join on the uid columns
    alone (the pairs' order restored by their index), and the scores are gathered by row: joining the wide tables
    with the order kept costs about 4x as much (`bench/bench_mpcf.py`).
    """
    pairs = pairs.collect() if isinstance(pairs, pl.LazyFrame) else pairs
    available = set(scores.collect_schema().names())
    scores = scores.lazy().select(["image_uid", "error", *(m for m in metrics if m in available)]).collect()
    ids = scores.lazy().select("image_uid").with_row_index("_row")
    rows = pairs.lazy().select("image_0_uid", "image_1_uid").with_row_index("_pair")
    for k in (0, 1):
        rows = rows.join(ids.rename({"image_uid": f"image_{k}_uid", "_row": f"_row_{k}"}), on=f"image_{k}_uid",
                         how="left")
    rows = rows.sort("_pair").select("_row_0", "_row_1").collect()
    if rows.height != pairs.height:
        raise InputError("the scores table holds some image_uid more than once; rebuild it with `lpo curate score`.")
    columns = []
    for k in (0, 1):
        row = rows[f"_row_{k}"]
        columns += [scores[m].gather(row).alias(f"{m}_{k}") if m in available else
                    pl.lit(None, pl.Float64).alias(f"{m}_{k}") for m in metrics]
        columns.append(scores["error"].gather(row).alias(f"_error_{k}"))
    gaps = []
    for m in metrics:
        a, b = pl.col(f"{m}_0"), pl.col(f"{m}_1")
        gaps.append(
            pl.when(pl.col("is_tie")).then((a - b).abs())
            .when(pl.col("winner") == 0).then(a - b)
            .when(pl.col("winner") == 1).then(b - a)
            .otherwise(None).alias(f"{m}_gap")
        )
    return pairs.lazy().with_columns(columns).with_columns(gaps)


def reason_expr(rule: Rule) -> pl.Expr:
    """Null for a kept pair, else the first failing test, in order: label, tie, image error, missing score,
    then the gap tests in the rule's metric order."""
    no_label = pl.col("winner").is_null() & ~pl.col("is_tie")
    expr = pl.when(no_label).then(pl.lit("no_label"))
    if not rule.keep_ties:
        expr = expr.when(pl.col("is_tie")).then(pl.lit("tie"))
    expr = expr.when(pl.col("_error_0").is_not_null() | pl.col("_error_1").is_not_null()).then(pl.lit("image_error"))
    for m in rule.metrics:
        expr = expr.when(pl.col(f"{m}_0").is_null() | pl.col(f"{m}_1").is_null()).then(pl.lit(f"missing_{m}"))
    for m in rule.metrics:
        gap = pl.col(f"{m}_gap")
        expr = expr.when(~pl.col("is_tie") & ~(gap > rule.min_gap[m])).then(pl.lit(f"{m}_gap<={rule.min_gap[m]:g}"))
        if rule.keep_ties:
            expr = expr.when(pl.col("is_tie") & ~(gap < rule.tie_max_gap[m])).then(
                pl.lit(f"{m}_gap>={rule.tie_max_gap[m]:g}")
            )
    return expr.otherwise(pl.lit(None, pl.String)).alias("reason")


def apply(scored_pairs: pl.LazyFrame, rule: Rule) -> pl.LazyFrame:
    """Add the `reason` column (null = kept)."""
    return scored_pairs.with_columns(reason_expr(rule))


def agreement(scored_pairs: pl.DataFrame, metrics: tuple[str, ...]) -> dict[str, dict[str, float | int]]:
    """Per metric: of the labelled, non-tie pairs with both scores, the share where the metric prefers the winner."""
    out = {}
    for m in metrics:  # counted with expressions: no filtered copy of a million-row table
        have = pl.col("winner").is_not_null() & pl.col(f"{m}_gap").is_not_null()
        agrees = have & (pl.col(f"{m}_gap") > 0)
        n, agree = scored_pairs.select(have.sum().alias("n"), agrees.sum().alias("a")).row(0)
        out[m] = {"pairs": n, "agree": agree, "rate": (agree / n) if n else None}
    return out
