"""`lpo eval suite SUITE.yaml --out DIR`: a paper's comparison table as one command.

A suite names what every row shares (prompts, sampler settings, seed, metrics and their models) and the rows: each
a base pipeline with an optional LoRA, fine-tuned UNet or transformer, or LRM guiding the sampler, and its own
guidance where the paper used another. Every row is one `lpo eval` run in `OUT/rows/<row>/` with the same seeds, so
row k and the first row are paired image by image (prompt p, image i, seed `seed + 1000 p + i`). A row whose run is
finished with the same settings is reused as it is; an unfinished one resumes image by image.

The table (`table.md`, `table.json`, `table.png`): per row and metric the mean with its 95% interval, the paired
difference against the first row with its interval (`lpo eval compare`'s statistics), and the paper's numbers where
the suite gives them.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lpo.core import rundir
from lpo.core.config import _read_config_file, to_dict
from lpo.core.errors import InputError
from lpo.core.files import write_text_atomic
from lpo.core.plots import pyplot, save_figure
from lpo.core.shipped import resolve_shipped, shipped
from lpo.reward.backbones import family_of
from lpo.reward.eval import run as evaluation
from lpo.reward.eval.config import EvalCompareConfig, EvalConfig, EvalSuiteConfig
from lpo.reward.eval.items import SUMMARY_FILE
from lpo.reward.eval.stats import COMPARE_STATISTICS, STATISTICS, compare

logger = logging.getLogger(__name__)

SHARED_KEYS = {"title": str, "source": str, "note": str, "base": str, "prompts": str, "metrics": list,
               "models": dict, "images_per_prompt": int, "max_prompts": int, "steps": int, "guidance": (int, float),
               "eta": (int, float), "sampler": str, "resolution": int, "seed": int, "rows": list}
ROW_KEYS = {"name": str, "base": str, "lora": str, "unet": str, "transformer": str, "lrm": str, "candidates": int,
            "guidance": (int, float), "eta": (int, float), "sampler": str, "paper": dict, "note": str}
TABLE_MD, TABLE_JSON, TABLE_PNG, RESOLVED_SUITE = "table.md", "table.json", "table.png", "suite.json"


@dataclass
class Row:
    """One row of a suite: its name, the `lpo eval` config of its run, and the paper's numbers for it."""

    name: str
    config: EvalConfig
    paper: dict[str, float] = field(default_factory=dict)
    note: str | None = None


ALIASES = {"cfg": "guidance"}  # the command line's spellings: `lpo eval --cfg` is `--guidance`


def _check_keys(mapping: Any, known: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(mapping, dict):
        raise InputError(f"{where} must be a mapping of keys to values, not {type(mapping).__name__}.")
    for alias, key in ALIASES.items():
        if alias in mapping:
            if key in mapping:
                raise InputError(f"{where} gives both {alias} and {key}, two names of one setting; keep one.")
            mapping[key] = mapping.pop(alias)
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        raise InputError(f"{where} has unknown keys {unknown}; the known keys are {sorted(known)}.")
    for key, value in mapping.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, known[key])):
            raise InputError(f"{where}: {key} = {value!r} should be {getattr(known[key], '__name__', 'a number')}.")
    return mapping


def read_suite(path: Path) -> dict[str, Any]:
    """The suite file (a path, or a shipped suite's name: `lpo-sd15`), with its keys and rows checked."""

    path = resolve_shipped(path)
    if not path.exists() and not path.suffix and len(path.parts) == 1 and shipped("suites", f"{path}.yaml").exists():
        path = shipped("suites", f"{path}.yaml")
    suite = _check_keys(_read_config_file(path, "suite"), SHARED_KEYS, f"suite {path}")
    for key in ("prompts", "metrics", "rows"):
        if not suite.get(key):
            raise InputError(f"suite {path} gives no {key}; a suite needs prompts, metrics and rows.")
    names = set()
    for index, row in enumerate(suite["rows"]):
        where = f"suite {path}, row {index + 1}"
        _check_keys(row, ROW_KEYS, where)
        if not row.get("name"):
            raise InputError(f"{where} has no name.")
        if slug(row["name"]) in names:
            raise InputError(f"{where}: the name {row['name']!r} is used twice; give every row its own name.")
        names.add(slug(row["name"]))
        if not (row.get("base") or suite.get("base")):
            raise InputError(f"{where} ({row['name']}) has no base, and the suite gives none.")
        if row.get("unet") and row.get("transformer"):
            raise InputError(f"{where} ({row['name']}) gives both unet and transformer; a pipeline has one.")
        paper = row.get("paper") or {}
        stray = sorted(set(paper) - set(suite["metrics"]))
        if stray or not all(isinstance(v, (int, float)) for v in paper.values()):
            raise InputError(f"{where} ({row['name']}): paper numbers must be numbers for the suite's metrics "
                             f"{suite['metrics']} (found {stray or paper}).")
    return suite


