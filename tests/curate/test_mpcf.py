"""MPCF rules: golden ids and reasons, checked against an independent row-by-row implementation."""

from __future__ import annotations

import math
import random

import polars as pl
import pytest

from lpo.core.errors import InputError
from lpo.curate import mpcf

METRICS = ("pickscore", "clip", "vqa", "aesthetic")


def _pairs_and_scores(n_pairs: int = 400, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    rng = random.Random(seed)
    images = [f"img{i}" for i in range(n_pairs // 2)]
    scores = {"image_uid": [], "error": [], **{m: [] for m in METRICS}}
    for uid in images:
        scores["image_uid"].append(uid)
        broken = rng.random() < 0.03
        scores["error"].append("undecodable image" if broken else None)
        for m in METRICS:
            missing = broken or rng.random() < 0.02
            # a coarse grid makes exact-threshold ties (gap == 0, gap == tie threshold) happen
            scores[m].append(None if missing else round(rng.uniform(-1, 1), 2))
    rows = {k: [] for k in ("pair_id", "caption", "image_0_uid", "image_1_uid", "label_0", "label_1", "winner",
                            "is_tie", "num_example_per_prompt", "source")}
    for i in range(n_pairs):
        a, b = rng.sample(images, 2)
        kind = rng.random()
        labels = (0.5, 0.5) if kind < 0.15 else (0.0, 0.0) if kind < 0.2 else (1.0, 0.0) if kind < 0.6 else (0.0, 1.0)
        winner = None if labels[0] == labels[1] else (0 if labels[0] > labels[1] else 1)
        for key, value in (("pair_id", f"p{i}"), ("caption", "c"), ("image_0_uid", a), ("image_1_uid", b),
                           ("label_0", labels[0]), ("label_1", labels[1]), ("winner", winner),
                           ("is_tie", labels == (0.5, 0.5)), ("num_example_per_prompt", 1), ("source", "test")):
            rows[key].append(value)
    pairs = pl.DataFrame(rows, schema_overrides={"winner": pl.Int8})
    return pairs, pl.DataFrame(scores)


def _reference_reason(pair: dict, scores: dict, rule: mpcf.Rule) -> str | None:
    """The rule written out as plain Python, one pair at a time."""
    if pair["winner"] is None and not pair["is_tie"]:
        return "no_label"
    if pair["is_tie"] and not rule.keep_ties:
        return "tie"
    s0, s1 = scores[pair["image_0_uid"]], scores[pair["image_1_uid"]]
    if s0["error"] is not None or s1["error"] is not None:
        return "image_error"
    for m in rule.metrics:
        if s0[m] is None or s1[m] is None:
            return f"missing_{m}"
    for m in rule.metrics:
        if pair["is_tie"]:
            if not abs(s0[m] - s1[m]) < rule.tie_max_gap[m]:
                return f"{m}_gap>={rule.tie_max_gap[m]:g}"
        else:
            gap = s0[m] - s1[m] if pair["winner"] == 0 else s1[m] - s0[m]
            if not gap > rule.min_gap[m]:
                return f"{m}_gap<={rule.min_gap[m]:g}"
    return None


RULES = [
    mpcf.build_rule("all"),
    mpcf.build_rule("all", keep_ties=True),
    mpcf.build_rule("all", metrics=["pickscore", "aesthetic"], min_gap={"aesthetic": 0.1}),
    mpcf.build_rule("lpo-paper"),
    mpcf.build_rule("lpo-paper-strict"),
    mpcf.build_rule("lpo-paper-loose", tie_max_gap={"clip": 0.5}),
    mpcf.build_rule("lpo-paper", keep_ties=False),
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.name}-{'ties' if r.keep_ties else 'noties'}")
def test_reasons_match_row_by_row_reference(rule: mpcf.Rule) -> None:
    pairs, scores = _pairs_and_scores()
    result = mpcf.apply(mpcf.with_gaps(pairs.lazy(), scores.lazy(), rule.metrics), rule).collect()
    by_uid = {row["image_uid"]: row for row in scores.iter_rows(named=True)}
    expected = {p["pair_id"]: _reference_reason(p, by_uid, rule) for p in pairs.iter_rows(named=True)}
    got = dict(zip(result["pair_id"], result["reason"]))
    assert got == expected
    # the data exercises every branch: some pairs kept, and several different reasons
    assert sum(v is None for v in got.values()) > 0
    assert len({v for v in got.values() if v}) >= 4


def test_golden_cases_all_rule() -> None:
    pairs = pl.DataFrame({
        "pair_id": ["keep", "clip_equal", "vqa_worse", "tie", "unlabelled", "flipped_keep"],
        "caption": ["c"] * 6,
        "image_0_uid": ["a", "a", "a", "a", "a", "b"],
        "image_1_uid": ["b", "c", "d", "b", "b", "a"],
        "label_0": [1.0, 1.0, 1.0, 0.5, 0.0, 0.0],
        "label_1": [0.0, 0.0, 0.0, 0.5, 0.0, 1.0],
        "winner": [0, 0, 0, None, None, 1],
        "is_tie": [False, False, False, True, False, False],
        "num_example_per_prompt": [1] * 6,
        "source": ["t"] * 6,
    }, schema_overrides={"winner": pl.Int8})
    scores = pl.DataFrame({
        "image_uid": ["a", "b", "c", "d"],
        "pickscore": [21.0, 20.0, 20.5, 20.0],
        "clip": [0.30, 0.25, 0.30, 0.20],
        "vqa": [0.9, 0.5, 0.1, 0.95],
        "error": [None, None, None, None],
    })
    rule = mpcf.build_rule("all")
    out = mpcf.apply(mpcf.with_gaps(pairs.lazy(), scores.lazy(), rule.metrics), rule).collect()
    reasons = dict(zip(out["pair_id"], out["reason"]))
    assert reasons == {"keep": None, "clip_equal": "clip_gap<=0", "vqa_worse": "vqa_gap<=0", "tie": "tie",
                       "unlabelled": "no_label", "flipped_keep": None}
    gaps = dict(zip(out["pair_id"], out["pickscore_gap"]))
    assert gaps["keep"] == pytest.approx(1.0)
    assert gaps["flipped_keep"] == pytest.approx(1.0)  # winner is image_1 = "a": gap is still winner minus loser
    assert gaps["tie"] == pytest.approx(1.0)  # ties: |image_0 - image_1|
    assert gaps["unlabelled"] is None


def test_paper_rule_thresholds_are_the_reference_strategies() -> None:
    strict, paper, loose = (mpcf.build_rule(n) for n in ("lpo-paper-strict", "lpo-paper", "lpo-paper-loose"))
    assert (strict.min_gap["aesthetic"], paper.min_gap["aesthetic"], loose.min_gap["aesthetic"]) == (0.0, -0.5, -1.0)
    for rule in (strict, paper, loose):
        assert rule.min_gap["clip"] == 0.0 and rule.min_gap["vqa"] == 0.0
        assert rule.tie_max_gap == {"aesthetic": 0.2, "clip": 0.03, "vqa": 0.07}
        assert rule.keep_ties


def test_thresholds_are_strict_inequalities() -> None:
    pairs = pl.DataFrame({
        "pair_id": ["at_min", "above_min", "tie_at_max", "tie_below_max"], "caption": ["c"] * 4,
        "image_0_uid": ["a", "a", "c", "c"], "image_1_uid": ["b", "e", "d", "f"],
        "label_0": [1.0, 1.0, 0.5, 0.5], "label_1": [0.0, 0.0, 0.5, 0.5], "winner": [0, 0, None, None],
        "is_tie": [False, False, True, True], "num_example_per_prompt": [None] * 4, "source": ["t"] * 4,
    }, schema_overrides={"winner": pl.Int8, "num_example_per_prompt": pl.Int64})
    scores = pl.DataFrame({"image_uid": list("abcdef"), "aesthetic": [5.0, 5.5, 5.0, 5.25, 5.25, 5.125],
                           "clip": [0.5, 0.25, 0.25, 0.25, 0.25, 0.25], "vqa": [0.5, 0.25, 0.5, 0.5, 0.25, 0.5],
                           "error": [None] * 6})
    rule = mpcf.build_rule("lpo-paper", tie_max_gap={"aesthetic": 0.25})
    out = mpcf.apply(mpcf.with_gaps(pairs.lazy(), scores.lazy(), rule.metrics), rule).collect()
    reasons = dict(zip(out["pair_id"], out["reason"]))
    assert reasons == {"at_min": "aesthetic_gap<=-0.5", "above_min": None, "tie_at_max": "aesthetic_gap>=0.25",
                       "tie_below_max": None}


def test_agreement_counts_labelled_non_ties() -> None:
    scored = pl.DataFrame({"winner": [0, 1, 1, None, 0], "clip_gap": [0.1, -0.2, 0.3, 0.0, None]},
                          schema_overrides={"winner": pl.Int8})
    result = mpcf.agreement(scored, ("clip",))["clip"]
    assert result["pairs"] == 3 and result["agree"] == 2
    assert math.isclose(result["rate"], 2 / 3)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"name": "strictest"}, "unknown rule 'strictest'"),
        ({"metrics": ["pickscore", "hps"]}, "unknown metric(s) ['hps']"),
        ({"name": "lpo-paper", "metrics": ["pickscore"]}, "rule 'lpo-paper' is defined on"),
        ({"min_gap": {"aesthetic": 1.0}}, "--min-gap names ['aesthetic']"),
        ({"metrics": ["clip", "clip"]}, "lists a metric twice"),
    ],
)
def test_bad_rule_options_are_input_errors(kwargs: dict, needle: str) -> None:
    with pytest.raises(InputError) as err:
        mpcf.build_rule(**kwargs)
    assert needle in str(err.value)

