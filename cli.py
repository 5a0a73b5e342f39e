"""The `lpo` command line: parse options, build a config, call a library function, print a summary."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional  # noqa: UP035 - Typer reads Optional/List at runtime

import typer
from rich.console import Console
from rich.table import Table

from curate.config import help_of
from curate.errors import InputError
from curate.filter import FilterConfig
from curate.ingest import IngestConfig
from curate.score import ScoreConfig
from reward.configs import (
    DemoConfig,
    EvalCompareConfig,
    EvalConfig,
    EvalScoreConfig,
    LPOConfig,
    RewardEvalConfig,
    RewardTrainConfig,
    SampleConfig,
    ToyModelsConfig,
)
from reward.serve import ServeConfig

app = typer.Typer(help="Curate preference pairs, train latent reward models and run latent preference optimisation.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
curate_app = typer.Typer(help="Pick-a-Pic ingest, image scoring and MPCF filtering into parquet manifests.",
                         no_args_is_help=True)
dev_app = typer.Typer(help="Developer tools: tiny offline models, the toy world's trained models, sample data.",
                      no_args_is_help=True)
reward_app = typer.Typer(help="Latent reward model (LRM): train, evaluate per timestep, score images, serve rewards.",
                         no_args_is_help=True)
optimize_app = typer.Typer(help="Latent Preference Optimization: step-level preference fine-tuning with an LRM.",
                           no_args_is_help=True)
app.add_typer(curate_app, name="curate")
app.add_typer(reward_app, name="reward")
app.add_typer(optimize_app, name="optimize")
app.add_typer(dev_app, name="dev")
eval_app = typer.Typer(help="Generate with per-image seeds and score every image (lpo eval --base ... --prompts ... "
                            "--out DIR), score existing images (lpo eval score), compare two runs (lpo eval compare).",
                       invoke_without_command=True)
app.add_typer(eval_app, name="eval")

console = Console(stderr=True)
out_console = Console()


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False) -> None:
    # Our packages log progress at INFO; third-party libraries only speak up with warnings (or with --verbose).
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for ours in ("curate", "reward", "cli"):
        logging.getLogger(ours).setLevel(logging.DEBUG if verbose else logging.INFO)


def handles_input_errors(func: Callable) -> Callable:
    """Bad input -> a one-line message naming the problem and the fix, and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except InputError as err:
            console.print(f"[bold red]error:[/] {err}")
            raise typer.Exit(code=2) from None

    return wrapper


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _model_overrides(**by_metric: str | None) -> dict[str, str]:
    return {metric: spec for metric, spec in by_metric.items() if spec}


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="YAML/JSON file with config fields.")]  # noqa: UP045
PickscoreOpt = Annotated[Optional[str], typer.Option(help="PickScore model: hub id or local directory.")]  # noqa: UP045
ClipOpt = Annotated[Optional[str], typer.Option(help="CLIP model: hf-hub:ID, ARCH:TAG or local open_clip directory.")]  # noqa: UP045
VqaOpt = Annotated[Optional[str], typer.Option(help="VQA model: vision-language hub id or directory, or t2v:MODEL.")]  # noqa: UP045
AestheticOpt = Annotated[Optional[str], typer.Option(help="Aesthetic predictor: hub id or local directory.")]  # noqa: UP045


# ---------------------------------------------------------------------------------------------------------------
# lpo curate


@curate_app.command("ingest")
@handles_input_errors
def curate_ingest(
    source: Annotated[str, typer.Argument(help=help_of(IngestConfig, "source"))],
    out: Annotated[Path, typer.Option(help=help_of(IngestConfig, "out"))],
    split: Annotated[Optional[str], typer.Option(help=help_of(IngestConfig, "split"))] = None,  # noqa: UP045
    limit: Annotated[Optional[int], typer.Option(help=help_of(IngestConfig, "limit"))] = None,  # noqa: UP045
    chunk_rows: Annotated[Optional[int], typer.Option(help=help_of(IngestConfig, "chunk_rows"))] = None,  # noqa: UP045
    config: ConfigOpt = None,
) -> None:
    """Read Pick-a-Pic pairs into DIR/pairs.parquet and DIR/images/ (each unique image once). Resumable."""
    from curate import config as cfg
    from curate import ingest

    conf = cfg.build(IngestConfig, config, source=source, out=out, split=split, limit=limit, chunk_rows=chunk_rows)
    summary = ingest.run(conf)
    cfg.save(conf, Path(conf.out) / "ingest" / "config.json")
    table = Table(title=f"ingest -> {conf.out}")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("source rows read", str(summary.rows_read))
    table.add_row("pairs", str(summary.pairs))
    table.add_row("unique images", str(summary.unique_images))
    for reason, count in sorted(summary.skipped.items()):
        table.add_row(f"skipped: {reason}", str(count))
    out_console.print(table)


@curate_app.command("score")
@handles_input_errors
def curate_score(
    work_dir: Annotated[Path, typer.Argument(help=help_of(ScoreConfig, "work_dir"))],
    metrics: Annotated[Optional[str], typer.Option(help=help_of(ScoreConfig, "metrics"))] = None,  # noqa: UP045
    pickscore_model: PickscoreOpt = None,
    clip_model: ClipOpt = None,
    vqa_model: VqaOpt = None,
    aesthetic_model: AestheticOpt = None,
    models_dir: Annotated[Optional[Path], typer.Option(help=help_of(ScoreConfig, "models_dir"))] = None,  # noqa: UP045
    batch_size: Annotated[Optional[int], typer.Option(help=help_of(ScoreConfig, "batch_size"))] = None,  # noqa: UP045
    device: Annotated[Optional[str], typer.Option(help=help_of(ScoreConfig, "device"))] = None,  # noqa: UP045
    dtype: Annotated[Optional[str], typer.Option(help=help_of(ScoreConfig, "dtype"))] = None,  # noqa: UP045
    decode_workers: Annotated[Optional[int], typer.Option(help=help_of(ScoreConfig, "decode_workers"))] = None,  # noqa: UP045
    flush_every: Annotated[Optional[int], typer.Option(help=help_of(ScoreConfig, "flush_every"))] = None,  # noqa: UP045
    config: ConfigOpt = None,
) -> None:
    """Score each unique image once per metric into DIR/scores.parquet. Resumable; shard with `accelerate launch`."""
    from curate import config as cfg
    from curate import score

    models = _model_overrides(pickscore=pickscore_model, clip=clip_model, vqa=vqa_model, aesthetic=aesthetic_model)
    conf = cfg.build(ScoreConfig, config, work_dir=work_dir, metrics=_split(metrics), models=models or None,
                     models_dir=models_dir, batch_size=batch_size, device=device, dtype=dtype,
                     decode_workers=decode_workers, flush_every=flush_every)
    report = score.run(conf)
    if "scored_total" in report:
        cfg.save(conf, Path(conf.work_dir) / "scores" / "config.json")
        table = Table(title=f"scores -> {Path(conf.work_dir) / 'scores.parquet'}")
        for column in ("metric", "model", "scored now (rank 0)", "scored in total"):
            table.add_column(column)
        for metric, info in report["metrics"].items():
            table.add_row(metric, info["model"], str(info["scored_now"]), str(report["scored_total"][metric]))
        out_console.print(table)
        out_console.print(f"{report['images']} unique images; {report['scored_total']['errors']} with errors; "
                          f"{report['processes']} process(es)")


