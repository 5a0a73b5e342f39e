"""The paper's claims in miniature, each judged with a 95% interval rather than a bare comparison.

Every claim is an effect (a difference in labels' agreement, in pairwise accuracy or in a generator's scores) with a
percentile bootstrap interval over its independent units: the curated pairs, the held-out pairs (each LRM scores the
same pairs with the same noise, so the difference is paired), or the held-out captions (every generator draws the
same seeds for a caption, so the difference is paired per caption and the images of one caption are not counted as
independent). A claim's verdict is "yes" when the whole interval lies above its margin, "no" when it lies below, and
"not shown" when it straddles it: a run that cannot tell the effect from noise says so.

`evidence(results)` gathers the per-unit numbers from the demo's stages; `claims(evidence, family)` judges them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

VERDICT_RULE = ("a claim holds (yes) when its whole 95% interval is above zero, fails (no) when it is below, and is "
                "not shown when the interval includes zero (bootstrap over pairs, or over captions for the "
                "generators)")
RESAMPLES = 2000
LEVEL = 0.95
SEED = 0  # the bootstrap's own seed: the same evidence always gives the same interval


def bootstrap_interval(units: int, statistic: Callable[[np.ndarray], np.ndarray], resamples: int = RESAMPLES,
                       level: float = LEVEL, seed: int = SEED) -> tuple[float, float]:
    """The percentile interval of `statistic` over `resamples` draws of `units` indices with replacement;
    `statistic` maps a [resamples, units] index array to one value per draw."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, units, size=(resamples, units), dtype=np.int32)
    values = statistic(draws)
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


def mean_interval(differences: np.ndarray, **kwargs: Any) -> tuple[float, float]:
    """The interval of the mean of per-unit differences."""
    differences = np.asarray(differences, dtype=np.float64)
    return bootstrap_interval(len(differences), lambda draws: differences[draws].mean(axis=1), **kwargs)


def verdict(interval: tuple[float, float], margin: float = 0.0) -> str:
    """"yes" when the interval lies above the margin, "no" when below it, "not shown" when it straddles it."""
    low, high = interval
    return "yes" if low > margin else "no" if high < margin else "not shown"


def _claim(text: str, measured: str, effect: float, interval: tuple[float, float], unit: str, scale: float,
           margin: float = 0.0) -> dict[str, Any]:
    shown = f"{effect * scale:+.{1 if scale == 100 else 2}f}"
    bounds = ", ".join(f"{v * scale:+.{1 if scale == 100 else 2}f}" for v in interval)
    result = verdict(interval, margin)
    return {"claim": text, "measured": f"{measured}; {shown} {unit} [{bounds}]", "effect": effect,
            "interval": list(interval), "margin": margin, "verdict": result, "holds": result == "yes"}


def per_caption(values: list[float], images_per_prompt: int) -> np.ndarray:
    """The mean of each caption's images (images are stored caption by caption)."""
    return np.asarray(values, dtype=np.float64).reshape(-1, images_per_prompt).mean(axis=1)


def noise_label(timestep: str, family: str) -> str:
    """A noise level as the family's sampler names it: t = 1 for DDPM timesteps, sigma = 0.001 for flow matching."""
    return f"t={timestep}" if family == "sd15" else f"sigma={float(timestep) / 1000:.3f}"


def read_per_pair(path: str | Path) -> pl.DataFrame:
    """`lpo reward eval`'s per-pair correctness, one row per pair, level and control, in a stable pair order."""
    return pl.read_parquet(path).sort("blind", "timestep", "pair_id")


def evidence(results: dict[str, Any]) -> dict[str, Any]:
    """The per-unit numbers the claims are judged on, from the demo's stage results."""
    lrm = {}
    for name in ("lrm-raw", "lrm-mpcf", "lrm-mpcf-fresh"):
        table = read_per_pair(results[name]["per_pair"])
        for key, blind in ((name, False), ("blind", True)):
            rows = table.filter(pl.col("blind") == blind)
            if rows.height:
                lrm[key] = {level: rows.filter(pl.col("timestep") == float(level))["correct"].to_numpy()
                            for level in results[name]["accuracy"]}
    samples = results["samples"]
    n = samples["images_per_prompt"]
    generators = {variant: {key: per_caption(samples[variant][f"{key}_per_image"], n)
                            for key in ("oracle", "lrm_reward")}
                  for variant in ("base", "guided", "lpo", "grpo") if variant in samples}
    curate = results["curate"]
    hacking = results.get("hacking")
    if hacking is not None:  # the same captions and seeds as the samples stage
        hacking = hacking_evidence(hacking, n)
    return {"hacking": hacking, "curate": {"agree": np.asarray(curate["raw"]["per_pair_agree"], dtype=np.float64),
                       "kept": np.asarray(curate["raw"]["per_pair_kept"], dtype=bool),
                       "kept_share": curate["kept_share"]},
            "lrm": lrm, "generators": generators}


