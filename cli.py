"""The `lpo` command line: every command's options are its config dataclass's fields (one default and one help
string each, `lpo.core.config`); a command builds the config, calls one library function and prints a summary."""

from __future__ import annotations

import json
import logging
import os
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import typer

from lpo.core.commands import command, console, lazy, out_console, table
from lpo.curate.config import FilterConfig, IngestConfig, ScoreConfig
from lpo.curate.options import model_options
from lpo.curate.scorers.specs import CURATION_METRICS, METRICS
from lpo.reward.eval.config import EvalCompareConfig, EvalConfig, EvalScoreConfig, EvalSuiteConfig
from lpo.reward.lpo.config import LPOConfig, SampleConfig, family_helps
from lpo.reward.lrm.config import (
    ImportReferenceConfig,
    RewardCacheConfig,
    RewardCompareConfig,
    RewardEvalConfig,
    RewardScoreConfig,
    RewardTrainConfig,
)
from lpo.reward.serve.config import ServeConfig
from lpo.reward.toy.config import DemoConfig, SampleDataConfig, TinyModelsConfig, ToyModelsConfig

app = typer.Typer(help="Curate preference pairs, train latent reward models and run latent preference optimisation.",
                  no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
curate_app = typer.Typer(help="Pick-a-Pic ingest, image scoring and MPCF filtering into parquet manifests.",
                         no_args_is_help=True)
reward_app = typer.Typer(help="Latent reward model (LRM): train, evaluate per timestep, score images, serve rewards.",
                         no_args_is_help=True)
optimize_app = typer.Typer(help="Step-level fine-tuning with an LRM: LPO, or step-wise GRPO.", no_args_is_help=True)
eval_app = typer.Typer(help="Generate with per-image seeds and score every image (lpo eval --base ... --prompts ... "
                            "--out DIR), score existing images (lpo eval score), compare two runs (lpo eval compare).",
                       invoke_without_command=True)
dev_app = typer.Typer(help="Developer tools: tiny models, the toy world's models, sample data.", no_args_is_help=True)
for sub, name in ((curate_app, "curate"), (reward_app, "reward"), (optimize_app, "optimize"), (eval_app, "eval"),
                  (dev_app, "dev")):
    app.add_typer(sub, name=name)

def _print_version(shown: bool) -> None:
    if shown:
        typer.echo(f"lpo {version('lpo')}")
        raise typer.Exit(0)


@app.callback()
def main_options(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
                 show_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                                   help="Print lpo's version and exit.")) -> None:
    # Our package logs progress at INFO; third-party libraries only speak up with warnings (or with --verbose).
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("lpo").setLevel(logging.DEBUG if verbose else logging.INFO)


# ---------------------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------------------
# lpo curate


def report_ingest(config: IngestConfig, summary: Any) -> None:
    rows = [("source rows read", summary.rows_read), ("pairs", summary.pairs),
            ("unique images", summary.unique_images)]
    rows += [(f"skipped: {reason}", count) for reason, count in sorted(summary.skipped.items())]
    table(f"ingest -> {config.out}", ("what", "count"), rows, right=("count",))


def report_score(config: ScoreConfig, report: dict[str, Any]) -> None:
    if "scored_total" not in report:
        return  # not the main process
    rows = [(metric, info["model"], info["scored_now"], report["scored_total"][metric])
            for metric, info in report["metrics"].items()]
    table(f"scores -> {Path(config.work_dir) / 'scores.parquet'}",
           ("metric", "model", "scored now (rank 0)", "scored in total"), rows)
    out_console.print(f"{report['images']} unique images; {report['scored_total']['errors']} with errors; "
                      f"{report['processes']} process(es)")