@curate_app.command("filter")
@handles_input_errors
def curate_filter(
    source: Annotated[str, typer.Argument(help=help_of(FilterConfig, "source"))],
    out: Annotated[Path, typer.Option(help=help_of(FilterConfig, "out"))],
    rule: Annotated[Optional[str], typer.Option(help=help_of(FilterConfig, "rule"))] = None,  # noqa: UP045
    metrics: Annotated[Optional[str], typer.Option(help=help_of(FilterConfig, "metrics"))] = None,  # noqa: UP045
    min_gap: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        help="metric=value: keep a labelled pair only if its gap on metric is > value. Repeatable.")] = None,
    keep_ties: Annotated[Optional[bool], typer.Option(  # noqa: UP045
        "--keep-ties/--drop-ties", help=help_of(FilterConfig, "keep_ties"))] = None,
    tie_max_gap: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        help="metric=value: keep a tie only if its |gap| on metric is < value. Repeatable.")] = None,
    plot: Annotated[bool, typer.Option(help=help_of(FilterConfig, "plot"))] = False,
    split: Annotated[Optional[str], typer.Option(help=help_of(FilterConfig, "split"))] = None,  # noqa: UP045
    limit: Annotated[Optional[int], typer.Option(help=help_of(FilterConfig, "limit"))] = None,  # noqa: UP045
    pickscore_model: PickscoreOpt = None,
    clip_model: ClipOpt = None,
    vqa_model: VqaOpt = None,
    aesthetic_model: AestheticOpt = None,
    models_dir: Annotated[Optional[Path], typer.Option(help=help_of(FilterConfig, "models_dir"))] = None,  # noqa: UP045
    batch_size: Annotated[Optional[int], typer.Option(help=help_of(FilterConfig, "batch_size"))] = None,  # noqa: UP045
    device: Annotated[Optional[str], typer.Option(help=help_of(FilterConfig, "device"))] = None,  # noqa: UP045
    dtype: Annotated[Optional[str], typer.Option(help=help_of(FilterConfig, "dtype"))] = None,  # noqa: UP045
    config: ConfigOpt = None,
) -> None:
    """Ingest and score what is missing, then keep the pairs every selected metric agrees with (MPCF)."""
    from curate import config as cfg
    from curate import filter as curate_filter_lib
    from curate.mpcf import parse_thresholds

    models = _model_overrides(pickscore=pickscore_model, clip=clip_model, vqa=vqa_model, aesthetic=aesthetic_model)
    conf = cfg.build(
        FilterConfig, config, source=source, out=out, rule=rule, metrics=_split(metrics),
        min_gap=parse_thresholds(min_gap, "--min-gap") or None, keep_ties=keep_ties,
        tie_max_gap=parse_thresholds(tie_max_gap, "--tie-max-gap") or None, plot=plot or None, split=split,
        limit=limit, models=models or None, models_dir=models_dir, batch_size=batch_size, device=device, dtype=dtype,
    )
    summary = curate_filter_lib.run(conf)
    print_filter_summary(summary, Path(conf.out))


def print_filter_summary(summary: dict[str, Any], out: Path) -> None:
    table = Table(title=f"MPCF rule '{summary['rule']}' -> {out}")
    table.add_column("what")
    table.add_column("pairs", justify="right")
    table.add_column("share", justify="right")
    total = max(summary["pairs"], 1)
    table.add_row("all pairs", str(summary["pairs"]), "100.0%")
    table.add_row("[green]kept[/]", str(summary["kept"]), f"{100 * summary['kept'] / total:.1f}%")
    if summary["keep_ties"]:
        table.add_row("  of which ties", str(summary["kept_ties"]), f"{100 * summary['kept_ties'] / total:.1f}%")
    for reason, count in summary["rejected_by_reason"].items():
        table.add_row(f"[red]rejected[/]: {reason}", str(count), f"{100 * count / total:.1f}%")
    out_console.print(table)
    agree = Table(title="Human label agreement per metric (labelled, non-tie pairs)")
    for column in ("metric", "pairs", "metric prefers the human winner"):
        agree.add_column(column)
    for metric, info in summary["agreement"].items():
        rate = "n/a" if info["rate"] is None else f"{100 * info['rate']:.1f}%"
        agree.add_row(metric, str(info["pairs"]), rate)
    out_console.print(agree)
    out_console.print(f"{summary['rule_description']}. Images with errors: {summary['images_with_errors']}.")


# ---------------------------------------------------------------------------------------------------------------
# lpo reward


def _ints(value: str | None) -> list[int] | None:
    try:
        return [int(v) for v in _split(value)] if value else None
    except ValueError:
        raise InputError(f"'{value}' is not a comma-separated list of integers, e.g. 1,251,501.") from None


