"""`lpo demo`: the whole pipeline on the toy world, where the truth is known, through the real library functions.

Stages (each writes its result to `OUT/stages/<name>.json`; a rerun with the same settings skips finished stages
and resumes an interrupted trainer from its checkpoint):

1. `data`: toy preference pairs in Pick-a-Pic's schema (a share of labels flipped against the oracle, some ties) and
   a clean held-out set.
2. `curate`: `lpo curate filter` (ingest, score with the toy `pickscore` and `clip` models, the all-metric MPCF
   rule), then the label agreement with the oracle of the raw and of the kept pairs.
3. `lrm-raw`, `lrm-mpcf`, `lrm-mpcf-fresh`: `lpo reward train` with the same budget on the raw pairs, on the kept
   pairs, and on the kept pairs from a freshly initialised backbone; pairwise accuracy per timestep on the held-out
   pairs (`lpo reward eval` of the final models).
4. `lpo`: `lpo optimize <family>` with the MPCF-trained LRM on the captions not held out; `grpo` (with
   `--grpo`): the same with `--objective grpo`, on as many sampled trajectories; `hacking` (with `--hacking`):
   a reward-hacking run (LPO on an LRM trained on raters with a planted bias) under the held-out monitor
   (`lpo.reward.toy.hacking`).
5. `samples`: the base model, LRM-guided sampling and the LPO- (and GRPO-) tuned models on the held-out captions
   with the same seeds and sampler settings; oracle alignment read from the pixels and the LRM reward of each image.
6. the report: `demo_summary.json`, `demo.md` (tables) and `demo.png` (accuracy against noise, sample grids).

`--family sd15` runs it on the toy UNet model (DDIM, timesteps t); `--family sd3` on the toy SD3 transformer (the
flow-matching coefficients-preserving step, timesteps sigma x 1000): its LRMs start from `sd3/`, LPO, GRPO and the
comparison use `sd3-early/`, the same training run stopped at 300 of its 800 updates, which leaves room to improve.
Everything else is the same code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from transformers.utils import logging as transformers_logging

from lpo.core import config as cfg
from lpo.core import rundir
from lpo.core.errors import InputError
from lpo.core.parts import run_stages
from lpo.core.plots import pyplot, save_figure
from lpo.core.shipped import resolve_shipped
from lpo.curate import filter as curate_filter
from lpo.curate import ingest
from lpo.reward.backbones import get_family
from lpo.reward.images import save_image_grid
from lpo.reward.lpo import generation
from lpo.reward.lpo import train as lpo_train
from lpo.reward.lpo.config import GenerationOptions, LPOConfig, check_calibration
from lpo.reward.lpo.objectives import OBJECTIVES
from lpo.reward.lpo.sample import image_seed
from lpo.reward.lpo.sampler import sample
from lpo.reward.lrm import accuracy, train
from lpo.reward.lrm.config import RewardEvalConfig, RewardTrainConfig
from lpo.reward.lrm.model import LatentRewardModel, read_lrm_config, resolve_lrm
from lpo.reward.toy import claims as judged
from lpo.reward.toy import hacking
from lpo.reward.toy.claims import noise_label
from lpo.reward.toy.config import DemoConfig
from lpo.reward.toy.world import (
    Scene,
    agreement,
    all_scenes,
    make_pickapic_table,
    match_rates,
    perceive,
    write_pickapic_parquet,
)

logger = logging.getLogger(__name__)

CONFIG_FILE = "demo_config.json"
SUMMARY_FILE = "demo_summary.json"
STAGES_DIR = "stages"
LATENT_CACHE = "latent_cache"  # one VAE, so one cache for the three LRMs and their evaluations
METRICS = ["pickscore", "clip"]  # the toy world has no aesthetics and no VQA model: MPCF runs on these two
LRM_RUNS = {  # name -> (training manifest, backbone init)
    "lrm-raw": ("raw", "diffusion"),
    "lrm-mpcf": ("mpcf", "diffusion"),
    "lrm-mpcf-fresh": ("mpcf", "random"),
}
GRID_PROMPTS = 6  # held-out captions shown in the sample grids, one row each
FAMILIES = ("sd15", "sd3")
# the toy model each family's LPO fine-tunes: sd3/ draws 93% of the held-out shape colours right without guidance,
# which leaves an LRM reading 8x8 latents little to improve; 300 of its 800 updates draw about two thirds
GENERATORS = {"sd15": "sd15", "sd3": "sd3-early"}
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    # sd15: CFG 1.5 leaves its base model room to improve (at CFG 3 its samples reach oracle 0.74)
    "sd15": {"guidance": 1.5, "lpo_threshold": [0.05, 0.3], "lrm_steps": 400, "lpo_epochs": 20, "sampler": "ddim",
             "lpo_beta_schedule": "constant", "lpo_threshold_scale": "std"},
    # sd3: the generator is sd3-early (GENERATORS); without guidance it leaves room to improve, and each step
    # costs one forward instead of two. Fewer LRM updates and epochs keep the demo, GRPO included, within 10 minutes
    # (LPO's reward on its training trajectories levels off after about 14 epochs here). The flow family's own
    # step and calibration (the coefficients-preserving step, one beta, thresholds on the step's std)
    "sd3": {"guidance": 1.0, "lpo_threshold": [0.05, 0.3], "lrm_steps": 300, "lpo_epochs": 14, "sampler": "cps",
            "lpo_beta_schedule": "constant", "lpo_threshold_scale": "std"},
}


def variants(config: DemoConfig) -> tuple[str, ...]:
    return ("base", "guided", "lpo", "grpo") if config.grpo else ("base", "guided", "lpo")


def resolved(config: DemoConfig) -> DemoConfig:
    """The config with the family's defaults where a field is left at None."""
    defaults = FAMILY_DEFAULTS[config.family]
    return dataclasses.replace(config, **{k: v for k, v in defaults.items() if getattr(config, k) is None})