def slug(name: str) -> str:
    """The row's folder name."""
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-") or "row"


def rows_of(config: EvalSuiteConfig, suite: dict[str, Any]) -> list[Row]:
    """Every selected row's `lpo eval` config: the suite's shared settings, the row's own, the command's overrides."""

    wanted = list(config.rows or [])
    known = [row["name"] for row in suite["rows"]]
    missing = [name for name in wanted if name not in known]
    if missing:
        raise InputError(f"--rows {missing}: not rows of {config.suite}; its rows are {known}.")
    rows = []
    for index, row in enumerate(suite["rows"]):
        if wanted and index > 0 and row["name"] not in wanted:
            continue
        base = row.get("base") or suite["base"]
        key = "unet" if row.get("unet") else "transformer" if row.get("transformer") else None
        family = family_of(base) if key is not None else None
        if family is not None and family.denoiser != key:
            raise InputError(f"row {row['name']!r}: {base} is a {family.title} pipeline, whose denoiser is a "
                             f"{family.denoiser}; give `{family.denoiser}:` instead of `{key}:`.")
        eval_config = EvalConfig(
            base=base, prompts=Path(suite["prompts"]), out=Path(config.out) / "rows" / slug(row["name"]),
            lora=Path(row["lora"]) if row.get("lora") else None, denoiser=row.get(key) if key else None,
            lrm=Path(row["lrm"]) if row.get("lrm") else None, candidates=row.get("candidates", 1),
            metrics=list(suite["metrics"]), models=dict(suite.get("models") or {}), models_dir=config.models_dir,
            images_per_prompt=suite.get("images_per_prompt", 4),
            max_prompts=config.max_prompts or suite.get("max_prompts"), steps=suite.get("steps", 20),
            guidance=row.get("guidance", suite.get("guidance")), eta=row.get("eta", suite.get("eta")),
            sampler=row.get("sampler", suite.get("sampler")), resolution=suite.get("resolution"),
            seed=suite.get("seed", 42),
            batch_size=config.batch_size, score_batch_size=config.score_batch_size,
            device=config.device, dtype=config.dtype, score_dtype=config.score_dtype)
        rows.append(Row(row["name"], eval_config, dict(row.get("paper") or {}), row.get("note")))
    return rows


def _as_json(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(to_dict(config), default=str))


def is_finished(row: Row) -> bool:
    """Whether the row's run is complete and was made with exactly the row's settings."""
    out = Path(row.config.out)
    saved = out / "config.json"
    return (out / SUMMARY_FILE).is_file() and saved.is_file() and json.loads(saved.read_text()) == _as_json(row.config)


def run(config: EvalSuiteConfig) -> dict[str, Any]:
    """Check every row, run the unfinished ones (resumable), reuse the finished, and write the table."""

    if not config.suite or not config.out:
        raise InputError("give a suite file and --out, e.g. `lpo eval suite manifests/suites/lpo-sd15.yaml --out "
                         "runs/table-sd15`.")
    rundir.claim(config.out, "suite")
    suite = read_suite(config.suite)
    rows = rows_of(config, suite)
    for row in rows:  # every row's input, before any model loads
        try:
            evaluation.validate(row.config)
        except InputError as err:
            raise InputError(f"row {row.name!r}: {err}") from None
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(suite, indent=2) + "\n", out / RESOLVED_SUITE)
    for row in rows:
        if is_finished(row):
            logger.info("row %r: finished with the same settings in %s, reused", row.name, row.config.out)
            continue
        logger.info("row %r: evaluating into %s", row.name, row.config.out)
        evaluation.run(row.config)
    return write_table(suite, rows, out)


def write_table(suite: dict[str, Any], rows: list[Row], out: Path) -> dict[str, Any]:
    """table.json, table.md and table.png: per row and metric the mean and its interval, the paired difference
    against the first row, and the paper's number."""

    metrics = list(suite["metrics"])
    baseline = rows[0]
    entries = []
    for row in rows:
        summary = json.loads((Path(row.config.out) / SUMMARY_FILE).read_text())
        paired = None
        if row is not baseline:
            result = compare(EvalCompareConfig(run_a=baseline.config.out, run_b=row.config.out))
            paired = {m: {key: result["metrics"][m][key] for key in ("delta", "ci95", "n_pairs", "win_rate")}
                      for m in metrics}
        generation = summary["generation"]
        entries.append({
            "name": row.name, "run": str(row.config.out), "note": row.note,
            "weights": {key: generation.get(key) for key in ("base", "lora", "denoiser", "denoiser_weights", "lrm",
                                                              "candidates")},
            "guidance": generation["guidance"], "eta": generation["eta"], "images": summary["images"],
            "prompts": summary["prompts"],
            "metrics": {m: {key: summary["metrics"][m][key] for key in ("mean", "ci95", "n_images", "model_id")}
                        for m in metrics},
            "paired_with_first": paired, "paper": row.paper,
        })
    table = {"title": suite.get("title") or Path(out).name, "source": suite.get("source"), "note": suite.get("note"),
             "baseline": baseline.name, "metrics": metrics, "rows": entries, "statistics": STATISTICS,
             "paired_statistics": COMPARE_STATISTICS,
             "shared": {key: suite.get(key) for key in ("prompts", "images_per_prompt", "steps", "seed")}}
    write_text_atomic(json.dumps(table, indent=2) + "\n", out / TABLE_JSON)
    write_text_atomic(table_markdown(table), out / TABLE_MD)
    plot_table(table, out / TABLE_PNG)
    table["out"] = str(out)
    return table


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _interval(ci: list[float] | None, sign: str = "") -> str:
    return "" if ci is None else f" [{ci[0]:{sign}.4f}, {ci[1]:{sign}.4f}]"


