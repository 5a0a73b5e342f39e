"""The held-out monitor of `lpo optimize`: is the model getting better, or only the reward it is trained on?

Reward hacking looks the same from inside a run (the LRM's reward rises) whether the images improve or not, so the
monitor asks metrics the run does not train on. At the start and every `--monitor-every` rounds it samples a fixed
set of held-out prompts with fixed seeds and the deterministic sampler (eta 0), scores the images with independent
metrics from the metric registry (default PickScore and HPSv2.1, where their weights are available) and the latents
with the LRM's own reward, and appends one row per check to `OUT/monitor.jsonl` (plot: `OUT/monitor.png`).

The held-out score of a check is the mean over the metrics of (metric - first check's) / (first check's per-image
std): each metric in units of its own spread, so metrics of different scales count alike. Every check draws the
same prompts with the same seeds, so two checks are compared image by image: each row keeps its per-image scores,
and a fall counts only where it exceeds `--stop-noise` standard errors of the paired per-image differences (a
check's images are few, and without this the rule fired on their noise). The stop rule (`judge`): a check is bad
when the held-out score fell since the previous check while the LRM reward rose, or when it is more than
`--stop-margin` below the best so far, each beyond the noise; `--stop-patience` bad checks in a row stop the run.
The check with the best held-out score is kept in `OUT/best/` (the trainer saves it when the check is made), and
the check at which the rule fired says so (`stopped` in its row), so a run continued past the stop still shows it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list

from lpo.core import config as cfg
from lpo.core.errors import InputError
from lpo.core.parts import RecordLog
from lpo.core.plots import pyplot, save_figure
from lpo.curate.prompts import read_prompts
from lpo.curate.scorers import load_scorer
from lpo.reward.eval.score import resolve_metric_specs
from lpo.reward.lpo.config import LPOConfig
from lpo.reward.lpo.sample import image_seed
from lpo.reward.lpo.sampler import sample

logger = logging.getLogger(__name__)

MONITOR_FILE = "monitor.jsonl"
MONITOR_PLOT = "monitor.png"
BEST_DIR = "best"
HELD_OUT_SHARE = 10  # without --monitor-prompts, at most one training prompt in this many is held out
DEFAULT_METRICS = ("pickscore", "hpsv21")
PER_IMAGE = "_per_image"  # a row's per-image scores of a metric: f"{metric}{PER_IMAGE}"


@dataclass(frozen=True)
class Verdict:
    """What the checks so far say: the best check, the current run of bad checks, and whether to stop (and why)."""

    best_round: int | None
    best_score: float | None
    scores: dict[int, float]  # round -> held-out score
    streak: int
    stop: bool
    reason: str | None


def held_out_score(row: dict[str, Any], first: dict[str, Any], metrics: Sequence[str]) -> float:
    """The mean over `metrics` of (row's mean - first's mean) / first's per-image std."""
    return float(np.mean([(row[m] - first[m]) / max(first[f"{m}_std"], 1e-12) for m in metrics]))


def per_image_scores(row: dict[str, Any], first: dict[str, Any], metrics: Sequence[str]) -> np.ndarray | None:
    """Each image's held-out score (the mean over `metrics` of (its score - first's mean) / first's std), whose mean
    is `held_out_score`; None for a row without per-image scores (a check made before they were kept)."""
    if not all(f"{m}{PER_IMAGE}" in row for m in metrics):
        return None
    return np.mean([(np.asarray(row[f"{m}{PER_IMAGE}"], dtype=np.float64) - first[m]) / max(first[f"{m}_std"], 1e-12)
                    for m in metrics], axis=0)


def change_noise(after: np.ndarray | None, before: np.ndarray | None) -> float:
    """The standard error of the mean of the paired per-image differences `after - before` (the same prompts and
    seeds at both checks); 0 where either check lacks per-image scores or they do not pair."""
    if after is None or before is None or after.shape != before.shape or after.size < 2:
        return 0.0
    return float(np.std(after - before, ddof=1) / np.sqrt(after.size))