def hacking_evidence(hacking: dict[str, Any], images_per_prompt: int) -> dict[str, Any]:
    """The hacking stage's result with each generator's oracle alignment per caption (`base`, `kept`, `last`)."""
    return hacking | {name: per_caption(values, images_per_prompt)
                      for name, values in hacking["oracle_per_image"].items()}


def claims(evidence: dict[str, Any], family: str = "sd15") -> list[dict[str, Any]]:
    """Each claim with its measured numbers, effect, 95% interval and verdict (see the module docstring)."""
    out = []
    agree, kept = evidence["curate"]["agree"], evidence["curate"]["kept"]
    raw_rate, kept_rate = agree.mean(), agree[kept].mean()
    interval = bootstrap_interval(len(agree), lambda d: (agree[d] * kept[d]).sum(1) / np.maximum(kept[d].sum(1), 1)
                                  - agree[d].mean(1))
    out.append(_claim("MPCF raises the labels' agreement with the oracle",
                      f"{raw_rate:.1%} raw -> {kept_rate:.1%} kept ({evidence['curate']['kept_share']:.0%} of pairs "
                      "kept)",
                      kept_rate - raw_rate, interval, "points", 100))
    lrm = evidence["lrm"]
    levels = list(lrm["lrm-mpcf"])
    low, label = levels[0], noise_label(levels[0], family)
    mpcf = lrm["lrm-mpcf"][low]
    for other, text in (("lrm-raw", f"an LRM trained on MPCF-kept pairs beats one trained on the raw pairs ({label})"),
                        ("lrm-mpcf-fresh", "a diffusion-initialised backbone beats a fresh one at the same budget "
                                           f"({label})")):
        diff = mpcf - lrm[other][low]
        out.append(_claim(text, f"{mpcf.mean():.1%} vs {lrm[other][low].mean():.1%}", diff.mean(),
                          mean_interval(diff), "points", 100))
    noisier = levels[1:]  # the control is told the least noisy level: at that level it is the LRM itself
    gain = np.mean([lrm["lrm-mpcf"][level] - lrm["blind"][level] for level in noisier], axis=0)
    told = np.mean([lrm["lrm-mpcf"][level].mean() for level in noisier])
    blind = np.mean([lrm["blind"][level].mean() for level in noisier])
    out.append(_claim(f"the LRM is noise-aware: told the true noise level it is more accurate than told {label} "
                      f"(mean over {noise_label(noisier[0], family)}..{noise_label(noisier[-1], family)})",
                      f"{told:.1%} told the level vs {blind:.1%} told {label}", gain.mean(), mean_interval(gain),
                      "points", 100))
    generators = evidence["generators"]
    base = generators["base"]
    for variant, key, text, names in (
            ("lpo", "oracle", "LPO raises the oracle alignment of generated images on held-out captions",
             ("base", "LPO")),
            ("guided", "lrm_reward", "LRM-guided sampling raises the LRM reward over plain sampling",
             ("plain", "guided")),
            ("guided", "oracle", "LRM-guided sampling raises the oracle alignment over plain sampling",
             ("plain", "guided"))):
        diff = generators[variant][key] - base[key]
        scale, unit, digits = (100, "points", 3) if key == "oracle" else (1, "reward", 2)
        before, after = base[key].mean(), generators[variant][key].mean()
        measured = f"{before:.{digits}f} {names[0]} -> {after:.{digits}f} {names[1]}"
        out.append(_claim(text, measured, diff.mean(), mean_interval(diff), unit, scale))
    if evidence.get("hacking") is not None:
        out.append(hacking_claim(evidence["hacking"]))
    return out


def hacking_claim(hacking: dict[str, Any]) -> dict[str, Any]:
    """The monitor's claim on the hacking stage's evidence (its result with per-caption `base`, `kept`, `last`): the
    rule stopped the run, and the kept checkpoint's oracle alignment is above the unmonitored run's last one."""
    diff = hacking["kept"] - hacking["last"]
    stop = f"stopped at round {hacking['stopped_round']}" if hacking["stopped_round"] is not None else "not stopped"
    claim = _claim("the held-out monitor stops a reward-hacking run (an LRM with a planted bias) and keeps a "
                   "checkpoint with higher oracle alignment than the unmonitored run's last",
                   f"{stop} of {hacking['rounds']} (best check round {hacking['best_round']}); base "
                   f"{hacking['base'].mean():.3f}, kept {hacking['kept'].mean():.3f}, unmonitored last "
                   f"{hacking['last'].mean():.3f}", diff.mean(), mean_interval(diff), "points", 100)
    if hacking["stopped_round"] is None:  # a run the rule did not stop does not show the claim, whatever it kept
        claim |= {"verdict": "no", "holds": False}
    return claim