def report_filter(config: FilterConfig, summary: dict[str, Any]) -> None:
    total = max(summary["pairs"], 1)
    rows = [("all pairs", summary["pairs"], "100.0%"),
            ("[green]kept[/]", summary["kept"], f"{100 * summary['kept'] / total:.1f}%")]
    if summary["keep_ties"]:
        rows.append(("  of which ties", summary["kept_ties"], f"{100 * summary['kept_ties'] / total:.1f}%"))
    rows += [(f"[red]rejected[/]: {reason}", count, f"{100 * count / total:.1f}%")
             for reason, count in summary["rejected_by_reason"].items()]
    table(f"MPCF rule '{summary['rule']}' -> {config.out}", ("what", "pairs", "share"), rows,
           right=("pairs", "share"))
    rows = [(metric, info["pairs"], "n/a" if info["rate"] is None else f"{100 * info['rate']:.1f}%")
            for metric, info in summary["agreement"].items()]
    table("Human label agreement per metric (labelled, non-tie pairs)",
           ("metric", "pairs", "metric prefers the human winner"), rows)
    out_console.print(f"{summary['rule_description']}. Images with errors: {summary['images_with_errors']}.")
    out_console.print("Scored with: " + "; ".join(f"{metric} {model}" for metric, model in summary["models"].items()))


MODEL_HELP_CURATE = dict(options=model_options(CURATION_METRICS))
command(curate_app, "ingest", IngestConfig, lazy("lpo.curate.ingest", "run"), report_ingest,
        arguments=("source",), required=("source", "out"),
        help="Read Pick-a-Pic pairs into DIR/pairs.parquet and DIR/images/ (each unique image once). Resumable.")
command(curate_app, "score", ScoreConfig, lazy("lpo.curate.score", "run"), report_score,
        arguments=("work_dir",), required=("work_dir",), **MODEL_HELP_CURATE,
        help="Score each unique image once per metric into DIR/scores.parquet. Resumable; shard with "
             "`accelerate launch`.")
command(curate_app, "filter", FilterConfig, lazy("lpo.curate.filter", "run"), report_filter,
        arguments=("source",), required=("source", "out"), flags={"keep_ties": ("--keep-ties/--drop-ties",)},
        helps={"min_gap": "keep a labelled pair only if its gap on metric is > value.",
               "tie_max_gap": "keep a tie only if its |gap| on metric is < value."}, **MODEL_HELP_CURATE,
        help="Ingest and score what is missing, then keep the pairs every selected metric agrees with (MPCF).")


# ---------------------------------------------------------------------------------------------------------------
# lpo reward


def report_plan(plan: Any) -> None:
    table(plan.title, ("what", "per process"), plan.rows, right=("per process",))
    for warning in plan.warnings:
        console.print(f"[bold yellow]warning:[/] {warning}")


def report_reward_train(config: RewardTrainConfig, summary: dict[str, Any]) -> None:
    if "plan" in summary:
        report_plan(summary["plan"])
        return
    rows = []
    for key in ("steps", "effective_batch_size", "train_pairs", "validation_pairs", "best_step", "best_accuracy"):
        value = summary[key]
        rows.append((key.replace("_", " "), f"{value:.3f}" if isinstance(value, float) else value))
    if summary["history"]:
        rows += [(f"last validation accuracy, t={t}", f"{acc:.3f}")
                 for t, acc in summary["history"][-1]["accuracy"].items()]
    table(f"LRM training -> {config.out}", ("what", "value"), rows, right=("value",))
    out_console.print(f"best model: {summary['best']}   last model: {summary['last']}")


def report_reward_eval(config: RewardEvalConfig, result: dict[str, Any]) -> None:
    sets = result["sets"]
    timesteps = list(next(iter(sets.values()))["accuracy"])
    columns = ("timestep", *(f"{name} ({s['pairs']} pairs)" for name, s in sets.items()))
    table(f"LRM pairwise accuracy -> {result['out']}", columns,
          [(t, *(f"{s['accuracy'][t]:.3f}" for s in sets.values())) for t in timesteps], right=columns)
    if "blind_timestep" in result:
        blind = f"told t={result['blind_timestep']:g}"
        table(f"the same LRM {blind} at every noise level (timestep-blind control)", columns,
              [(t, *(f"{s['accuracy_blind'][t]:.3f}" for s in sets.values())) for t in timesteps], right=columns)