@reward_app.command("train")
@handles_input_errors
def reward_train(
    manifest: Annotated[Path, typer.Option(help=help_of(RewardTrainConfig, "manifest"))],
    base: Annotated[str, typer.Option(help=help_of(RewardTrainConfig, "base"))],
    out: Annotated[Path, typer.Option(help=help_of(RewardTrainConfig, "out"))],
    val_manifest: Annotated[Optional[Path], typer.Option(help=help_of(RewardTrainConfig, "val_manifest"))] = None,  # noqa: UP045
    val_fraction: Annotated[Optional[float], typer.Option(help=help_of(RewardTrainConfig, "val_fraction"))] = None,  # noqa: UP045
    vae: Annotated[Optional[str], typer.Option(help=help_of(RewardTrainConfig, "vae"))] = None,  # noqa: UP045
    timesteps: Annotated[Optional[str], typer.Option(help=help_of(RewardTrainConfig, "timesteps"))] = None,  # noqa: UP045
    batch_size: Annotated[Optional[int], typer.Option(help=help_of(RewardTrainConfig, "batch_size"))] = None,  # noqa: UP045
    grad_accum: Annotated[Optional[int], typer.Option(help=help_of(RewardTrainConfig, "grad_accum"))] = None,  # noqa: UP045
    max_steps: Annotated[Optional[int], typer.Option(help=help_of(RewardTrainConfig, "max_steps"))] = None,  # noqa: UP045
    lr: Annotated[Optional[float], typer.Option(help=help_of(RewardTrainConfig, "lr"))] = None,  # noqa: UP045
    weight_decay: Annotated[Optional[float], typer.Option(help=help_of(RewardTrainConfig, "weight_decay"))] = None,  # noqa: UP045
    warmup_steps: Annotated[Optional[int], typer.Option(help=help_of(RewardTrainConfig, "warmup_steps"))] = None,  # noqa: UP045
    max_grad_norm: Annotated[Optional[float], typer.Option(help=help_of(RewardTrainConfig, "max_grad_norm"))] = None,  # noqa: UP045
    mixed_precision: Annotated[Optional[str], typer.Option(help=help_of(RewardTrainConfig, "mixed_precision"))] = None,  # noqa: UP045
    gradient_checkpointing: Annotated[Optional[bool], typer.Option(  # noqa: UP045
        help=help_of(RewardTrainConfig, "gradient_checkpointing"))] = None,
    multi_scale: Annotated[Optional[bool], typer.Option(help=help_of(RewardTrainConfig, "multi_scale"))] = None,  # noqa: UP045
    vfe_scale: Annotated[Optional[float], typer.Option(help=help_of(RewardTrainConfig, "vfe_scale"))] = None,  # noqa: UP045
    vfe_down: Annotated[Optional[bool], typer.Option(help=help_of(RewardTrainConfig, "vfe_down"))] = None,  # noqa: UP045
    text_projection_init: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help=help_of(RewardTrainConfig, "text_projection_init"))] = None,
    init: Annotated[Optional[str], typer.Option(help=help_of(RewardTrainConfig, "init"))] = None,  # noqa: UP045
    eval_every: Annotated[Optional[int], typer.Option(help=help_of(RewardTrainConfig, "eval_every"))] = None,  # noqa: UP045
    save_every: Annotated[Optional[int], typer.Option(help=help_of(RewardTrainConfig, "save_every"))] = None,  # noqa: UP045
    seed: Annotated[Optional[int], typer.Option(help=help_of(RewardTrainConfig, "seed"))] = None,  # noqa: UP045
    resume: Annotated[bool, typer.Option(help=help_of(RewardTrainConfig, "resume"))] = False,
    log_with: Annotated[Optional[str], typer.Option(help=help_of(RewardTrainConfig, "log_with"))] = None,  # noqa: UP045
    device: Annotated[Optional[str], typer.Option(help=help_of(RewardTrainConfig, "device"))] = None,  # noqa: UP045
    config: ConfigOpt = None,
) -> None:
    """Train a latent reward model on kept pairs (soft-label Bradley-Terry on noisy latents). Resumable."""
    from curate import config as cfg
    from reward import train

    conf = cfg.build(
        RewardTrainConfig, config, manifest=manifest, base=base, out=out, val_manifest=val_manifest,
        val_fraction=val_fraction, vae=vae, timesteps=_ints(timesteps), batch_size=batch_size, grad_accum=grad_accum,
        max_steps=max_steps, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
        mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing, multi_scale=multi_scale,
        vfe_scale=vfe_scale, vfe_down=vfe_down, text_projection_init=text_projection_init, init=init,
        eval_every=eval_every,
        save_every=save_every, seed=seed, resume=resume or None, log_with=_split(log_with), device=device,
    )
    try:
        summary = train.run(conf)
    except train.TrainingDiverged as err:
        console.print(f"[bold red]training stopped:[/] {err}")
        raise typer.Exit(code=1) from None
    table = Table(title=f"LRM training -> {conf.out}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key in ("steps", "effective_batch_size", "train_pairs", "validation_pairs", "best_step", "best_accuracy"):
        value = summary[key]
        table.add_row(key.replace("_", " "), f"{value:.3f}" if isinstance(value, float) else str(value))
    if summary["history"]:
        for t, acc in summary["history"][-1]["accuracy"].items():
            table.add_row(f"last validation accuracy, t={t}", f"{acc:.3f}")
    out_console.print(table)
    out_console.print(f"best model: {summary['best']}   last model: {summary['last']}")


@reward_app.command("eval")
@handles_input_errors
def reward_eval(
    lrm: Annotated[Path, typer.Option(help=help_of(RewardEvalConfig, "lrm"))],
    manifest: Annotated[Path, typer.Option(help=help_of(RewardEvalConfig, "manifest"))],
    out: Annotated[Optional[Path], typer.Option(help=help_of(RewardEvalConfig, "out"))] = None,  # noqa: UP045
    timesteps: Annotated[Optional[str], typer.Option(help=help_of(RewardEvalConfig, "timesteps"))] = None,  # noqa: UP045
    seed: Annotated[Optional[int], typer.Option(help=help_of(RewardEvalConfig, "seed"))] = None,  # noqa: UP045
    batch_size: Annotated[Optional[int], typer.Option(help=help_of(RewardEvalConfig, "batch_size"))] = None,  # noqa: UP045
    device: Annotated[Optional[str], typer.Option(help=help_of(RewardEvalConfig, "device"))] = None,  # noqa: UP045
    config: ConfigOpt = None,
) -> None:
    """Pairwise accuracy of an LRM per timestep (fixed noise seeds; ties count 0.5): JSON and a PNG plot."""
    from curate import config as cfg
    from reward import lrm_eval

    conf = cfg.build(RewardEvalConfig, config, lrm=lrm, manifest=manifest, out=out, timesteps=_ints(timesteps),
                     seed=seed, batch_size=batch_size, device=device)
    result = lrm_eval.run_eval(conf)
    table = Table(title=f"LRM accuracy on {result['pairs']} pairs -> {result['out']}")
    table.add_column("timestep", justify="right")
    table.add_column("pairwise accuracy", justify="right")
    for t, acc in result["accuracy"].items():
        table.add_row(t, f"{acc:.3f}")
    out_console.print(table)


@reward_app.command("score")
@handles_input_errors
def reward_score(
    lrm: Annotated[Path, typer.Option(help="Latent reward model directory.")],
    images: Annotated[list[Path], typer.Option("--images", help="Image files to score. Repeatable.")],
    prompt: Annotated[list[str], typer.Option(help="One prompt for all images, or one per image. Repeatable.")],
    t: Annotated[int, typer.Option(help="Timestep to noise the encoded images to before scoring.")] = 1,
    seed: Annotated[int, typer.Option(help="Noise seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Score image files against prompts with an LRM (encode, noise to t, score)."""
    from PIL import Image

    from reward.lrm import LatentRewardModel, read_lrm_config, resolve_device

    read_lrm_config(lrm)
    if len(prompt) not in (1, len(images)):
        raise InputError(f"{len(images)} images but {len(prompt)} prompts: give one prompt, or one per image.")
    if not 0 <= t < 1000:
        raise InputError(f"--t {t} is outside [0, 999].")
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise InputError(f"image file(s) not found: {missing}.")
    opened = []
    for path in images:
        try:
            opened.append(Image.open(path).convert("RGB"))
        except OSError as err:
            raise InputError(f"{path} is not a readable image ({err}).") from None
    prompts = prompt * len(images) if len(prompt) == 1 else prompt
    model = LatentRewardModel.from_pretrained(lrm).to(resolve_device(device))
    scores = model.score_images(opened, prompts, t=t, seed=seed)
    for path, text, value in zip(images, prompts, scores.tolist()):
        typer.echo(json.dumps({"image": str(path), "prompt": text, "t": t, "score": round(value, 6)}))


@reward_app.command("serve")
@handles_input_errors
def reward_serve(
    lrm: Annotated[Optional[Path], typer.Option(help=help_of(ServeConfig, "lrm"))] = None,  # noqa: UP045
    metrics: Annotated[Optional[str], typer.Option(help=help_of(ServeConfig, "metrics"))] = None,  # noqa: UP045
    pickscore_model: PickscoreOpt = None,
    clip_model: ClipOpt = None,
    vqa_model: VqaOpt = None,
    aesthetic_model: AestheticOpt = None,
    models_dir: Annotated[Optional[Path], typer.Option(help=help_of(ServeConfig, "models_dir"))] = None,  # noqa: UP045
    host: Annotated[Optional[str], typer.Option(help=help_of(ServeConfig, "host"))] = None,  # noqa: UP045
    port: Annotated[Optional[int], typer.Option(help=help_of(ServeConfig, "port"))] = None,  # noqa: UP045
    token: Annotated[Optional[str], typer.Option(help=help_of(ServeConfig, "token"))] = None,  # noqa: UP045
    max_batch_size: Annotated[Optional[int], typer.Option(help=help_of(ServeConfig, "max_batch_size"))] = None,  # noqa: UP045
    batch_timeout_ms: Annotated[Optional[float], typer.Option(  # noqa: UP045
        help=help_of(ServeConfig, "batch_timeout_ms"))] = None,
    workers_per_device: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help=help_of(ServeConfig, "workers_per_device"))] = None,
    device: Annotated[Optional[str], typer.Option(help=help_of(ServeConfig, "device"))] = None,  # noqa: UP045
    dtype: Annotated[Optional[str], typer.Option(help=help_of(ServeConfig, "dtype"))] = None,  # noqa: UP045
    max_items_per_request: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help=help_of(ServeConfig, "max_items_per_request"))] = None,
    max_request_mb: Annotated[Optional[float], typer.Option(help=help_of(ServeConfig, "max_request_mb"))] = None,  # noqa: UP045
    request_timeout_s: Annotated[Optional[float], typer.Option(  # noqa: UP045
        help=help_of(ServeConfig, "request_timeout_s"))] = None,
    config: ConfigOpt = None,
) -> None:
    """Serve the LRM and the curation scorers over HTTP (LitServe: dynamic batching, one worker per device)."""
    from curate import config as cfg
    from reward import serve

    models = _model_overrides(pickscore=pickscore_model, clip=clip_model, vqa=vqa_model, aesthetic=aesthetic_model)
    conf = cfg.build(ServeConfig, config, lrm=lrm, metrics=_split(metrics), models=models or None,
                     models_dir=models_dir, host=host, port=port, token=token, max_batch_size=max_batch_size,
                     batch_timeout_ms=batch_timeout_ms, workers_per_device=workers_per_device, device=device,
                     dtype=dtype, max_items_per_request=max_items_per_request, max_request_mb=max_request_mb,
                     request_timeout_s=request_timeout_s)
    try:
        serve.run(conf)
    except serve.ServeFailed as err:
        console.print(f"[bold red]reward service failed:[/] {err}")
        raise typer.Exit(code=1) from None
    console.print("reward service stopped")