def validate(config: DemoConfig) -> None:
    """Everything checkable before any model loads."""

    if config.family not in FAMILIES:
        raise InputError(f"--family {config.family!r}: the toy world's generators are {', '.join(FAMILIES)}.")
    given, config = config, resolved(config)
    models = resolve_shipped(config.models)
    expected = {config.family: "model_index.json", GENERATORS[config.family]: "model_index.json",
                "pickscore": "config.json", "clip": "open_clip_config.json"}
    missing = [f"{role}/{name}" for role, name in expected.items() if not (models / role / name).is_file()]
    if missing:
        raise InputError(f"{models} lacks {', '.join(missing)}: give the toy models folder (manifests/toy-models in "
                         "the repository, or one written by `lpo dev toy-models DIR`).")
    if not 0 <= config.flip_rate < 0.5 or not 0 <= config.tie_rate < 1:
        raise InputError("--flip-rate must be in [0, 0.5) (above it the labels say the opposite of the oracle) and "
                         "--tie-rate in [0, 1).")
    if not 0 < config.held_out_prompts < len(all_scenes()):
        raise InputError(f"--held-out-prompts must be between 1 and {len(all_scenes()) - 1} (the world has "
                         f"{len(all_scenes())} captions).")
    for name in ("train_prompts", "val_prompts", "lrm_steps", "lrm_batch_size", "lpo_epochs",
                 "lpo_sample_batch_size", "lpo_train_batch_size", "steps", "images_per_prompt"):
        if getattr(config, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1.")
    if config.candidates < 2:
        raise InputError("--candidates must be at least 2 (a winner and a loser).")
    if config.guidance < 1 or config.grpo_kl < 0:
        raise InputError("--guidance must be at least 1 (1: no guidance) and --grpo-kl at least 0.")
    low_high = list(config.lpo_threshold)
    if len(low_high) != 2 or not 0 <= low_high[0] <= low_high[1] < 1:
        raise InputError(f"lpo_threshold {low_high} must be two values 0 <= low <= high < 1.")
    if config.score_timestep not in ("parent", "child"):
        raise InputError(f"score_timestep {config.score_timestep!r} is not parent or child.")
    hacking.validate(config)

    get_family(config.family).check_sampler(config.sampler, f"the {config.family} toy model")
    check_calibration(config.lpo_beta_schedule, config.lpo_threshold_scale, "lpo-")
    rundir.claim(config.out, "demo")
    path = Path(config.out) / CONFIG_FILE
    if path.is_file():
        saved, now = json.loads(path.read_text()), cfg.to_dict(given)  # as saved: the family defaults left unset
        changed = sorted(k for k in now if saved.get(k) != now[k])
        if changed:
            raise InputError(f"{config.out} holds a demo run with other settings ({', '.join(changed)}); rerun with "
                             "the same settings to continue it, or pass a new --out.")


def run(config: DemoConfig) -> dict[str, Any]:
    """Run (or continue) the demo; returns the summary that demo.md and demo.png show."""

    validate(config)
    out = Path(config.out)
    (out / STAGES_DIR).mkdir(parents=True, exist_ok=True)
    cfg.save(config, out / CONFIG_FILE)
    config = resolved(config)
    torch.set_num_threads(min(2, torch.get_num_threads()))  # tiny models: more threads only add overhead
    _quiet_loading()
    results: dict[str, Any] = {}
    stages: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("data", lambda: make_data(config, out)),
        ("curate", lambda: curate(config, out, results["data"])),
        *[(name, lambda name=name: train_lrm(config, out, name)) for name in LRM_RUNS],
        ("lpo", lambda: optimize(config, out, "lpo")),
        *([("grpo", lambda: optimize(config, out, "grpo"))] if config.grpo else []),
        *([("hacking", lambda: hacking.hacking(config, out, lpo_settings(config, out, "lpo"), _generator(config),
                                               split_prompts(config)[1], fit_lrm))] if config.hacking else []),
        ("samples", lambda: compare_generators(config, out, results)),
    ]
    run_stages(stages, out / STAGES_DIR, results)
    summary = report(config, out, results)
    return summary