def judge(rows: Sequence[dict[str, Any]], metrics: Sequence[str], patience: int, margin: float,
          noise: float = 0.0) -> Verdict:
    """The stop rule over the checks `rows` (one per round, in round order). A check after the first is bad when its
    held-out score is below the previous check's by more than `noise` standard errors of their paired per-image
    difference while the LRM reward is above it, or when the score is more than `margin` below the best before it and
    that fall too is more than `noise` standard errors (paired with the best check); `patience` bad checks in a row
    stop the run (0: never). Rows without per-image scores count every fall (no noise). Without a held-out metric there
    is no best check and no stop."""
    if not rows or not metrics:
        return Verdict(None, None, {}, 0, False, None)
    first = rows[0]
    scores = {row["round"]: held_out_score(row, first, metrics) for row in rows}
    images = {row["round"]: per_image_scores(row, first, metrics) for row in rows}
    best_round, best = rows[0]["round"], scores[rows[0]["round"]]
    streak, reasons = 0, []
    for previous, row in zip(rows, rows[1:]):
        score, before = scores[row["round"]], scores[previous["round"]]
        fell = before - score > noise * change_noise(images[row["round"]], images[previous["round"]])
        hacked = fell and row["lrm_reward"] > previous["lrm_reward"]
        sunk = best - score > max(margin, noise * change_noise(images[row["round"]], images[best_round]))
        streak = streak + 1 if hacked or sunk else 0
        reasons = reasons + [(row["round"], hacked, sunk)] if streak else []
        if score > best:
            best_round, best = row["round"], score
        if patience and streak >= patience:
            rounds = f"rounds {reasons[-patience][0]}-{row['round']}"
            if all(h for _, h, _ in reasons[-patience:]):
                why = (f"the held-out {', '.join(metrics)} fell at {patience} checks in a row ({rounds}) while the "
                       "LRM reward rose")
            else:
                why = (f"the held-out {', '.join(metrics)} fell or stayed more than {margin} (per-image std) "
                       f"below their best at {patience} checks in a row ({rounds})")
            return Verdict(best_round, best, scores, streak, True, f"{why}; the best check is round {best_round}")
    return Verdict(best_round, best, scores, streak, False, None)


