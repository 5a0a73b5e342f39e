"""Statistics and reports of evaluation runs: per-metric means with prompt-clustered intervals, the per-image table
and summary of a run, and the paired comparison of two runs.

Statistics: mean over images; std per image (ddof 1); 95% confidence interval = mean +- 1.96 standard errors,
the standard error clustered by prompt (CR1: the images of one prompt are not independent draws). With equal
images per prompt this equals the standard deviation of the per-prompt means over sqrt(prompts).
`compare` pairs images by (prompt, image index), reports the mean paired difference with the same clustered
normal interval, and the share of prompts whose mean score went up (ties count half).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
from PIL import Image

from lpo.core.errors import InputError
from lpo.core.files import write_text_atomic
from lpo.curate.manifest import check_schema, write_atomic
from lpo.curate.scorers.specs import RECORD_METRICS
from lpo.reward.eval.config import EvalCompareConfig
from lpo.reward.eval.items import GRID_FILE, SUMMARY_FILE, SUMMARY_MD, TABLE_FILE, EvalItem, table_schema
from lpo.reward.images import save_image_grid

Z_95 = NormalDist().inv_cdf(0.975)
STATISTICS = ("mean over images; std per image (ddof 1); ci95: normal interval, mean +- 1.96 standard errors "
              "clustered by prompt (CR1)")


COMPARE_STATISTICS = ("delta = mean over paired images of (B - A), paired by (prompt, image index); ci95: normal "
                      "interval, standard error clustered by prompt (CR1); win rate: share of prompts whose mean "
                      "score is higher in B (ties count half)")


def clustered_mean_ci(values: np.ndarray, clusters: np.ndarray) -> dict[str, Any]:
    """Mean, per-value std (ddof 1), and a normal 95% interval with a standard error clustered by `clusters`."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "sem": None, "ci95": None, "n_images": 0, "n_prompts": 0}
    mean = float(values.mean())
    _, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    groups = int(inverse.max()) + 1
    result = {"mean": mean, "std": float(values.std(ddof=1)) if n > 1 else None, "sem": None, "ci95": None,
              "n_images": n, "n_prompts": groups}
    if groups > 1:
        residual_sums = np.bincount(inverse, weights=values - mean)
        sem = math.sqrt(groups / (groups - 1) * float((residual_sums ** 2).sum())) / n
        result["sem"] = sem
        result["ci95"] = [mean - Z_95 * sem, mean + Z_95 * sem]
    return result


def mean_over_tasks(tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The mean of the tasks' means (GenEval's overall score) with a normal 95% interval: the tasks hold disjoint
    prompts, so the variance is the sum of the tasks' squared standard errors over the number of tasks squared."""
    means = [t["mean"] for t in tasks.values() if t["mean"] is not None]
    if not means:
        return {"mean": None, "sem": None, "ci95": None}
    mean = float(np.mean(means))
    sems = [t["sem"] for t in tasks.values() if t["mean"] is not None]
    if any(sem is None for sem in sems):
        return {"mean": mean, "sem": None, "ci95": None}
    sem = math.sqrt(sum(sem**2 for sem in sems)) / len(sems)
    return {"mean": mean, "sem": sem, "ci95": [mean - Z_95 * sem, mean + Z_95 * sem]}


def per_task(frame: pl.DataFrame, column: str) -> dict[str, dict[str, Any]]:
    """Per task (in order of first appearance) the prompt-clustered mean of `column`."""
    tasks = {}
    for task in frame["task"].unique(maintain_order=True).to_list():
        part = frame.filter(pl.col("task") == task) if task is not None else frame.filter(pl.col("task").is_null())
        tasks[str(task)] = clustered_mean_ci(part[column].to_numpy(), part["prompt"].to_numpy())
    return tasks


