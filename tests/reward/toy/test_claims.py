"""The demo's claims judged with 95% intervals: the bootstrap against a normal-theory interval, each verdict (yes, no,
not shown) on hand-made evidence, and the units each claim resamples (pairs, or captions for the generators)."""

from __future__ import annotations

import numpy as np
import pytest

from lpo.reward.toy.claims import bootstrap_interval, claims, mean_interval, per_caption, verdict

LEVELS = ["1", "251", "501", "751", "951"]


def test_the_bootstrap_interval_of_a_mean_matches_normal_theory() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(0.3, 2.0, size=3000)
    low, high = mean_interval(values)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert low == pytest.approx(values.mean() - half, abs=0.15 * half)
    assert high == pytest.approx(values.mean() + half, abs=0.15 * half)
    assert mean_interval(values) == (low, high)  # its own seed: the same evidence, the same interval
    # a statistic of several arrays resampled together: the same units drawn for both
    a, b = rng.normal(size=500), rng.normal(size=500)
    joint = bootstrap_interval(500, lambda d: a[d].mean(1) - b[d].mean(1))
    assert joint == pytest.approx(mean_interval(a - b), abs=1e-12)


@pytest.mark.parametrize(("interval", "margin", "expected"), [
    ((0.01, 0.2), 0.0, "yes"), ((-0.2, -0.01), 0.0, "no"), ((-0.01, 0.2), 0.0, "not shown"),
    ((0.0, 0.2), 0.0, "not shown"), ((0.03, 0.2), 0.05, "not shown"), ((0.06, 0.2), 0.05, "yes"),
])
def test_verdicts(interval, margin, expected) -> None:
    assert verdict(interval, margin) == expected


def _evidence(rng: np.random.Generator, guided_oracle_shift: float, lpo_shift: float, levels=LEVELS) -> dict:
    """Hand-made evidence: 2000 curated pairs (the kept half about 95% right, the rest 45%); 400 held-out pairs, the
    MPCF LRM right on about 85% at the least noisy level, the raw one on 70%, the fresh one on the same pairs as MPCF
    but one; the timestep-blind control exactly as accurate (no gain); 18 captions per generator."""
    agree = np.r_[rng.random(1000) < 0.95, rng.random(1000) < 0.45].astype(float)
    kept = np.r_[np.ones(1000, bool), np.zeros(1000, bool)]
    mpcf = {level: (rng.random(400) < 0.85 - 0.05 * i).astype(float) for i, level in enumerate(levels)}
    fresh = {level: values.copy() for level, values in mpcf.items()}
    fresh[levels[0]][np.flatnonzero(mpcf[levels[0]])[0]] = 0.0  # one pair apart: +0.25 points, within noise
    lrm = {"lrm-mpcf": mpcf, "lrm-raw": {level: (rng.random(400) < 0.7).astype(float) for level in levels},
           "lrm-mpcf-fresh": fresh, "blind": {level: values.copy() for level, values in mpcf.items()}}
    base = rng.uniform(0.5, 0.8, size=18)
    reward = rng.normal(9.5, 0.3, 18)
    generators = {"base": {"oracle": base, "lrm_reward": reward},
                  "lpo": {"oracle": base + lpo_shift + rng.normal(0, 0.01, 18), "lrm_reward": reward + 0.4},
                  "guided": {"oracle": base + guided_oracle_shift + rng.normal(0, 0.01, 18),
                             "lrm_reward": reward + 0.9 + rng.normal(0, 0.05, 18)}}
    return {"curate": {"agree": agree, "kept": kept, "kept_share": 0.4}, "lrm": lrm, "generators": generators}