# ---------------------------------------------------------------------------------------------------------------
# lpo optimize, lpo sample


def _floats(value: str | None) -> list[float] | None:
    try:
        return [float(v) for v in _split(value)] if value else None
    except ValueError:
        raise InputError(f"'{value}' is not a comma-separated list of numbers, e.g. 0.35,0.5.") from None


def _optimize_command(family: str) -> Callable:
    def command(
        base: Annotated[str, typer.Option(help=help_of(LPOConfig, "base"))],
        prompts: Annotated[Path, typer.Option(help=help_of(LPOConfig, "prompts"))],
        out: Annotated[Path, typer.Option(help=help_of(LPOConfig, "out"))],
        lrm: Annotated[Optional[Path], typer.Option(help=help_of(LPOConfig, "lrm"))] = None,  # noqa: UP045
        reward_url: Annotated[Optional[str], typer.Option(help=help_of(LPOConfig, "reward_url"))] = None,  # noqa: UP045
        epochs: Annotated[Optional[int], typer.Option(help=help_of(LPOConfig, "epochs"))] = None,  # noqa: UP045
        sample_batch_size: Annotated[Optional[int], typer.Option(  # noqa: UP045
            help=help_of(LPOConfig, "sample_batch_size"))] = None,
        train_batch_size: Annotated[Optional[int], typer.Option(  # noqa: UP045
            help=help_of(LPOConfig, "train_batch_size"))] = None,
        candidates: Annotated[Optional[int], typer.Option(help=help_of(LPOConfig, "candidates"))] = None,  # noqa: UP045
        steps: Annotated[Optional[int], typer.Option(help=help_of(LPOConfig, "steps"))] = None,  # noqa: UP045
        guidance: Annotated[Optional[float], typer.Option(help=help_of(LPOConfig, "guidance"))] = None,  # noqa: UP045
        eta: Annotated[Optional[float], typer.Option(help=help_of(LPOConfig, "eta"))] = None,  # noqa: UP045
        beta: Annotated[Optional[float], typer.Option(help=help_of(LPOConfig, "beta"))] = None,  # noqa: UP045
        clip_eps: Annotated[Optional[float], typer.Option(help=help_of(LPOConfig, "clip_eps"))] = None,  # noqa: UP045
        threshold: Annotated[Optional[str], typer.Option(help=help_of(LPOConfig, "threshold"))] = None,  # noqa: UP045
        score_timestep: Annotated[Optional[str], typer.Option(  # noqa: UP045
            help=help_of(LPOConfig, "score_timestep"))] = None,
        logprob_reduction: Annotated[Optional[str], typer.Option(  # noqa: UP045
            help=help_of(LPOConfig, "logprob_reduction"))] = None,
        lora_rank: Annotated[Optional[int], typer.Option(help=help_of(LPOConfig, "lora_rank"))] = None,  # noqa: UP045
        lr: Annotated[Optional[float], typer.Option(help=help_of(LPOConfig, "lr"))] = None,  # noqa: UP045
        weight_decay: Annotated[Optional[float], typer.Option(help=help_of(LPOConfig, "weight_decay"))] = None,  # noqa: UP045
        max_grad_norm: Annotated[Optional[float], typer.Option(help=help_of(LPOConfig, "max_grad_norm"))] = None,  # noqa: UP045
        mixed_precision: Annotated[Optional[str], typer.Option(  # noqa: UP045
            help=help_of(LPOConfig, "mixed_precision"))] = None,
        gradient_checkpointing: Annotated[Optional[bool], typer.Option(  # noqa: UP045
            help=help_of(LPOConfig, "gradient_checkpointing"))] = None,
        save_every_rounds: Annotated[Optional[int], typer.Option(  # noqa: UP045
            help=help_of(LPOConfig, "save_every_rounds"))] = None,
        validation_prompt: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
            help=help_of(LPOConfig, "validation_prompts"))] = None,
        merge: Annotated[bool, typer.Option(help=help_of(LPOConfig, "merge"))] = False,
        seed: Annotated[Optional[int], typer.Option(help=help_of(LPOConfig, "seed"))] = None,  # noqa: UP045
        resume: Annotated[bool, typer.Option(help=help_of(LPOConfig, "resume"))] = False,
        log_with: Annotated[Optional[str], typer.Option(help=help_of(LPOConfig, "log_with"))] = None,  # noqa: UP045
        device: Annotated[Optional[str], typer.Option(help=help_of(LPOConfig, "device"))] = None,  # noqa: UP045
        config: ConfigOpt = None,
    ) -> None:
        from curate import config as cfg
        from reward import lpo_train

        conf = cfg.build(
            LPOConfig, config, family=family, base=base, lrm=lrm, reward_url=reward_url, prompts=prompts, out=out,
            epochs=epochs,
            sample_batch_size=sample_batch_size, train_batch_size=train_batch_size, candidates=candidates,
            steps=steps, guidance=guidance, eta=eta, beta=beta, clip_eps=clip_eps, threshold=_floats(threshold),
            score_timestep=score_timestep, logprob_reduction=logprob_reduction, lora_rank=lora_rank, lr=lr,
            weight_decay=weight_decay, max_grad_norm=max_grad_norm, mixed_precision=mixed_precision,
            gradient_checkpointing=gradient_checkpointing, save_every_rounds=save_every_rounds,
            validation_prompts=validation_prompt, merge=merge or None, seed=seed, resume=resume or None,
            log_with=_split(log_with), device=device,
        )
        summary = lpo_train.run(conf)
        table = Table(title=f"LPO ({family}) -> {conf.out}")
        table.add_column("round", justify="right")
        for column in ("valid pairs", "trained", "implicit acc", "loss", "final LRM score"):
            table.add_column(column, justify="right")
        for record in summary["history"][-10:]:
            table.add_row(str(record["round"]), str(record["valid_pairs"]), str(record["tuples_trained"]),
                          f"{record.get('implicit_accuracy', float('nan')):.2f}",
                          f"{record.get('loss', float('nan')):.4f}", f"{record['final_lrm_score']:.3f}")
        out_console.print(table)
        for name in ("lora", "merged_unet", "unet"):
            if name in summary:
                out_console.print(f"{name}: {summary[name]}")

    command.__doc__ = (f"Fine-tune an {'SD1.x/2.x' if family == 'sd15' else 'SDXL'} model with LPO: at every DDIM "
                       "step sample K children, let the LRM pick winner and loser, train a DPO-style loss on the "
                       "step's log-probability. Resumable.")
    return handles_input_errors(command)