def by_task(frame: pl.DataFrame, column: str) -> dict[str, Any]:
    """Per task the clustered mean of `column`, and over tasks GenEval's overall score as the main figure (`mean`,
    `ci95`); `image_accuracy` is the plain share over all images and `prompt_accuracy` the share of prompts with at
    least one correct image (the official summary's "% correct images" and "% correct prompts")."""
    tasks = per_task(frame, column)
    plain = clustered_mean_ci(frame[column].to_numpy(), frame["prompt"].to_numpy())
    any_correct = frame.group_by("prompt_index").agg((pl.col(column) > 0).any())[column]
    prompt_accuracy = float(any_correct.mean()) if len(any_correct) else None
    return {**plain, **mean_over_tasks(tasks), "image_accuracy": plain["mean"], "prompt_accuracy": prompt_accuracy,
            "tasks": tasks,
            "statistics": "mean: the mean over tasks of each task's share of correct images (GenEval's overall); "
                          "ci95 from the tasks' prompt-clustered standard errors"}


def _relative(path: Path, out: Path) -> str:
    try:
        return str(path.resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path.resolve())


def write_outputs(items: Sequence[EvalItem], scores: dict[str, dict], models: dict[str, dict], out: Path,
                  meta: dict[str, Any], grid_prompts: int) -> dict[str, Any]:
    """images.parquet, summary.json, summary.md and grid.png of a scored run; returns the summary."""
    metrics = list(scores)
    rows: dict[str, list] = {name: [] for name in table_schema(metrics).names}
    for item in items:
        rows["prompt_index"].append(item.prompt_index)
        rows["image_index"].append(item.image_index)
        rows["prompt"].append(item.prompt)
        rows["seed"].append(item.seed)
        rows["image_path"].append(_relative(item.path, out))
        rows["task"].append(item.task)
        errors = []
        for metric in metrics:
            score, error = scores[metric].get(item.key, (None, "not scored"))
            rows[metric].append(score)
            if error and error not in errors:
                errors.append(error)
        rows["error"].append("; ".join(errors) or None)
    table = pa.Table.from_pydict(rows, schema=table_schema(metrics))
    write_atomic(table, out / TABLE_FILE)
    frame = pl.from_arrow(table)
    summary = {**meta, "images": len(items), "prompts": frame["prompt_index"].n_unique(),
               "images_with_errors": int(frame["error"].is_not_null().sum()), "statistics": STATISTICS,
               "metrics": {}}
    for metric in metrics:
        scored = frame.filter(pl.col(metric).is_not_null())
        if metric in RECORD_METRICS:  # the benchmark's score: per task, then the mean over tasks
            stats = by_task(scored, metric)
        else:
            stats = clustered_mean_ci(scored[metric].to_numpy(), scored["prompt_index"].to_numpy())
        summary["metrics"][metric] = {**stats, "model_id": models[metric]["model_id"],
                                      "scale": models[metric]["scale"]}
    write_text_atomic(json.dumps(summary, indent=2) + "\n", out / SUMMARY_FILE)
    write_text_atomic(summary_markdown(summary), out / SUMMARY_MD)
    if grid_prompts > 0 and items:
        save_grid(items, grid_prompts, out / GRID_FILE)
    return summary


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _fmt_ci(ci: Sequence[float] | None) -> str:
    return "n/a" if ci is None else f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def summary_markdown(summary: dict[str, Any]) -> str:
    """A markdown table of one run's metrics, with the generation settings under it."""
    lines = ["| metric | mean | 95% CI | std | images | model | scale |", "|---|---|---|---|---|---|---|"]
    for metric, s in summary["metrics"].items():
        lines.append(f"| {metric} | {_fmt(s['mean'])} | {_fmt_ci(s['ci95'])} | {_fmt(s['std'])} | {s['n_images']} "
                     f"| {_cell(s['model_id'])} | {_cell(s['scale'])} |")
        for task, t in s.get("tasks", {}).items():
            lines.append(f"| {metric}: {task} | {_fmt(t['mean'])} | {_fmt_ci(t['ci95'])} | {_fmt(t['std'])} | "
                         f"{t['n_images']} | | |")
    lines.append("")
    lines.append(f"{summary['images']} images over {summary['prompts']} prompts. {summary['statistics']}.")
    for metric, s in summary["metrics"].items():
        if "image_accuracy" in s:
            lines.append(f"{metric}: {_fmt(s['mean'])} is the mean over tasks; correct images "
                         f"{_fmt(s['image_accuracy'])}, prompts with a correct image "
                         f"{_fmt(s.get('prompt_accuracy'))}.")
    generation = summary.get("generation")
    if generation:
        settings = ", ".join(f"{k} {v}" for k, v in generation.items() if v is not None)
        lines.append(f"Generation: {settings}.")
    return "\n".join(lines) + "\n"