def test_each_claim_gets_its_verdict_from_its_interval() -> None:
    evidence = _evidence(np.random.default_rng(0), guided_oracle_shift=-0.08, lpo_shift=0.09)
    result = claims(evidence, "sd15")
    by_start = {c["claim"].split(":")[0].split(" (")[0]: c for c in result}
    assert [c["verdict"] for c in result] == ["yes", "yes", "not shown", "not shown", "yes", "yes", "no"]
    agree, kept = evidence["curate"]["agree"], evidence["curate"]["kept"]
    mpcf = by_start["MPCF raises the labels' agreement with the oracle"]
    assert mpcf["effect"] == pytest.approx(agree[kept].mean() - agree.mean())
    assert "kept (40% of pairs kept)" in mpcf["measured"] and "points [" in mpcf["measured"]
    fresh = by_start["a diffusion-initialised backbone beats a fresh one at the same budget"]
    assert fresh["effect"] == pytest.approx(1 / 400) and fresh["interval"][0] <= 0 < fresh["interval"][1]
    noise = by_start["the LRM is noise-aware"]
    assert noise["effect"] == 0 and noise["interval"] == [0.0, 0.0] and noise["verdict"] == "not shown"
    assert "told t=1" in noise["claim"] and "t=251..t=951" in noise["claim"]
    guided = by_start["LRM-guided sampling raises the oracle alignment over plain sampling"]
    assert guided["interval"][1] < 0 and guided["verdict"] == "no"
    for claim in result:
        low, high = claim["interval"]
        assert low <= claim["effect"] <= high and claim["holds"] == (claim["verdict"] == "yes")


def test_the_noise_aware_claim_compares_the_lrm_with_its_blind_control_above_the_least_noisy_level() -> None:
    evidence = _evidence(np.random.default_rng(4), 0.0, 0.0)
    blind = evidence["lrm"]["blind"]
    for level in LEVELS[1:]:
        blind[level] = np.zeros(400)  # told t=1 at every noisier level, the LRM is always wrong
    blind["1"] = np.zeros(400)  # the least noisy level is not part of the comparison (there the control is the LRM)
    noise = next(c for c in claims(evidence) if c["claim"].startswith("the LRM is noise-aware"))
    expected = np.mean([evidence["lrm"]["lrm-mpcf"][level].mean() for level in LEVELS[1:]])
    assert noise["effect"] == pytest.approx(expected) and noise["verdict"] == "yes"


def test_the_generator_claims_resample_captions_not_images() -> None:
    """Eight images of a caption count as one unit: the interval is that of the 18 caption means, wider than the
    one the 144 images would give if counted as independent."""
    rng = np.random.default_rng(2)
    caption_effect = rng.normal(0.05, 0.1, size=18)
    images = np.repeat(caption_effect, 8) + rng.normal(0, 0.001, size=144)
    means = per_caption(list(images), 8)
    np.testing.assert_allclose(means, caption_effect, atol=0.002)
    by_caption = mean_interval(means)
    by_image = mean_interval(images)
    assert by_caption[1] - by_caption[0] > 2 * (by_image[1] - by_image[0])
    evidence = _evidence(rng, guided_oracle_shift=0.0, lpo_shift=0.0)
    evidence["generators"]["lpo"]["oracle"] = evidence["generators"]["base"]["oracle"] + means
    lpo = next(c for c in claims(evidence) if c["claim"].startswith("LPO raises"))
    assert lpo["interval"] == pytest.approx(list(by_caption))


def test_flow_families_name_noise_levels_as_sigma() -> None:
    evidence = _evidence(np.random.default_rng(3), 0.05, 0.05, levels=["1.0", "264.0", "474.0", "737.0", "1000.0"])
    text = " ".join(c["claim"] for c in claims(evidence, "sd3"))
    assert "sigma=0.001" in text and "sigma=0.264..sigma=1.000" in text and "t=" not in text.replace("sigma=", "")


def test_the_curated_pairs_come_in_one_order_whatever_the_join_gives() -> None:
    """The MPCF claim's bootstrap resamples pairs by position: the same pairs in another row order (a join's order is
    not fixed) must give the same per-pair lists, so the same interval."""
    import polars as pl

    from lpo.reward.toy.demo import agreement_per_pair

    pairs = pl.DataFrame({"pair_id": ["p3", "p1", "p2", "p4"], "image_0_uid": ["a", "b", "c", "d"],
                          "image_1_uid": ["e", "f", "g", "h"], "winner": [0, 1, 0, None]})
    oracle = pl.DataFrame({"image_0_uid": ["a", "b", "c", "d"], "image_1_uid": ["e", "f", "g", "h"],
                           "oracle_0": [1.0, 1.0, 0.0, 1.0], "oracle_1": [0.0, 0.0, 1.0, 0.0]})
    kept = pl.DataFrame({"pair_id": ["p1"]})
    first = agreement_per_pair(pairs, oracle, kept)
    assert first == {"per_pair_agree": [1, 0, 0], "per_pair_kept": [False, True, False]}  # by images: p3, p1, p2
    assert agreement_per_pair(pairs.reverse(), oracle.reverse(), kept) == first