def table_markdown(table: dict[str, Any]) -> str:
    """The table as the paper prints it (rows x metrics), then the paired differences, then the paper's numbers."""
    metrics = table["metrics"]
    head = "| row | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics) + "\n"
    lines = [f"## {table['title']}", "", "Mean over images [95% interval]:", "", head.rstrip("\n")]
    for row in table["rows"]:
        cells = [f"{_number(row['metrics'][m]['mean'])}{_interval(row['metrics'][m]['ci95'])}" for m in metrics]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    lines += ["", f"Paired difference against {table['baseline']} (same prompts and seeds) [95% interval]:", "",
              head.rstrip("\n")]
    for row in table["rows"][1:]:
        paired = row["paired_with_first"]
        cells = ["n/a" if paired[m]["delta"] is None else
                 f"{paired[m]['delta']:+.4f}{_interval(paired[m]['ci95'], '+')}" for m in metrics]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    if any(row["paper"] for row in table["rows"]):
        source = f" ({table['source']})" if table.get("source") else ""
        lines += ["", f"The paper's numbers / ours{source}:", "", head.rstrip("\n")]
        for row in table["rows"]:
            cells = [f"{row['paper'][m]:g} / {_number(row['metrics'][m]['mean'])}" if m in row["paper"] else
                     f"- / {_number(row['metrics'][m]['mean'])}" for m in metrics]
            lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    lines += ["", "Rows:"]
    for row in table["rows"]:
        weights = ", ".join(f"{k} {v}" for k, v in row["weights"].items() if v not in (None, 1))
        note = f" {row['note']}" if row.get("note") else ""
        lines.append(f"- {row['name']}: {weights}; guidance {row['guidance']}, eta {row['eta']}; {row['images']} "
                     f"images over {row['prompts']} prompts ({row['run']}).{note}")
    models = {m: table["rows"][0]["metrics"][m]["model_id"] for m in metrics}
    lines += ["", "Metric models: " + ", ".join(f"{m} {model}" for m, model in models.items()) + ".",
              f"Statistics: {table['statistics']}. Paired: {table['paired_statistics']}."]
    if table.get("note"):
        lines += ["", table["note"]]
    return "\n".join(lines) + "\n"


def plot_table(table: dict[str, Any], path: Path) -> Path:
    """One panel per metric: each row's mean with its 95% interval, the first row's mean as a dashed line, and the
    paper's number as a cross where the suite gives one."""
    plt = pyplot()

    metrics, rows = table["metrics"], table["rows"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 0.5 * len(rows) + 1.6), squeeze=False)
    ys = list(range(len(rows)))[::-1]
    for ax, metric in zip(axes[0], metrics):
        for y, row in zip(ys, rows):
            stats = row["metrics"][metric]
            if stats["mean"] is None:
                continue
            err = None if stats["ci95"] is None else [[stats["mean"] - stats["ci95"][0]],
                                                      [stats["ci95"][1] - stats["mean"]]]
            ax.errorbar(stats["mean"], y, xerr=err, fmt="o", color="tab:blue", capsize=3)
            if metric in row["paper"]:
                ax.plot(row["paper"][metric], y, "x", color="tab:red", markersize=8)
        first = rows[0]["metrics"][metric]["mean"]
        if first is not None:
            ax.axvline(first, color="grey", linestyle="--", linewidth=1)
        ax.set_title(metric)
        ax.set_yticks(ys)
        ax.set_yticklabels([row["name"] for row in rows] if ax is axes[0][0] else [])
    handles = [plt.Line2D([], [], marker="o", color="tab:blue", linestyle="", label="ours (95% interval)")]
    if any(row["paper"] for row in rows):
        handles.append(plt.Line2D([], [], marker="x", color="tab:red", linestyle="", label="paper"))
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False)
    fig.suptitle(table["title"])
    return save_figure(fig, path, rect=(0, 0.08, 1, 1))