def save_grid(items: Sequence[EvalItem], prompts: int, path: Path) -> Path | None:
    """A PNG grid, one row per prompt (the first `prompts` by index), its images in image order."""

    rows: dict[int, list[EvalItem]] = {}
    for item in sorted(items, key=lambda it: (it.prompt_index, it.image_index)):
        if item.prompt_index in rows or len(rows) < prompts:
            rows.setdefault(item.prompt_index, []).append(item)
    cols = max(len(row) for row in rows.values())
    cell = None
    images = []
    for row in rows.values():
        for index in range(cols):
            image = None
            if index < len(row):
                try:
                    with Image.open(row[index].path) as opened:
                        image = opened.convert("RGB")
                except (OSError, ValueError):
                    image = None
            cell = cell or (image.size if image is not None else None)
            images.append(image)
    if cell is None:
        return None
    blank = Image.new("RGB", cell, "white")
    images = [blank if image is None else image if image.size == cell else image.resize(cell) for image in images]
    return save_image_grid(images, len(rows), path)


def read_run(run_dir: Path) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The per-image table and summary of a run directory."""

    run_dir = Path(run_dir)
    table, summary = run_dir / TABLE_FILE, run_dir / SUMMARY_FILE
    if not table.is_file() or not summary.is_file():
        raise InputError(f"{run_dir} is not an evaluation run (no {TABLE_FILE} and {SUMMARY_FILE}); pass a directory "
                         "written by `lpo eval` or `lpo eval score`.")
    summary_data = json.loads(summary.read_text())
    check_schema(table, table_schema(list(summary_data["metrics"]), task=False), "evaluation")
    frame = pl.read_parquet(table)
    if "task" not in frame.columns:  # a run scored before benchmark records were kept
        frame = frame.with_columns(task=pl.lit(None, dtype=pl.String))
    return frame, summary_data


def compare(config: EvalCompareConfig) -> dict[str, Any]:
    """Per-metric means of two runs over their paired images, the mean paired difference with a prompt-clustered
    95% interval, and the per-prompt win rate of B over A."""
    if not config.run_a or not config.run_b:
        raise InputError("give two run directories: `lpo eval compare RUN_A RUN_B`.")
    a, summary_a = read_run(config.run_a)
    b, summary_b = read_run(config.run_b)
    metrics = [m for m in summary_a["metrics"] if m in summary_b["metrics"]]
    if not metrics:
        raise InputError(f"{config.run_a} ({list(summary_a['metrics'])}) and {config.run_b} "
                         f"({list(summary_b['metrics'])}) share no metric; score both with the same --metrics.")
    for metric in metrics:
        model_a, model_b = summary_a["metrics"][metric]["model_id"], summary_b["metrics"][metric]["model_id"]
        if model_a != model_b:
            raise InputError(f"{metric} was computed with {model_a!r} in {config.run_a} but {model_b!r} in "
                             f"{config.run_b}: the scores are not comparable; rescore one run with the other's model.")
    keys = ["prompt", "image_index"]
    joined = a.select(keys + ["task"] + metrics).join(b.select(keys + metrics), on=keys, how="inner", suffix="_b")
    if joined.height == 0:
        raise InputError(f"{config.run_a} and {config.run_b} have no (prompt, image index) in common: they were made "
                         "from different prompts; compare runs of the same prompt set.")
    result: dict[str, Any] = {
        "run_a": str(config.run_a), "run_b": str(config.run_b), "pairs": joined.height,
        "prompts": joined["prompt"].n_unique(), "only_in_a": a.height - joined.height,
        "only_in_b": b.height - joined.height, "statistics": COMPARE_STATISTICS, "metrics": {},
        "generation": {"a": summary_a.get("generation"), "b": summary_b.get("generation")},
    }
    for metric in metrics:
        paired = joined.filter(pl.col(metric).is_not_null() & pl.col(f"{metric}_b").is_not_null())
        score_a, score_b = paired[metric].to_numpy(), paired[f"{metric}_b"].to_numpy()
        prompts = paired["prompt"].to_numpy()
        delta = clustered_mean_ci(score_b - score_a, prompts)
        per_prompt = paired.group_by("prompt").agg(pl.col(metric).mean().alias("a"),
                                                   pl.col(f"{metric}_b").mean().alias("b"))
        wins = int((per_prompt["b"] > per_prompt["a"]).sum())
        losses = int((per_prompt["b"] < per_prompt["a"]).sum())
        ties = per_prompt.height - wins - losses
        mean_a = float(score_a.mean()) if len(score_a) else None
        mean_b = float(score_b.mean()) if len(score_b) else None
        tasks = None
        if metric in RECORD_METRICS:  # compared as the benchmark scores: per task, then the mean over tasks
            paired = paired.with_columns(delta=pl.col(f"{metric}_b") - pl.col(metric))
            tasks = per_task(paired, "delta")
            delta = {**delta, **mean_over_tasks(tasks)}
            mean_a = mean_over_tasks(per_task(paired, metric))["mean"]
            mean_b = mean_over_tasks(per_task(paired, f"{metric}_b"))["mean"]
        result["metrics"][metric] = {
            "mean_a": mean_a, "mean_b": mean_b, **({"tasks": tasks} if tasks is not None else {}),
            "delta": delta["mean"], "ci95": delta["ci95"], "sem": delta["sem"], "n_pairs": delta["n_images"],
            "n_prompts": delta["n_prompts"], "wins": wins, "losses": losses, "ties": ties,
            "win_rate": (wins + 0.5 * ties) / per_prompt.height if per_prompt.height else None,
            "model_id": summary_a["metrics"][metric]["model_id"], "scale": summary_a["metrics"][metric]["scale"],
        }
    if config.out is not None:
        out = Path(config.out)
        write_text_atomic(compare_markdown(result), out)
        write_text_atomic(json.dumps(result, indent=2) + "\n", out.with_suffix(".json"))
    return result


def compare_markdown(result: dict[str, Any]) -> str:
    """The comparison as a markdown table."""
    name_a, name_b = Path(result["run_a"]).name, Path(result["run_b"]).name
    lines = [f"| metric | A: {name_a} | B: {name_b} | delta (B - A) | 95% CI of delta | B wins (prompts) |",
             "|---|---|---|---|---|---|"]
    for metric, m in result["metrics"].items():
        win = "n/a" if m["win_rate"] is None else \
            f"{100 * m['win_rate']:.1f}% ({m['wins']} up, {m['ties']} tied, {m['losses']} down)"
        lines.append(f"| {metric} | {_fmt(m['mean_a'])} | {_fmt(m['mean_b'])} | {_fmt(m['delta'], 4)} | "
                     f"{_fmt_ci(m['ci95'])} | {win} |")
        for task, t in (m.get("tasks") or {}).items():
            lines.append(f"| {metric}: {task} | | | {_fmt(t['mean'], 4)} | {_fmt_ci(t['ci95'])} | |")
    lines.append("")
    lines.append(f"{result['pairs']} paired images over {result['prompts']} prompts "
                 f"({result['only_in_a']} only in A, {result['only_in_b']} only in B). {result['statistics']}.")
    return "\n".join(lines) + "\n"