optimize_app.command("sd15")(_optimize_command("sd15"))
optimize_app.command("sdxl")(_optimize_command("sdxl"))


@app.command("sample")
@handles_input_errors
def sample_command(
    base: Annotated[str, typer.Option(help=help_of(SampleConfig, "base"))],
    prompt: Annotated[list[str], typer.Option(help="Prompt to generate. Repeatable.")],
    out: Annotated[Path, typer.Option(help=help_of(SampleConfig, "out"))],
    lora: Annotated[Optional[Path], typer.Option(help=help_of(SampleConfig, "lora"))] = None,  # noqa: UP045
    lrm: Annotated[Optional[Path], typer.Option(help=help_of(SampleConfig, "lrm"))] = None,  # noqa: UP045
    candidates: Annotated[Optional[int], typer.Option(help=help_of(SampleConfig, "candidates"))] = None,  # noqa: UP045
    images_per_prompt: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help=help_of(SampleConfig, "images_per_prompt"))] = None,
    steps: Annotated[Optional[int], typer.Option(help=help_of(SampleConfig, "steps"))] = None,  # noqa: UP045
    guidance: Annotated[Optional[float], typer.Option(help=help_of(SampleConfig, "guidance"))] = None,  # noqa: UP045
    eta: Annotated[Optional[float], typer.Option(help=help_of(SampleConfig, "eta"))] = None,  # noqa: UP045
    seed: Annotated[Optional[int], typer.Option(help=help_of(SampleConfig, "seed"))] = None,  # noqa: UP045
    device: Annotated[Optional[str], typer.Option(help=help_of(SampleConfig, "device"))] = None,  # noqa: UP045
    config: ConfigOpt = None,
) -> None:
    """Generate images (DDIM); with --lrm and --candidates K, LRM-guided: continue from the best of K at each step."""
    from curate import config as cfg
    from reward import generate

    conf = cfg.build(SampleConfig, config, base=base, prompts=prompt, out=out, lora=lora, lrm=lrm,
                     candidates=candidates, images_per_prompt=images_per_prompt, steps=steps, guidance=guidance,
                     eta=eta, seed=seed, device=device)
    summary = generate.run(conf)
    out_console.print(f"{len(summary['images'])} images -> {conf.out} (samples.json lists prompt, seed and path)")
    if "lrm_score_gain" in summary:
        mean = summary["mean_lrm_score"]
        out_console.print(f"mean LRM score: guided (K={conf.candidates}) {mean['guided']:.4f}, plain "
                          f"{mean['plain']:.4f}, gain {summary['lrm_score_gain']:+.4f} (same seeds)")