def _quiet_loading() -> None:
    """The demo loads dozens of tiny models: keep the libraries' per-load progress bars off the display."""

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------------------------
# stages


def make_data(config: DemoConfig, out: Path) -> dict[str, Any]:
    train = write_pickapic_parquet(out / "data" / "train.parquet", num_prompts=config.train_prompts,
                                   flip_rate=config.flip_rate, tie_rate=config.tie_rate, seed=config.seed)
    # the held-out pairs carry the oracle's labels; pairs the oracle calls a tie are left out, since any model
    # scores 0.5 on a tie and they would only cap the accuracy
    val = make_pickapic_table(config.val_prompts, flip_rate=0.0, tie_rate=0.0, seed=config.seed + 1)
    val = val.filter(pc.not_equal(val["label_0"], val["label_1"]))
    pq.write_table(val, out / "data" / "val.parquet")
    return {"train": str(train), "val": str(out / "data" / "val.parquet")}


def decided_agreement(pairs: pl.DataFrame, oracle: pl.DataFrame) -> pl.DataFrame:
    """The labelled pairs the oracle decides (no oracle tie), each with `agree`: whether its winner is the oracle's,
    ordered by their images (a join's row order is not fixed, and the claims' bootstrap resamples by position)."""
    keys = ["image_0_uid", "image_1_uid"]
    joined = pairs.join(oracle, on=keys, how="inner").sort(keys)
    decided = joined.filter(pl.col("winner").is_not_null() & (pl.col("oracle_0") != pl.col("oracle_1")))
    truth = pl.when(pl.col("oracle_0") > pl.col("oracle_1")).then(0).otherwise(1)
    return decided.with_columns((pl.col("winner") == truth).cast(pl.Int8).alias("agree"))