def split_prompts(config: LPOConfig, prompts: list[str]) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts). `--monitor-prompts` gives the held-out set; else up to
    `--monitor-held-out` prompts (never more than one in HELD_OUT_SHARE) are drawn out of the training prompts,
    seeded, and not trained on. No monitor, or too few prompts to spare one: no held-out prompts."""
    if not config.monitor:
        return prompts, []
    if config.monitor_prompts is not None:
        return prompts, read_prompts(config.monitor_prompts)
    count = min(config.monitor_held_out, len(prompts) // HELD_OUT_SHARE)
    if count == 0:
        logger.warning("monitor: %d training prompts leave none to hold out (it takes %d for one); pass "
                       "--monitor-prompts FILE to monitor this run", len(prompts), HELD_OUT_SHARE)
        return prompts, []
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(config.seed + 104_729)).tolist()
    held = set(order[:count])
    return [p for i, p in enumerate(prompts) if i not in held], [prompts[i] for i in sorted(held)]


def check_monitor(config: LPOConfig, prompts: list[str]) -> tuple[list[str], list[str], dict[str, str], bool]:
    """Validate the monitor's options before any model loads: (training prompts, held-out prompts, the model spec
    of each metric the monitor will ask, whether each must load). Metrics named with --monitor-metrics (or given
    models) must load; the defaults are asked where their weights can be had; without held-out prompts none is."""
    if not config.monitor:
        return prompts, [], {}, False
    cfg.check_rules([(name, getattr(config, name), holds, rule) for name, holds, rule in (
        ("monitor_every", config.monitor_every >= 0, ">= 0 (0: each epoch)"),
        ("monitor_held_out", config.monitor_held_out >= 1, ">= 1"),
        ("monitor_images", config.monitor_images >= 1, ">= 1"),
        ("stop_patience", config.stop_patience >= 0, ">= 0 (0: never stop)"),
        ("stop_margin", config.stop_margin >= 0, ">= 0"),
        ("stop_noise", config.stop_noise >= 0, ">= 0 (0: every fall counts)"))])
    if config.monitor_prompts is not None and not Path(config.monitor_prompts).exists():
        raise InputError(f"--monitor-prompts {config.monitor_prompts} does not exist; pass a prompt file (.txt, "
                         ".json or a manifest with `caption`).")
    train, held = split_prompts(config, prompts)
    required = config.monitor_metrics is not None or bool(config.monitor_models) or bool(config.monitor_models_dir)
    metrics = list(config.monitor_metrics if config.monitor_metrics is not None else DEFAULT_METRICS)
    if not held or not metrics:
        return train, held, {}, required
    if required:
        return train, held, resolve_metric_specs(metrics, config.monitor_models, config.monitor_models_dir), True
    specs = {}
    for metric in metrics:
        try:
            specs |= resolve_metric_specs([metric], {}, None)
        except InputError as err:
            logger.warning("monitor: %s is not available (%s); the monitor goes on without it", metric, err)
    return train, held, specs, False


class Monitor:
    """The checks of one run, made on the main process; the rows so far are read back from `OUT/monitor.jsonl`, so
    a resumed run continues the history and never repeats a check."""

    def __init__(self, config: LPOConfig, out: Path, prompts: list[str], specs: dict[str, str], required: bool,
                 device: Any, dtype: torch.dtype, rounds_per_epoch: int):
        self.config = config
        self.out = out
        self.prompts = prompts
        self.every = config.monitor_every or rounds_per_epoch
        self.log = RecordLog(out / MONITOR_FILE, key="round")
        self.scorers = {}
        for metric, spec in specs.items():
            try:
                self.scorers[metric] = load_scorer(metric, spec, device=str(device), dtype=dtype)
            except (InputError, OSError) as err:
                if required:
                    raise
                logger.warning("monitor: could not load %s (%s); the monitor goes on without it", metric, err)
        self.metrics = list(self.scorers)
        logger.info("monitor: %d held-out prompts x %d images every %d rounds, scored by %s and the LRM reward",
                    len(prompts), config.monitor_images, self.every, ", ".join(self.metrics) or "no metric")

    @property
    def active(self) -> bool:
        return bool(self.prompts)

    def rows(self) -> list[dict[str, Any]]:
        return sorted(self.log.records().values(), key=lambda row: row["round"])

    def due(self, round_index: int, last: bool = False) -> bool:
        """A check at the start, every `every` rounds and after the last round, unless one was made there."""
        return self.active and (round_index % self.every == 0 or last) and round_index not in self.log.done()

    def common(self, rows: list[dict[str, Any]]) -> list[str]:
        """The metrics every check has (a resumed run whose metric became unavailable judges on the others)."""
        return [m for m in self.metrics if all(m in row for row in rows)]

    def verdict(self, rows: list[dict[str, Any]] | None = None) -> Verdict:
        """The stop rule over `rows` (default: the checks made so far) with the run's settings."""
        rows = self.rows() if rows is None else rows
        return judge(rows, self.common(rows), self.config.stop_patience, self.config.stop_margin,
                     self.config.stop_noise)

    @torch.no_grad()
    def check(self, model: Any, policy: Any, lrm: Any, round_index: int, updates: int) -> dict[str, Any]:
        """Sample the held-out prompts with the current policy, score them, append the row, redraw the plot."""
        config, started = self.config, time.perf_counter()
        policy.eval()
        prompts = [p for p in self.prompts for _ in range(config.monitor_images)]
        seeds = [image_seed(config.seed, p, i) for p in range(len(self.prompts)) for i in range(config.monitor_images)]
        rewards, images = [], []
        for start in range(0, len(prompts), config.sample_batch_size):
            chunk = prompts[start:start + config.sample_batch_size]
            generators = [torch.Generator().manual_seed(s) for s in seeds[start:start + len(chunk)]]
            latents = sample(model, model.encode_prompts(chunk), generators, config.steps, config.guidance, eta=0.0,
                             denoiser=policy)["latents"]
            rewards += lrm.score(latents.to(lrm.device, lrm.dtype),
                                 torch.full((len(chunk),), model.clean_timestep(), device=lrm.device),
                                 chunk).float().cpu().tolist()
            images += model.decode(latents)
        row: dict[str, Any] = {"round": round_index, "updates": updates, "lrm_reward": float(np.mean(rewards)),
                               "lrm_reward_std": float(np.std(rewards, ddof=1)) if len(rewards) > 1 else 0.0}
        for metric, scorer in self.scorers.items():
            scores = np.asarray(scorer.score(images, prompts), dtype=np.float64)
            row[metric] = float(scores.mean())
            row[f"{metric}_std"] = float(scores.std(ddof=1)) if len(scores) > 1 else 0.0
            row[f"{metric}{PER_IMAGE}"] = [round(float(v), 6) for v in scores]
        row["seconds"] = round(time.perf_counter() - started, 2)
        rows = self.rows() + [row]  # the checks once this one is appended
        verdict = self.verdict(rows)
        row["stopped"] = verdict.stop  # kept in the row: a run continued past the stop still shows it
        with self.log.appending() as append:
            append([row])
        plot(rows, self.common(rows), verdict, self.out / MONITOR_PLOT)
        return row