# ---------------------------------------------------------------------------------------------------------------
# lpo eval

Hpsv2Opt = Annotated[Optional[str], typer.Option(help="HPS v2 model: hub repo with HPS_v2_compressed.pt, a folder "  # noqa: UP045
                                                      "holding it, or the file.")]
Hpsv21Opt = Annotated[Optional[str], typer.Option(help="HPS v2.1 model: hub repo with HPS_v2.1_compressed.pt, a "  # noqa: UP045
                                                       "folder holding it, or the file.")]
ImageRewardOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045
    help="ImageReward model: hub id or a folder with ImageReward.pt and med_config.json.")]


def print_eval_summary(summary: dict[str, Any], out: Path) -> None:
    table = Table(title=f"{summary['images']} images over {summary['prompts']} prompts -> {out}")
    for column in ("metric", "mean", "95% CI", "std", "images", "model"):
        table.add_column(column, justify="left" if column in ("metric", "model") else "right")
    for metric, s in summary["metrics"].items():
        ci = "n/a" if s["ci95"] is None else f"[{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}]"
        mean = "n/a" if s["mean"] is None else f"{s['mean']:.4f}"
        std = "n/a" if s["std"] is None else f"{s['std']:.4f}"
        table.add_row(metric, mean, ci, std, str(s["n_images"]), s["model_id"])
    out_console.print(table)
    if summary["images_with_errors"]:
        out_console.print(f"[yellow]{summary['images_with_errors']} image(s) could not be scored (see the error "
                          "column of images.parquet)[/]")
    out_console.print(f"per image: {out / 'images.parquet'}; summary: {out / 'summary.json'}, {out / 'summary.md'}")


@eval_app.callback()
@handles_input_errors
def eval_run(
    ctx: typer.Context,
    base: Annotated[Optional[str], typer.Option(help=help_of(EvalConfig, "base"))] = None,  # noqa: UP045
    prompts: Annotated[Optional[Path], typer.Option(help=help_of(EvalConfig, "prompts"))] = None,  # noqa: UP045
    out: Annotated[Optional[Path], typer.Option(help=help_of(EvalConfig, "out"))] = None,  # noqa: UP045
    lora: Annotated[Optional[Path], typer.Option(help=help_of(EvalConfig, "lora"))] = None,  # noqa: UP045
    lrm: Annotated[Optional[Path], typer.Option(help=help_of(EvalConfig, "lrm"))] = None,  # noqa: UP045
    candidates: Annotated[Optional[int], typer.Option(help=help_of(EvalConfig, "candidates"))] = None,  # noqa: UP045
    metrics: Annotated[Optional[str], typer.Option(help=help_of(EvalConfig, "metrics"))] = None,  # noqa: UP045
    images_per_prompt: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help=help_of(EvalConfig, "images_per_prompt"))] = None,
    max_prompts: Annotated[Optional[int], typer.Option(help=help_of(EvalConfig, "max_prompts"))] = None,  # noqa: UP045
    steps: Annotated[Optional[int], typer.Option(help=help_of(EvalConfig, "steps"))] = None,  # noqa: UP045
    guidance: Annotated[Optional[float], typer.Option(  # noqa: UP045
        "--cfg", "--guidance", help=help_of(EvalConfig, "guidance"))] = None,
    eta: Annotated[Optional[float], typer.Option(help=help_of(EvalConfig, "eta"))] = None,  # noqa: UP045
    seed: Annotated[Optional[int], typer.Option(help=help_of(EvalConfig, "seed"))] = None,  # noqa: UP045
    batch_size: Annotated[Optional[int], typer.Option(help=help_of(EvalConfig, "batch_size"))] = None,  # noqa: UP045
    score_batch_size: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help=help_of(EvalConfig, "score_batch_size"))] = None,
    grid_prompts: Annotated[Optional[int], typer.Option(help=help_of(EvalConfig, "grid_prompts"))] = None,  # noqa: UP045
    pickscore_model: PickscoreOpt = None,
    hpsv2_model: Hpsv2Opt = None,
    hpsv21_model: Hpsv21Opt = None,
    imagereward_model: ImageRewardOpt = None,
    aesthetic_model: AestheticOpt = None,
    clip_model: ClipOpt = None,
    vqa_model: VqaOpt = None,
    models_dir: Annotated[Optional[Path], typer.Option(help=help_of(EvalConfig, "models_dir"))] = None,  # noqa: UP045
    reward_url: Annotated[Optional[str], typer.Option(help=help_of(EvalConfig, "reward_url"))] = None,  # noqa: UP045
    device: Annotated[Optional[str], typer.Option(help=help_of(EvalConfig, "device"))] = None,  # noqa: UP045
    dtype: Annotated[Optional[str], typer.Option(help=help_of(EvalConfig, "dtype"))] = None,  # noqa: UP045
    score_dtype: Annotated[Optional[str], typer.Option(help=help_of(EvalConfig, "score_dtype"))] = None,  # noqa: UP045
    config: ConfigOpt = None,
) -> None:
    """Generate every (prompt, image) with its own seed, score every image, write images.parquet, summary.json,
    summary.md and grid.png. Resumable: finished images are not generated again."""
    from curate import config as cfg
    from reward import evaluate

    if ctx.invoked_subcommand is not None:
        return
    given = {k: v for k, v in ctx.params.items() if v is not None}
    if not given:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)
    models = _model_overrides(pickscore=pickscore_model, hpsv2=hpsv2_model, hpsv21=hpsv21_model,
                              imagereward=imagereward_model, aesthetic=aesthetic_model, clip=clip_model,
                              vqa=vqa_model)
    conf = cfg.build(EvalConfig, config, base=base, prompts=prompts, out=out, lora=lora, lrm=lrm,
                     candidates=candidates, metrics=_split(metrics), models=models or None, models_dir=models_dir,
                     images_per_prompt=images_per_prompt, max_prompts=max_prompts, steps=steps, guidance=guidance,
                     eta=eta, seed=seed, batch_size=batch_size, score_batch_size=score_batch_size,
                     grid_prompts=grid_prompts, reward_url=reward_url, device=device, dtype=dtype,
                     score_dtype=score_dtype)
    summary = evaluate.run(conf)
    print_eval_summary(summary, Path(conf.out))