def label_agreement(pairs: pl.DataFrame, oracle: pl.DataFrame) -> dict[str, float | int]:
    """Share of the labelled pairs whose winner is the oracle's, over the pairs the oracle does not call a tie."""
    decided = decided_agreement(pairs, oracle)
    agree = decided["agree"].mean() if decided.height else float("nan")
    return {"pairs": pairs.height, "decided": decided.height, "agreement": agree}


def agreement_per_pair(pairs: pl.DataFrame, oracle: pl.DataFrame, kept: pl.DataFrame) -> dict[str, list]:
    """For each labelled pair the oracle decides: whether its winner is the oracle's (1/0) and whether MPCF kept it,
    the units the MPCF claim resamples."""
    decided = decided_agreement(pairs, oracle)
    return {"per_pair_agree": decided["agree"].to_list(),
            "per_pair_kept": decided["pair_id"].is_in(kept["pair_id"].implode()).to_list()}


def curate(config: DemoConfig, out: Path, data: dict[str, Any]) -> dict[str, Any]:
    summary = curate_filter.run(curate_filter.FilterConfig(
        source=data["train"], out=out / "curate", rule="all", metrics=list(METRICS),
        models_dir=resolve_shipped(config.models), device="cpu", decode_workers=2, plot=True))
    ingest.run(ingest.IngestConfig(source=data["val"], out=out / "val"))
    oracle = pl.read_parquet(data["train"], columns=["image_0_uid", "image_1_uid", "oracle_0", "oracle_1"])
    raw = pl.read_parquet(out / "curate" / ingest.PAIRS_FILE)
    kept = pl.read_parquet(out / "curate" / curate_filter.FILTERED_FILE)
    return {"raw": label_agreement(raw, oracle) | agreement_per_pair(raw, oracle, kept),
            "kept": label_agreement(kept, oracle), "kept_share": kept.height / max(raw.height, 1), "filter": summary}


def _manifest(out: Path, which: str) -> Path:
    return out / "curate" / (ingest.PAIRS_FILE if which == "raw" else curate_filter.FILTERED_FILE)


def train_lrm(config: DemoConfig, out: Path, name: str) -> dict[str, Any]:
    """`lpo reward train` (no validation split: every pair trains), then `lpo reward eval` of the final model on the
    held-out pairs, so nothing is selected on them."""

    which, init = LRM_RUNS[name]
    run_dir = out / name
    summary = fit_lrm(config, out, _manifest(out, which), run_dir, init)
    # the LRM the rest of the demo uses is also told the least noisy level at every level: a timestep-blind control
    blind = None
    if name == "lrm-mpcf":
        blind = min(accuracy.default_timesteps(read_lrm_config(run_dir / "last"), *resolve_lrm(run_dir / "last")))
    evaluation = accuracy.run(RewardEvalConfig(lrm=run_dir / "last", manifest=out / "val" / "pairs.parquet",
                                               out=run_dir / "eval", timesteps=[], seed=config.seed,
                                               blind_timestep=blind, batch_size=128, latent_cache=out / LATENT_CACHE,
                                               device="cpu"))
    return {"pairs": which, "init": init, "train_pairs": summary["train_pairs"], "steps": summary["steps"],
            "accuracy": evaluation["accuracy"], "accuracy_blind": evaluation.get("accuracy_blind"),
            "per_pair": str(run_dir / "eval" / accuracy.PER_PAIR_FILE), "eval_pairs": evaluation["pairs"],
            "model": str(run_dir / "last")}