class Watch:
    """The monitor as the trainer's loop sees it: `check()` makes the check due at the current round (on the main
    process), keeps the best check's policy (`save_best(row)`), and returns whether the stop rule fired, the same
    answer on every process."""

    def __init__(self, accelerator: Any, monitor: Monitor | None, enabled: bool, total_rounds: int,
                 save_best: Callable[[dict[str, Any]], Any], check: Callable[[], tuple]):
        self.accelerator = accelerator
        self.monitor = monitor
        self.enabled = enabled  # every process knows whether the main one monitors
        self.total_rounds = total_rounds
        self.save_best = save_best
        self.arguments = check  # (model, policy, lrm, round, updates) now

    def check(self) -> bool:
        stop = False
        if self.monitor is not None:
            model, policy, lrm, round_index, updates = self.arguments()
            row = None
            if self.monitor.due(round_index, last=round_index >= self.total_rounds):
                row = self.monitor.check(model, policy, lrm, round_index, updates)
            verdict = self.monitor.verdict()
            if row is not None:
                self.accelerator.log({f"monitor/{key}": value for key, value in row.items()
                                      if key != "round" and isinstance(value, int | float)}
                                     | ({"monitor/held_out_score": verdict.scores[round_index]}
                                        if verdict.scores else {}), step=round_index)
                if verdict.best_round == round_index:
                    self.save_best(row | {"held_out_score": verdict.best_score})
                    logger.info("monitor: round %d is the best check so far (held-out score %.3f): saved to %s/",
                                round_index, verdict.best_score, BEST_DIR)
            stop = verdict.stop
            if stop:
                logger.warning("monitor: stopping: %s", verdict.reason)
        if self.enabled and self.accelerator.num_processes > 1:
            flag = [stop]
            broadcast_object_list(flag, from_process=0)
            stop = flag[0]
        return stop

    def summary(self) -> dict[str, Any]:
        """What the run's summary says of the monitor (the main process's view; {} elsewhere or when off)."""
        if self.monitor is None:
            return {}
        verdict, rows = self.monitor.verdict(), self.monitor.rows()
        return {"checks": len(rows), "metrics": self.monitor.metrics, "held_out_prompts": len(self.monitor.prompts),
                "best_round": verdict.best_round, "best_score": verdict.best_score,
                "best": str(self.monitor.out / BEST_DIR) if verdict.best_round is not None else None,
                "stopped": verdict.stop, "reason": verdict.reason, "log": str(self.monitor.out / MONITOR_FILE),
                "plot": str(self.monitor.out / MONITOR_PLOT)}


def plot(rows: Sequence[dict[str, Any]], metrics: Sequence[str], verdict: Verdict, path: Path) -> Path:
    """One panel per series over the rounds (the LRM reward, then each held-out metric, and the held-out score);
    the best check marked, and the stop where the rule fired (also when the run was continued past it)."""
    plt = pyplot()
    series = [("lrm_reward", "LRM reward (trained on)")] + [(m, f"held-out {m}") for m in metrics]
    if verdict.scores:
        series.append(("held_out_score", "held-out score (per-image std from the start)"))
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3), squeeze=False)
    rounds = [row["round"] for row in rows]
    for ax, (key, title) in zip(axes[0], series):
        values = [verdict.scores[r] for r in rounds] if key == "held_out_score" else [row[key] for row in rows]
        ax.plot(rounds, values, marker="o", color="tab:red" if key == "lrm_reward" else "tab:blue")
        if verdict.best_round is not None:
            ax.axvline(verdict.best_round, color="tab:green", linestyle="--",
                       label=f"best (round {verdict.best_round})")
        for stop in [row["round"] for row in rows if row.get("stopped")] or ([rounds[-1]] if verdict.stop else []):
            ax.axvline(stop, color="black", linestyle=":", label=f"stopped (round {stop})")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        if not math.isnan(values[0]) and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return save_figure(fig, path)