@eval_app.command("score")
@handles_input_errors
def eval_score(
    images: Annotated[Path, typer.Option(help=help_of(EvalScoreConfig, "images"))],
    out: Annotated[Path, typer.Option(help=help_of(EvalScoreConfig, "out"))],
    prompts: Annotated[Optional[Path], typer.Option(help=help_of(EvalScoreConfig, "prompts"))] = None,  # noqa: UP045
    metrics: Annotated[Optional[str], typer.Option(help=help_of(EvalScoreConfig, "metrics"))] = None,  # noqa: UP045
    score_batch_size: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help=help_of(EvalScoreConfig, "score_batch_size"))] = None,
    grid_prompts: Annotated[Optional[int], typer.Option(help=help_of(EvalScoreConfig, "grid_prompts"))] = None,  # noqa: UP045
    pickscore_model: PickscoreOpt = None,
    hpsv2_model: Hpsv2Opt = None,
    hpsv21_model: Hpsv21Opt = None,
    imagereward_model: ImageRewardOpt = None,
    aesthetic_model: AestheticOpt = None,
    clip_model: ClipOpt = None,
    vqa_model: VqaOpt = None,
    models_dir: Annotated[Optional[Path], typer.Option(help=help_of(EvalScoreConfig, "models_dir"))] = None,  # noqa: UP045
    reward_url: Annotated[Optional[str], typer.Option(help=help_of(EvalScoreConfig, "reward_url"))] = None,  # noqa: UP045
    device: Annotated[Optional[str], typer.Option(help=help_of(EvalScoreConfig, "device"))] = None,  # noqa: UP045
    score_dtype: Annotated[Optional[str], typer.Option(help=help_of(EvalScoreConfig, "score_dtype"))] = None,  # noqa: UP045
    config: ConfigOpt = None,
) -> None:
    """Score images that already exist: a manifest pairs each file with its prompt, or files named
    <prompt index>_<image index>.png are matched to --prompts. Mismatches exit 2."""
    from curate import config as cfg
    from reward import evaluate

    models = _model_overrides(pickscore=pickscore_model, hpsv2=hpsv2_model, hpsv21=hpsv21_model,
                              imagereward=imagereward_model, aesthetic=aesthetic_model, clip=clip_model,
                              vqa=vqa_model)
    conf = cfg.build(EvalScoreConfig, config, images=images, out=out, prompts=prompts, metrics=_split(metrics),
                     models=models or None, models_dir=models_dir, score_batch_size=score_batch_size,
                     grid_prompts=grid_prompts, reward_url=reward_url, device=device, score_dtype=score_dtype)
    summary = evaluate.score_existing(conf)
    print_eval_summary(summary, Path(conf.out))