def fit_lrm(config: DemoConfig, out: Path, manifest: Path, run_dir: Path, init: str = "diffusion") -> dict[str, Any]:
    """`lpo reward train` with the demo's LRM settings on `manifest` into `run_dir` (resumable)."""
    return train.run(RewardTrainConfig(
        manifest=manifest, base=_base(config), out=run_dir, val_fraction=0.0,
        batch_size=config.lrm_batch_size, max_steps=config.lrm_steps, lr=config.lrm_lr, weight_decay=0.01,
        warmup_steps=max(1, config.lrm_steps // 20), vfe_scale=config.vfe_scale, text_projection_init="", init=init,
        save_every=max(1, config.lrm_steps // 4), seed=config.seed, device="cpu", latent_cache=out / LATENT_CACHE,
        resume=train.latest_checkpoint(run_dir) is not None))


def _base(config: DemoConfig) -> str:
    """The pipeline the LRMs' backbones come from."""
    return str(resolve_shipped(config.models) / config.family)


def _generator(config: DemoConfig) -> str:
    """The pipeline LPO and GRPO fine-tune and every sampler compares: the family's toy model, or for sd3 the same
    training run stopped early (`sd3-early/`), which leaves room to improve; the LRMs read its latents, made by the
    same VAE."""
    return str(resolve_shipped(config.models) / GENERATORS[config.family])


def _eta(config: DemoConfig) -> float:
    """The family's step noise (DDIM eta 1 for sd15, the flow step's noise level 0.7 for sd3), as LPO defaults to."""

    return LPOConfig(family=config.family).resolved().eta


def split_prompts(config: DemoConfig) -> tuple[list[str], list[str]]:
    """(LPO training captions, held-out captions): a seeded split of the world's captions."""

    captions = [scene.caption for scene in all_scenes()]
    order = np.random.default_rng(config.seed).permutation(len(captions))
    held = [captions[i] for i in order[:config.held_out_prompts]]
    return [c for c in captions if c not in held], held


def optimize(config: DemoConfig, out: Path, objective: str) -> dict[str, Any]:
    """`lpo optimize <family> --objective lpo|grpo` with the MPCF-trained LRM; both objectives sample as many
    trajectories (the same epochs, prompts and sampling batch)."""

    summary = lpo_train.run(lpo_settings(config, out, objective))
    output = next(iter(summary["outputs"].values()))  # the LoRA, or the fully fine-tuned denoiser
    history = summary["history"]
    unit = OBJECTIVES[objective].unit
    total = {key: sum(r.get(key, 0) for r in history) for key in ("updates", "train_forwards", "train_seconds",
                                                                   "sample_seconds")}
    return {"rounds": summary["rounds"], f"{unit}_trained": summary[f"{unit}_trained"], "output": output,
            "lora": summary.get("lora") is not None, "trajectories": summary["rounds"] * config.lpo_sample_batch_size,
            **{key: round(value, 1) for key, value in total.items()},
            "final_lrm_score_first_round": history[0]["final_lrm_score"] if history else None,
            "final_lrm_score_last_round": history[-1]["final_lrm_score"] if history else None}


def lpo_settings(config: DemoConfig, out: Path, objective: str) -> LPOConfig:
    """The demo's `lpo optimize` run of `objective` on the training captions, into `out/<objective>`."""
    train_prompts, held_out = split_prompts(config)
    prompt_file = out / "lpo_prompts.txt"
    prompt_file.write_text("\n".join(train_prompts) + "\n")
    run_dir = out / objective
    return LPOConfig(
        family=config.family, base=_generator(config), lrm=out / "lrm-mpcf" / "last", prompts=prompt_file,
        out=run_dir, objective=objective, epochs=config.lpo_epochs, sample_batch_size=config.lpo_sample_batch_size,
        train_batch_size=config.lpo_train_batch_size, candidates=config.candidates, steps=config.steps,
        guidance=config.guidance, sampler=config.sampler, eta=_eta(config), beta=config.lpo_beta,
        beta_schedule=config.lpo_beta_schedule, threshold_scale=config.lpo_threshold_scale, grpo_kl=config.grpo_kl,
        lora_rank=config.lpo_lora_rank, lr=config.lpo_lr, threshold=list(config.lpo_threshold),
        score_timestep=config.score_timestep, validation_prompts=held_out[:3], seed=config.seed, device="cpu",
        monitor=False,  # the demo compares the generators on its own held-out captions, after training
        resume=lpo_train.latest_checkpoint(run_dir) is not None)


def _load_generator(base: str, lpo: dict[str, Any] | None, sampler: str | None) -> Any:
    """The base generator, or the LPO-tuned one (its LoRA loaded, or its fully fine-tuned denoiser swapped in)."""
    tuned = {} if lpo is None else {"lora" if lpo["lora"] else "denoiser": lpo["output"]}
    return generation.load(GenerationOptions(base=base, sampler=sampler, **tuned))


def compare_generators(config: DemoConfig, out: Path, results: dict[str, Any]) -> dict[str, Any]:
    _, held_out = split_prompts(config)
    n = config.images_per_prompt
    prompts = [p for p in held_out for _ in range(n)]
    seeds = [image_seed(config.seed, p, i) for p in range(len(held_out)) for i in range(n)]
    base = _generator(config)
    lrm = LatentRewardModel.from_pretrained(out / "lrm-mpcf" / "last").requires_grad_(False)
    eta = _eta(config)
    result: dict[str, Any] = {"prompts": held_out, "images_per_prompt": n, "steps": config.steps,
                              "guidance": config.guidance, "eta": eta, "sampler": config.sampler,
                              "candidates": config.candidates}
    samples_dir = out / "samples"
    for variant in variants(config):
        model = _load_generator(base, results[variant] if variant in ("lpo", "grpo") else None, config.sampler)
        cond = model.encode_prompts(prompts)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        latents = sample(model, cond, generators, config.steps, config.guidance, eta=eta,
                         lrm=lrm if variant == "guided" else None, prompts=prompts,
                         candidates=config.candidates if variant == "guided" else 1,
                         score_timestep=config.score_timestep)["latents"]
        with torch.no_grad():
            reward = lrm.score(latents.to(lrm.dtype), torch.full((len(prompts),), model.clean_timestep()),
                               prompts).tolist()
        images = model.decode(latents)
        wanted, seen = [Scene.from_caption(p) for p in prompts], [perceive(np.asarray(i)) for i in images]
        rates = match_rates(wanted, seen)
        save_image_grid(images[: GRID_PROMPTS * n], min(GRID_PROMPTS, len(held_out)), samples_dir / f"{variant}.png")
        result[variant] = {
            **{k: rates[k] for k in ("oracle", "fg_colour_correct", "shape_correct", "bg_colour_correct")},
            "lrm_reward": float(np.mean(reward)),
            "oracle_per_image": [agreement(w, s) for w, s in zip(wanted, seen, strict=True)],
            "lrm_reward_per_image": reward,
            "grid": str(samples_dir / f"{variant}.png"),
        }
    return result


# ---------------------------------------------------------------------------------------------------------------
# report


def costs(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What each fine-tuning objective spent on the same sampled trajectories: items trained, optimizer updates,
    denoiser forwards of the training, seconds of training and of sampling."""
    out = {}
    for objective in OBJECTIVES.values():
        if objective.name in results:
            r = results[objective.name]
            items = r.get(f"{objective.unit}_trained")
            out[objective.name] = {"trajectories": r.get("trajectories"), "items": items,
                                   "updates": r.get("updates"), "train_forwards": r.get("train_forwards"),
                                   "train_seconds": r.get("train_seconds"), "sample_seconds": r.get("sample_seconds")}
    return out


def report(config: DemoConfig, out: Path, results: dict[str, Any]) -> dict[str, Any]:
    summary = {"config": cfg.to_dict(config), "family": config.family,
               "claims": judged.claims(judged.evidence(results), config.family),
               "costs": costs(results), "seconds": {name: r.get("seconds") for name, r in results.items()},
               **results}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    (out / "demo.md").write_text(markdown(summary))
    figure(summary, out / "demo.png")
    return summary


NAMES = {"base": "base model", "guided": "LRM-guided sampling", "lpo": "LPO-tuned model", "grpo": "GRPO-tuned model"}


def markdown(summary: dict[str, Any]) -> str:
    cur, samples, family = summary["curate"], summary["samples"], summary.get("family", "sd15")
    levels = list(summary["lrm-mpcf"]["accuracy"])
    lines = [f"# lpo demo on the toy world ({family})", "",
             "| claim | measured; effect [95% interval] | holds |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['measured']} | {c['verdict']} |" for c in summary["claims"]]
    lines += ["", judged.VERDICT_RULE[0].upper() + judged.VERDICT_RULE[1:] + "."]
    lines += ["", "| LRM (held-out pairs, accuracy) | " + " | ".join(noise_label(t, family) for t in levels) + " |",
              "|---|" + "---|" * len(levels)]
    for name, (pairs, init) in LRM_RUNS.items():
        acc = summary[name]["accuracy"]
        lines.append(f"| {pairs} pairs, {init} init | " + " | ".join(f"{acc[t]:.3f}" for t in levels) + " |")
    lines += ["", "| generator (held-out captions) | oracle | shape colour | shape | background | LRM reward |",
              "|---|---|---|---|---|---|"]
    for variant in (v for v in NAMES if v in samples):
        s = samples[variant]
        lines.append(f"| {variant} | {s['oracle']:.3f} | {s['fg_colour_correct']:.3f} | {s['shape_correct']:.3f} | "
                     f"{s['bg_colour_correct']:.3f} | {s['lrm_reward']:.2f} |")
    cost = summary.get("costs", {})
    if cost:
        lines += ["", "| fine-tuning | trajectories | items trained | updates | training forwards | training s | "
                      "sampling s |", "|---|---|---|---|---|---|---|"]
        for objective, c in cost.items():
            lines.append(f"| {objective} | {c['trajectories']} | {c['items']} {OBJECTIVES[objective].noun} | "
                         f"{c['updates']} | {c['train_forwards']} | {c['train_seconds']} | {c['sample_seconds']} |")
    lines += ["", f"Label agreement with the oracle: raw {cur['raw']['agreement']:.3f} over {cur['raw']['decided']} "
                  f"decided pairs; kept {cur['kept']['agreement']:.3f} over {cur['kept']['decided']}.",
              "Seconds per stage: " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()), ""]
    return "\n".join(lines)


def figure(summary: dict[str, Any], path: Path) -> Path:
    plt = pyplot()

    family = summary.get("family", "sd15")
    shown = [v for v in NAMES if v in summary["samples"]]
    fig, axes = plt.subplots(1, 1 + len(shown), figsize=(4.3 * (1 + len(shown)), 4.4),
                             gridspec_kw={"width_ratios": [1.3] + [1] * len(shown)})
    ax = axes[0]
    levels = list(summary["lrm-mpcf"]["accuracy"])
    x = [float(t) if family == "sd15" else float(t) / 1000 for t in levels]
    for name, (pairs, init) in LRM_RUNS.items():
        acc = summary[name]["accuracy"]
        ax.plot(x, [acc[t] for t in levels], marker="o", label=f"{pairs} pairs, {init}")
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax.set_xlabel("timestep t (noise level)" if family == "sd15" else "sigma (noise level)")
    ax.set_ylabel("held-out pairwise accuracy")
    ax.set_ylim(0.4, 1.0)
    ax.set_title(f"LRM accuracy against noise ({family})")
    ax.legend(fontsize=8)
    captions = summary["samples"]["prompts"][:GRID_PROMPTS]
    for ax, variant in zip(axes[1:], shown):
        s = summary["samples"][variant]
        grid = Image.open(s["grid"])
        ax.imshow(grid, interpolation="nearest")
        ax.set_title(f"{NAMES[variant]}\noracle {s['oracle']:.3f}, LRM reward {s['lrm_reward']:.2f}", fontsize=10)
        ax.set_xticks([])
        row = grid.height / len(captions)
        ax.set_yticks([(i + 0.5) * row for i in range(len(captions))])
        ax.set_yticklabels([c.removeprefix("a ").replace(" background", "") for c in captions] if ax is axes[1]
                           else [], fontsize=7)
        ax.tick_params(length=0)
    return save_figure(fig, path)