def report_reward_compare(config: RewardCompareConfig, result: dict[str, Any]) -> None:
    models = result["models"]
    columns = ("timestep", *models)
    rows = []
    for t in map(str, result["timesteps"]):
        cells = []
        for model in models.values():
            level = model["accuracy"][t]
            ci = level["ci95"]
            cells.append(f"{level['accuracy']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
        rows.append((t, *cells))
    table(f"pairwise accuracy per noise level, {result['pairs']} pairs (95% intervals) -> {result['out']}", columns,
          rows, right=columns)


def report_reward_score(config: RewardScoreConfig, records: list[dict[str, Any]]) -> None:
    for record in records:
        typer.echo(json.dumps(record))


command(reward_app, "train", RewardTrainConfig,
        lazy("lpo.reward.lrm.train", "run"), report_reward_train, failure="training stopped",
        required=("manifest", "base", "out"),
        help="Train a latent reward model on kept pairs (soft-label Bradley-Terry on noisy latents). Resumable.")
command(reward_app, "cache", RewardCacheConfig, lazy("lpo.reward.lrm.latents", "run"),
        lambda config, r: out_console.print(f"{r['cached']} of {r['images']} images cached ({r['encoded_now']} "
                                            f"encoded now, {r['processes']} process(es)) in {r['directory']}"),
        required=("manifests", "base", "out"), repeatable=("manifests",), flags={"manifests": ("--manifest",)},
        help="Encode the images of pairs manifests with the VAE once (every process its shard, under accelerate "
             "launch), into a cache `lpo reward train --latent-cache` reuses. Resumable.")
command(reward_app, "eval", RewardEvalConfig, lazy("lpo.reward.lrm.accuracy", "run"), report_reward_eval,
        required=("lrm",),
        help="Pairwise accuracy of an LRM per timestep (fixed noise seeds; ties count 0.5) on a manifest, or on "
             "Pick-a-Pic's validation_unique and test_unique (--dataset): JSON and a PNG plot.")
command(reward_app, "compare", RewardCompareConfig, lazy("lpo.reward.lrm.compare", "run"), report_reward_compare,
        required=("manifest", "out", "lrms"), repeatable=("lrms",), flags={"lrms": ("--lrm",)},
        help="Compare reward models per noise level on one preference set: LRMs (ours, imported reference ones) "
             "and image metrics (on the VAE-decoded noisy latents), each on the same pairs and noise seeds; "
             "accuracy with 95% intervals, a table, a plot. Resumable.")
command(reward_app, "score", RewardScoreConfig, lazy("lpo.reward.lrm.accuracy", "score"), report_reward_score,
        required=("lrm", "images", "prompts"), repeatable=("images", "prompts"), flags={"prompts": ("--prompt",)},
        help="Score image files against prompts with an LRM (encode, noise to t, score).")
command(reward_app, "import-reference", ImportReferenceConfig, lazy("lpo.reward.lrm.reference", "run"),
        lambda config, r: out_console.print(f"{r['family']} LRM from {r['source']} -> {r['out']} (text encoders: "
                                            f"{r['text_encoders']}; logit scale {r['logit_scale']:.4f})"),
        arguments=("source",), required=("source", "base", "out"),
        help="Convert an LRM saved by the reference code (unet/, text_encoder/, state_dict.pt; the released "
             "casiatao/LRM/lrm_sd15 and lrm_sdxl) into this toolkit's format, usable by every --lrm option.")
command(reward_app, "serve", ServeConfig,
        lazy("lpo.reward.serve.server", "run"),
        lambda config, result: console.print("reward service stopped"), failure="reward service failed",
        **MODEL_HELP_CURATE,
        help="Serve the LRM and the curation scorers over HTTP (LitServe: dynamic batching, one worker per device).")


# ---------------------------------------------------------------------------------------------------------------
# lpo optimize <family>, lpo sample


DENOISER_FLAGS = ("--denoiser", "--unet", "--transformer")


def report_optimize(config: LPOConfig, summary: dict[str, Any]) -> None:
    if "plan" in summary:
        report_plan(summary["plan"])
        return
    if "preflight" in summary:
        table(f"pre-flight of {config.objective.upper()} ({config.family}): passed, nothing trained",
              ("check", "value"), [(check["name"], check["value"]) for check in summary["preflight"]])
        return
    described = summary["objective"]  # the round record's keys of this objective
    keys = (described["found"], f"{described['unit']}_trained", described["shared"])
    names = (keys[0].replace("_", " "), keys[2].replace("_", " "))
    rows = [(r["round"], r[keys[0]], r[keys[1]], f"{r.get(keys[2], float('nan')):.3f}",
             f"{r.get('loss', float('nan')):.4f}", f"{r['final_lrm_score']:.3f}") for r in summary["history"][-10:]]
    columns = ("round", names[0], "trained", names[1], "loss", "final LRM score")
    table(f"{config.objective.upper()} ({config.family}) -> {config.out}", columns, rows, right=columns)
    for name, path in summary["outputs"].items():
        out_console.print(f"{name}: {path}")
    monitored = summary.get("monitor") or {}
    if monitored:
        metrics = ", ".join(monitored["metrics"]) or "no independent metric (the LRM reward only)"
        out_console.print(f"monitor: {monitored['checks']} checks on {monitored['held_out_prompts']} held-out prompts "
                          f"({metrics}) -> {monitored['log']}, {monitored['plot']}")
        if monitored["best_round"] is not None:
            out_console.print(f"best check: round {monitored['best_round']} -> {monitored['best']}")
        if monitored["stopped"]:
            out_console.print(f"[bold]stopped early[/bold]: {monitored['reason']}")


def report_sample(config: SampleConfig, summary: dict[str, Any]) -> None:
    out_console.print(f"{len(summary['images'])} images -> {config.out} (samples.json lists prompt, seed and path)")
    if "lrm_score_gain" in summary:
        mean = summary["mean_lrm_score"]
        out_console.print(f"mean LRM score: guided (K={config.candidates}) {mean['guided']:.4f}, plain "
                          f"{mean['plain']:.4f}, gain {summary['lrm_score_gain']:+.4f} (same seeds)")


def _optimize_commands() -> None:
    from lpo.reward.backbones import FAMILIES

    for family in FAMILIES.values():
        command(optimize_app, family.name, LPOConfig, lazy("lpo.reward.lpo.train", "run"), report_optimize,
                failure="training stopped", required=("base", "prompts", "out"), fixed={"family": family.name},
                repeatable=("validation_prompts",), flags={"validation_prompts": ("--validation-prompt",),
                                                            "guidance": ("--guidance", "--cfg")},
                helps=family_helps(family.name),
                help=f"Fine-tune a {family.title} model with LPO: at every {family.sampler} step sample K children, "
                     "let the LRM pick winner and loser, train a DPO-style loss on the step's log-probability. "
                     "Resumable.")


_optimize_commands()


@optimize_app.command("sd2", hidden=True,
                      context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def _sd2() -> None:
    """SD2.x pipelines belong to the sd15 family (the same UNet, another text encoder)."""
    console.print("[bold red]error:[/] SD2.x pipelines belong to the sd15 family: run `lpo optimize sd15 --base "
                  "<your SD2.x pipeline>`.")
    raise typer.Exit(code=2)
command(app, "sample", SampleConfig, lazy("lpo.reward.lpo.sample", "run"), report_sample,
        required=("base", "prompts", "out"), repeatable=("prompts",),
        flags={"prompts": ("--prompt",), "guidance": ("--guidance", "--cfg"), "denoiser": DENOISER_FLAGS},
        helps={"prompts": "Prompt to generate. Repeatable."},
        help="Generate images with per-image seeds; with --lrm and --candidates K, LRM-guided: continue from the best "
             "of K at each step.")


# ---------------------------------------------------------------------------------------------------------------
# lpo eval


def report_eval(config: Any, summary: dict[str, Any]) -> None:
    out = Path(config.out)
    rows = []
    for metric, s in summary["metrics"].items():
        ci = "n/a" if s["ci95"] is None else f"[{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}]"
        mean = "n/a" if s["mean"] is None else f"{s['mean']:.4f}"
        std = "n/a" if s["std"] is None else f"{s['std']:.4f}"
        rows.append((metric, mean, ci, std, s["n_images"], s["model_id"]))
        rows += [(f"  {metric}: {task}", f"{t['mean']:.4f}", "n/a" if t["ci95"] is None else
                  f"[{t['ci95'][0]:.4f}, {t['ci95'][1]:.4f}]", "", t["n_images"], "")
                 for task, t in s.get("tasks", {}).items() if t["mean"] is not None]
    table(f"{summary['images']} images over {summary['prompts']} prompts -> {out}",
           ("metric", "mean", "95% CI", "std", "images", "model"), rows, right=("mean", "95% CI", "std", "images"))
    if summary["images_with_errors"]:
        out_console.print(f"[yellow]{summary['images_with_errors']} image(s) could not be scored (see the error "
                          "column of images.parquet)[/]")
    out_console.print(f"per image: {out / 'images.parquet'}; summary: {out / 'summary.json'}, {out / 'summary.md'}")


def report_compare(config: EvalCompareConfig, result: dict[str, Any]) -> None:
    from lpo.reward.eval.stats import compare_markdown

    name_a, name_b = Path(config.run_a).name, Path(config.run_b).name
    rows = []
    for metric, m in result["metrics"].items():
        ci = "n/a" if m["ci95"] is None else f"[{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}]"
        significant = m["ci95"] is not None and (m["ci95"][0] > 0 or m["ci95"][1] < 0)
        delta = f"{m['delta']:+.4f}" if m["delta"] is not None else "n/a"
        win = "n/a" if m["win_rate"] is None else f"{100 * m['win_rate']:.1f}%"
        rows.append((metric, f"{m['mean_a']:.4f}", f"{m['mean_b']:.4f}", f"[bold]{delta}[/]" if significant else delta,
                     ci, win))
        rows += [(f"  {metric}: {task}", "", "", f"{t['mean']:+.4f}", "n/a" if t["ci95"] is None else
                  f"[{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}]", "")
                 for task, t in (m.get("tasks") or {}).items() if t["mean"] is not None]
    columns = ("metric", f"A: {name_a}", f"B: {name_b}", "delta (B - A)", "95% CI", "B wins (prompts)")
    table(f"{name_b} vs {name_a}: {result['pairs']} paired images, {result['prompts']} prompts", columns, rows,
           right=columns[1:])
    out_console.print(result["statistics"] + ".")
    out_console.print(compare_markdown(result), markup=False, highlight=False)
    if config.out is not None:
        out_console.print(f"written: {config.out} and {Path(config.out).with_suffix('.json')}")


def report_suite(config: EvalSuiteConfig, result: dict[str, Any]) -> None:
    metrics, rows = result["metrics"], result["rows"]
    cells = []
    for row in rows:
        paired = row["paired_with_first"]
        cells.append((row["name"], *(
            f"{row['metrics'][m]['mean']:.4f}" + ("" if paired is None or paired[m]["delta"] is None else
                                                  f" ({paired[m]['delta']:+.4f})") for m in metrics)))
    table(f"{result['title']}: mean (paired difference against {result['baseline']})", ("row", *metrics), cells,
          right=tuple(metrics))
    out = Path(result["out"])
    out_console.print(f"written: {out / 'table.md'}, {out / 'table.json'}, {out / 'table.png'}")


EVAL_MODELS = dict(options=model_options(METRICS))
command(eval_app, None, EvalConfig, lazy("lpo.reward.eval.run", "run"), report_eval, callback=True,
        flags={"guidance": ("--guidance", "--cfg"), "denoiser": DENOISER_FLAGS}, **EVAL_MODELS,
        help="Generate every (prompt, image) with its own seed, score every image, write images.parquet, "
             "summary.json, summary.md and grid.png. Resumable: finished images are not generated again.")
command(eval_app, "score", EvalScoreConfig, lazy("lpo.reward.eval.score", "score_existing"), report_eval,
        required=("images", "out"), **EVAL_MODELS,
        help="Score images that already exist: a manifest pairs each file with its prompt, or files named "
             "<prompt index>_<image index>.png are matched to --prompts. Mismatches exit 2.")
command(eval_app, "suite", EvalSuiteConfig, lazy("lpo.reward.eval.suite", "run"), report_suite,
        arguments=("suite",), required=("suite", "out"),
        help="Run a suite of rows (base, LoRA, fine-tuned UNet/transformer, LRM-guided) on the same prompts and "
             "seeds, each a resumable `lpo eval` run (finished rows are reused), and write the table: means with 95% "
             "intervals, paired differences against the first row, the paper's numbers (table.md/.json/.png).")
command(eval_app, "compare", EvalCompareConfig, lazy("lpo.reward.eval.stats", "compare"), report_compare,
        arguments=("run_a", "run_b"), required=("run_a", "run_b"),
        help="Per-metric means of two runs, the paired difference (by prompt and image index) with a 95% interval, "
             "and the per-prompt win rate; a rich table and markdown.")


# ---------------------------------------------------------------------------------------------------------------
# lpo demo, lpo dev


def report_demo(config: DemoConfig, summary: dict[str, Any]) -> None:
    from lpo.reward.toy.claims import VERDICT_RULE
    from lpo.reward.toy.demo import SUMMARY_FILE

    colour = {"yes": "green", "no": "red", "not shown": "yellow"}
    rows = [(c["claim"], c["measured"], f"[{colour[c['verdict']]}]{c['verdict']}[/]") for c in summary["claims"]]
    table(f"lpo demo -> {config.out}", ("claim", "measured; effect [95% interval]", "holds"), rows)
    out_console.print(f"holds: {VERDICT_RULE}")
    out = Path(config.out)
    out_console.print(f"written: {out / 'demo.md'}, {out / 'demo.png'}, {out / SUMMARY_FILE}")


def run_demo(config: DemoConfig) -> dict[str, Any]:
    from lpo.reward.toy import demo

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo loads only local models
    return demo.run(config)


command(app, "demo", DemoConfig, run_demo, report_demo,
        help="Show on the toy world, in minutes on a CPU, that MPCF, the latent reward model and LPO learn: curation, "
             "three LRMs, LPO fine-tuning (and step-wise GRPO with --grpo), guided sampling and a before/after "
             "comparison, on the toy UNet (--family sd15) or flow-matching SD3 model (--family sd3). Rerun to "
             "continue a stopped run.")
command(dev_app, "tiny-models", TinyModelsConfig, lazy("lpo.reward.toy.random_models", "run"),
        lambda config, written: [out_console.print(f"{role:10s} {path}") for role, path in written.items()],
        arguments=("out",), required=("out",),
        help="Write tiny random-weight models in the real on-disk formats (pickscore, clip, vqa, aesthetic, sd15, "
             "sdxl, sd3, flux, hpsv2, hpsv21, imagereward, geneval, t2i-color, t2i-shape, t2i-texture).")
command(dev_app, "toy-models", ToyModelsConfig, lazy("lpo.reward.toy.trainer", "run"),
        lambda config, summary: out_console.print_json(json.dumps(
            {k: v for k, v in summary.items() if k != "config"})),
        arguments=("out",), required=("out",),
        help="Train the toy world's models from scratch (the seeded script behind manifests/toy-models): an "
             "SD1.5-format pipeline, a pickscore CLIP, an open_clip clip model and an SD3-format flow-matching "
             "pipeline. About 16 minutes on 2 CPU cores; not resumable.")
command(dev_app, "sample-data", SampleDataConfig, lazy("lpo.reward.toy.world", "run"),
        lambda config, path: typer.echo(json.dumps({"written": str(path)})),
        arguments=("out",), required=("out",),
        help="Write synthetic toy-world preference pairs (shapes and colours, with a known oracle) in Pick-a-Pic's "
             "schema.")


def main() -> None:
    """The console script `lpo` and `python -m lpo`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