@eval_app.command("compare")
@handles_input_errors
def eval_compare(
    run_a: Annotated[Path, typer.Argument(help=help_of(EvalCompareConfig, "run_a"))],
    run_b: Annotated[Path, typer.Argument(help=help_of(EvalCompareConfig, "run_b"))],
    out: Annotated[Optional[Path], typer.Option(help=help_of(EvalCompareConfig, "out"))] = None,  # noqa: UP045
) -> None:
    """Per-metric means of two runs, the paired difference (by prompt and image index) with a 95% interval, and the
    per-prompt win rate; a rich table and markdown."""
    from reward import evaluate

    result = evaluate.compare(EvalCompareConfig(run_a=run_a, run_b=run_b, out=out))
    table = Table(title=f"{run_b.name} vs {run_a.name}: {result['pairs']} paired images, {result['prompts']} prompts")
    for column in ("metric", f"A: {run_a.name}", f"B: {run_b.name}", "delta (B - A)", "95% CI", "B wins (prompts)"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for metric, m in result["metrics"].items():
        ci = "n/a" if m["ci95"] is None else f"[{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}]"
        significant = m["ci95"] is not None and (m["ci95"][0] > 0 or m["ci95"][1] < 0)
        delta = f"{m['delta']:+.4f}" if m["delta"] is not None else "n/a"
        win = "n/a" if m["win_rate"] is None else f"{100 * m['win_rate']:.1f}%"
        table.add_row(metric, f"{m['mean_a']:.4f}", f"{m['mean_b']:.4f}",
                      f"[bold]{delta}[/]" if significant else delta, ci, win)
    out_console.print(table)
    out_console.print(result["statistics"] + ".")
    out_console.print(evaluate.compare_markdown(result), markup=False, highlight=False)
    if out is not None:
        out_console.print(f"written: {out} and {out.with_suffix('.json')}")


# ---------------------------------------------------------------------------------------------------------------
# lpo demo


@app.command("demo")
@handles_input_errors
def demo(
    out: Annotated[Optional[Path], typer.Option(help=help_of(DemoConfig, "out"))] = None,  # noqa: UP045
    models: Annotated[Optional[Path], typer.Option(help=help_of(DemoConfig, "models"))] = None,  # noqa: UP045
    train_prompts: Annotated[Optional[int], typer.Option(help=help_of(DemoConfig, "train_prompts"))] = None,  # noqa: UP045
    val_prompts: Annotated[Optional[int], typer.Option(help=help_of(DemoConfig, "val_prompts"))] = None,  # noqa: UP045
    flip_rate: Annotated[Optional[float], typer.Option(help=help_of(DemoConfig, "flip_rate"))] = None,  # noqa: UP045
    tie_rate: Annotated[Optional[float], typer.Option(help=help_of(DemoConfig, "tie_rate"))] = None,  # noqa: UP045
    lrm_steps: Annotated[Optional[int], typer.Option(help=help_of(DemoConfig, "lrm_steps"))] = None,  # noqa: UP045
    lpo_epochs: Annotated[Optional[int], typer.Option(help=help_of(DemoConfig, "lpo_epochs"))] = None,  # noqa: UP045
    held_out_prompts: Annotated[Optional[int], typer.Option(help=help_of(DemoConfig, "held_out_prompts"))] = None,  # noqa: UP045
    steps: Annotated[Optional[int], typer.Option(help=help_of(DemoConfig, "steps"))] = None,  # noqa: UP045
    guidance: Annotated[Optional[float], typer.Option(help=help_of(DemoConfig, "guidance"))] = None,  # noqa: UP045
    seed: Annotated[Optional[int], typer.Option(help=help_of(DemoConfig, "seed"))] = None,  # noqa: UP045
    config: ConfigOpt = None,
) -> None:
    """Show on the toy world, in minutes on a CPU, that MPCF, the latent reward model and LPO learn: curation, three
    LRMs, LPO fine-tuning, guided sampling and a before/after comparison, ending in one table and one figure.
    Rerun with the same options to continue an interrupted run."""
    from curate import config as cfg
    from reward import demo as demo_run

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo loads only local models
    conf = cfg.build(DemoConfig, config, out=out, models=models, train_prompts=train_prompts, val_prompts=val_prompts,
                     flip_rate=flip_rate, tie_rate=tie_rate, lrm_steps=lrm_steps, lpo_epochs=lpo_epochs,
                     held_out_prompts=held_out_prompts, steps=steps, guidance=guidance, seed=seed)
    summary = demo_run.run(conf)
    table = Table(title=f"lpo demo -> {conf.out}")
    table.add_column("claim")
    table.add_column("measured")
    table.add_column("holds", justify="center")
    for claim in summary["claims"]:
        table.add_row(claim["claim"], claim["measured"], "[green]yes[/]" if claim["holds"] else "[red]no[/]")
    out_console.print(table)
    out_console.print(f"written: {Path(conf.out) / 'demo.md'}, {Path(conf.out) / 'demo.png'}, "
                      f"{Path(conf.out) / demo_run.SUMMARY_FILE}")


# ---------------------------------------------------------------------------------------------------------------
# lpo dev


@dev_app.command("tiny-models")
@handles_input_errors
def dev_tiny_models(
    out: Annotated[Path, typer.Argument(help="Directory to write one tiny model folder per role into.")],
    roles: Annotated[Optional[str], typer.Option(help="Comma-separated roles (default: all).")] = None,  # noqa: UP045
    seed: Annotated[int, typer.Option(help="Seed for the random weights.")] = 0,
) -> None:
    """Write tiny random-weight models in the real on-disk formats (pickscore, clip, vqa, aesthetic, sd15, sdxl,
    hpsv2, hpsv21, imagereward)."""
    from curate.tiny_models import ROLES, build_tiny_models

    chosen = _split(roles) or list(ROLES)
    unknown = [r for r in chosen if r not in ROLES]
    if unknown:
        raise InputError(f"unknown role(s) {unknown}; choose from {list(ROLES)}.")
    written = build_tiny_models(out, chosen, seed=seed)
    for role, path in written.items():
        out_console.print(f"{role:10s} {path}")


@dev_app.command("toy-models")
@handles_input_errors
def dev_toy_models(
    out: Annotated[Path, typer.Argument(help=help_of(ToyModelsConfig, "out"))],
    seed: Annotated[Optional[int], typer.Option(help=help_of(ToyModelsConfig, "seed"))] = None,  # noqa: UP045
    vae_steps: Annotated[Optional[int], typer.Option(help=help_of(ToyModelsConfig, "vae_steps"))] = None,  # noqa: UP045
    diffusion_steps: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help=help_of(ToyModelsConfig, "diffusion_steps"))] = None,
    clip_steps: Annotated[Optional[int], typer.Option(help=help_of(ToyModelsConfig, "clip_steps"))] = None,  # noqa: UP045
    config: ConfigOpt = None,
) -> None:
    """Train the toy world's models from scratch (the seeded script behind manifests/toy-models): an SD1.5-format
    pipeline, a pickscore CLIP and an open_clip clip model. About 11 minutes on 2 CPU cores; not resumable."""
    from curate import config as cfg
    from reward import toy_models

    conf = cfg.build(ToyModelsConfig, config, out=out, seed=seed, vae_steps=vae_steps,
                     diffusion_steps=diffusion_steps, clip_steps=clip_steps)
    summary = toy_models.run(conf)
    out_console.print_json(json.dumps({k: summary[k] for k in ("seconds", "vae", "samples",
                                                                "scorer_agreement_with_oracle")}))


@dev_app.command("sample-data")
@handles_input_errors
def dev_sample_data(
    out: Annotated[Path, typer.Argument(help="Parquet file to write, in Pick-a-Pic's schema.")],
    prompts: Annotated[int, typer.Option(help="Number of prompts (each gives 4 images and 6 pairs).")] = 12,
    flip_rate: Annotated[float, typer.Option(help="Share of labels flipped against the oracle.")] = 0.3,
    corrupt_images: Annotated[int, typer.Option(help="Images given undecodable bytes.")] = 1,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write synthetic toy-world preference pairs (shapes and colours, with a known oracle) in Pick-a-Pic's schema."""
    from curate.synthetic import write_pickapic_parquet

    if prompts < 1 or not 0 <= flip_rate <= 1:
        raise InputError("--prompts must be at least 1 and --flip-rate in [0, 1].")
    path = write_pickapic_parquet(out, num_prompts=prompts, flip_rate=flip_rate, corrupt_images=corrupt_images,
                                  seed=seed)
    typer.echo(json.dumps({"written": str(path)}))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
