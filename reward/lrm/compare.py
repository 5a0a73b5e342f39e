"""`lpo reward compare`: several reward models on one preference set, pairwise accuracy per noise level.

Step-level methods (LPO, step-wise GRPO, guided sampling) ask a reward model about noisy intermediate latents, so the
question that decides between reward models is how well each ranks a pair *at each noise level*. Every model here
sees the same pairs and the same noise: each pair's two images are drawn from their VAE posteriors and noised to
each timestep with the pair's own seeds (`accuracy.pair_noise`), exactly as `lpo reward eval` does, so an LRM's
accuracy here equals `lpo reward eval` of that LRM alone (tested).

- LRMs (ours, imported reference ones): scored on the noisy latents, told the timestep.
- Image metrics (PickScore, HPSv2.1, CLIP, ...): scored on the noisy latents decoded by the VAE, the image a pixel
  reward model would get at that step without a denoiser; at the least noisy level this is the clean image.

Per model and timestep: the mean correctness over pairs (a tie counts 0.5 whichever way the model leans) and a
normal 95% interval with the standard error clustered by caption (the pairs of one caption share images and are
not independent draws). Outputs: OUT/compare.json, OUT/compare.png (accuracy against the noise level with the
intervals), OUT/per_pair.parquet (model, pair_id, timestep, correct). Each model's per-pair table is a part under
OUT/models/, so a rerun scores only the models not yet done.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from diffusers import AutoencoderKL

from lpo.core.device import resolve_device
from lpo.core.errors import InputError
from lpo.core.files import write_json_atomic
from lpo.core.parts import Parts, stem_key
from lpo.core.plots import pyplot, save_figure
from lpo.core.refs import weight_args
from lpo.curate.manifest import curation_dir_of, read_pairs
from lpo.curate.scorers import load_scorer
from lpo.curate.scorers.specs import RECORD_METRICS
from lpo.reward.backbones import get_family
from lpo.reward.eval.score import resolve_metric_specs
from lpo.reward.eval.stats import clustered_mean_ci
from lpo.reward.images import to_pil
from lpo.reward.lrm.accuracy import (
    accuracy_per_timestep,
    default_timesteps,
    manifest_labels,
    noised_pairs,
    usable_pairs,
)
from lpo.reward.lrm.config import RewardCompareConfig
from lpo.reward.lrm.latents import LatentCache, build_cache, only_encoded, pair_uids, vae_fingerprint
from lpo.reward.lrm.loss import pairwise_correct
from lpo.reward.lrm.model import RUN_SUBFOLDERS, LatentRewardModel, component, read_lrm_config, resolve_lrm

logger = logging.getLogger(__name__)

RESULT_FILE = "compare.json"
PLOT_FILE = "compare.png"
PER_PAIR_FILE = "per_pair.parquet"
SETTINGS_FILE = "compare_settings.json"
MODELS_DIR = "models"
SPACE_KEYS = ("family", "latent_shape", "resolution", "vae_scaling_factor", "vae_shift_factor")
STATISTICS = ("accuracy: mean over pairs of the correctness (1 right, 0 wrong, a tie 0.5); ci95: normal interval, "
              "mean +- 1.96 standard errors clustered by caption (CR1)")


def part_key(model: dict[str, Any]) -> str:
    """A model's part under OUT/models/: named by what it is (kind and spec), not by its place in the list."""
    return hashlib.sha1(f"{model['kind']}|{model['spec']}".encode()).hexdigest()[:16]


def _lrm_name(path: Path) -> str:
    """A run's best/ or last/ is named with its run: lrm-sd15/best."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.name in RUN_SUBFOLDERS and path.parent.name else path.name


def plan(config: RewardCompareConfig) -> dict[str, Any]:
    """Everything checked before a model loads: the models (one latent space), the metrics, the pairs, the
    timesteps, OUT's earlier settings. Returns the resolved plan."""
    if not config.lrms:
        raise InputError("give at least one --lrm: the LRMs set the latent space (VAE, noise schedule) every model "
                         "is compared in; image metrics come beside them with --metrics.")
    if config.out is None or config.manifest is None:
        raise InputError("give --manifest FILE (the preference pairs) and --out DIR.")
    if not Path(config.manifest).is_file():
        raise InputError(f"--manifest {config.manifest} does not exist; pass a pairs manifest (filtered.parquet or "
                         "a curation dir's pairs.parquet).")
    if config.batch_size < 1:
        raise InputError(f"--batch-size {config.batch_size} must be at least 1.")
    lrms = []
    for lrm in config.lrms:
        source, subfolder = resolve_lrm(lrm)
        lrms.append({"spec": str(lrm), "source": source, "subfolder": subfolder, "config": read_lrm_config(lrm)})
    first = lrms[0]
    for lrm in lrms[1:]:
        differs = [k for k in SPACE_KEYS if lrm["config"].get(k) != first["config"].get(k)]
        if differs:
            raise InputError(f"{lrm['spec']} reads another latent space than {first['spec']} ({', '.join(differs)} "
                             "differ): compare LRMs of one family and VAE, and run `lpo reward compare` once per "
                             "family.")
    vaes = {lrm["spec"]: vae_fingerprint(*component(lrm["source"], lrm["subfolder"], "vae")) for lrm in lrms}
    for lrm in lrms[1:]:
        if vaes[lrm["spec"]] != vaes[first["spec"]]:
            raise InputError(f"{lrm['spec']} reads another VAE's latents than {first['spec']} (their vae/ weights "
                             "differ): compare LRMs of one VAE.")
    bad = [m for m in config.metrics if m in RECORD_METRICS]
    if bad:
        raise InputError(f"{bad} score against a benchmark record, not a caption; compare caption metrics (e.g. "
                         "pickscore, hpsv21, clip).")
    specs = resolve_metric_specs(list(config.metrics), dict(config.models), config.models_dir) if config.metrics \
        else {}
    timesteps = default_timesteps(first["config"], first["source"], first["subfolder"], list(config.timesteps))
    for lrm in lrms[1:]:
        default_timesteps(lrm["config"], lrm["source"], lrm["subfolder"], timesteps)
    names = [_lrm_name(Path(lrm["spec"])) for lrm in lrms] + list(specs)
    if len(set(names)) != len(names):
        names = [f"{i}-{name}" for i, name in enumerate(names)]
    pairs = usable_pairs(read_pairs(config.manifest))
    if pairs.is_empty():
        raise InputError(f"{config.manifest} has no pairs with a winner or a tie; compare on a labelled manifest.")
    settings = {"manifest": str(Path(config.manifest).resolve()), "seed": config.seed,
                "timesteps": [float(t) for t in timesteps], "vae": vaes[first["spec"]]}
    earlier = Path(config.out) / SETTINGS_FILE
    if earlier.is_file() and json.loads(earlier.read_text()) != settings:
        raise InputError(f"{config.out} holds a comparison with other settings ({earlier}): its models were scored "
                         "on other pairs, seeds or timesteps. Pass another --out, or the same settings to add "
                         "models to it.")
    models = [{"name": name, "kind": "lrm", **lrm} for name, lrm in zip(names, lrms)]
    models += [{"name": name, "kind": "metric", "metric": metric, "spec": spec}
               for name, (metric, spec) in zip(names[len(lrms):], specs.items())]
    return {"models": models, "timesteps": timesteps, "pairs": pairs, "settings": settings,
            "flow_matching": get_family(first["config"]["family"]).flow_matching}


@torch.no_grad()
def metric_accuracy(scorer: Any, vae: Any, scale: float, shift: float, cache: LatentCache, pairs: pl.DataFrame,
                    noise_scheduler: Any, timesteps: list, seed: int, batch_size: int,
                    per_pair: torch.Tensor) -> None:
    """An image metric's correctness per timestep and pair (into `per_pair` [len(timesteps), pairs]): the pairs'
    latents noised as `accuracy_per_timestep` noises them (the denoiser's latent space: (z - shift) x scale),
    decoded by the VAE, scored against the caption."""
    labels = manifest_labels(pairs)
    for start in range(0, pairs.height, batch_size):
        rows = list(range(start, min(start + batch_size, pairs.height)))
        chunk = pairs[rows]
        n = len(rows)
        mean, std = cache.get(chunk["image_0_uid"].to_list() + chunk["image_1_uid"].to_list())
        captions = chunk["caption"].to_list() * 2
        for k, t in enumerate(timesteps):
            noisy = noised_pairs(mean, std, rows, t, seed, noise_scheduler, lambda z: (z - shift) * scale)
            decoded = vae.decode((noisy / scale + shift).to(vae.device, vae.dtype)).sample
            scores = torch.as_tensor(np.asarray(scorer.score(to_pil(decoded.float().cpu()), captions)),
                                     dtype=torch.float64)
            per_pair[k, rows] = pairwise_correct(scores[:n], scores[n:], labels[rows]).to(per_pair.dtype)


def _score_model(model: dict[str, Any], context: dict[str, Any], config: RewardCompareConfig) -> pl.DataFrame:
    pairs, timesteps, device = context["pairs"], context["timesteps"], context["device"]
    correct = torch.zeros(len(timesteps), pairs.height, dtype=torch.float64)
    if model["kind"] == "lrm":
        lrm = LatentRewardModel.from_pretrained(model["source"], model["subfolder"]).to(device)
        noise = get_family(lrm.config.family).noise_schedule(*component(model["source"], model["subfolder"],
                                                                        "scheduler"))
        accuracy_per_timestep(lrm, context["cache"], pairs, noise, timesteps, config.seed, config.batch_size,
                              per_pair=correct)
    else:
        scorer = load_scorer(model["metric"], model["spec"], device=device)
        metric_accuracy(scorer, context["vae"], context["scale"], context["shift"], context["cache"], pairs,
                        context["noise"], timesteps, config.seed, config.batch_size, correct)
    ids = pairs["pair_id"].to_list()
    captions = pairs["caption"].to_list()
    return pl.DataFrame({"pair_id": ids * len(timesteps), "caption": captions * len(timesteps),
                         "timestep": [float(t) for t in timesteps for _ in ids],
                         "correct": correct.flatten().tolist()})


def summarise(per_pair: pl.DataFrame, timesteps: list) -> dict[str, dict[str, Any]]:
    """Per model and timestep: accuracy (mean correctness) and its caption-clustered 95% interval."""
    result: dict[str, dict[str, Any]] = {}
    for name in per_pair["model"].unique(maintain_order=True).to_list():
        mine = per_pair.filter(pl.col("model") == name)
        levels = {}
        for t in timesteps:
            at = mine.filter(pl.col("timestep") == float(t))
            stats = clustered_mean_ci(at["correct"].to_numpy(), at["caption"].to_numpy())
            levels[str(t)] = {"accuracy": stats["mean"], "ci95": stats["ci95"], "pairs": stats["n_images"],
                              "captions": stats["n_prompts"]}
        result[name] = levels
    return result


def plot(summary: dict[str, dict[str, Any]], path: Path, sigma: bool) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, levels in summary.items():
        ts = sorted(levels, key=float)
        x = [float(t) / 1000 if sigma else float(t) for t in ts]
        ax.plot(x, [levels[t]["accuracy"] for t in ts], marker="o", label=name)
        if all(levels[t]["ci95"] for t in ts):
            ax.fill_between(x, [levels[t]["ci95"][0] for t in ts], [levels[t]["ci95"][1] for t in ts], alpha=0.15)
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax.set_xlabel("sigma (noise level)" if sigma else "timestep t (noise level)")
    ax.set_ylabel("pairwise accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("reward models per noise level (95% intervals)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def run(config: RewardCompareConfig) -> dict[str, Any]:
    """`lpo reward compare`: plan (exit 2 on bad input before any model loads), cache the pairs' latents once,
    score each model not yet scored under OUT, then the table, the plot and the per-pair file."""
    context = plan(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(context["settings"], out / SETTINGS_FILE)
    first = next(m for m in context["models"] if m["kind"] == "lrm")
    context["device"] = device = resolve_device(config.device)
    vae_source, vae_subfolder = component(first["source"], first["subfolder"], "vae")
    cache = build_cache(Path(config.latent_cache or out / "latent_cache"),
                        {curation_dir_of(Path(config.manifest)): pair_uids(context["pairs"])}, vae_source,
                        first["config"]["resolution"], device=device, subfolder=vae_subfolder)
    context["cache"] = cache
    context["pairs"] = pairs = only_encoded(context["pairs"], cache)
    parts = Parts(out / MODELS_DIR, "*.parquet", keys=stem_key)
    keys = {part_key(model): model for model in context["models"]}
    todo = parts.todo(keys)
    if any(keys[k]["kind"] == "metric" for k in todo):
        location, where = weight_args(vae_source, vae_subfolder)
        context["vae"] = AutoencoderKL.from_pretrained(location, **where).to(device).eval()
        context["scale"] = float(first["config"]["vae_scaling_factor"])
        context["shift"] = float(first["config"].get("vae_shift_factor") or 0.0)
        context["noise"] = get_family(first["config"]["family"]).noise_schedule(
            *component(first["source"], first["subfolder"], "scheduler"))
    for key in todo:
        model = keys[key]
        logger.info("scoring %s (%s) on %d pairs at %d noise levels", model["name"], model["kind"], pairs.height,
                    len(context["timesteps"]))
        table = _score_model(model, context, config)
        with parts.writing(f"{key}.parquet") as tmp:
            table.write_parquet(tmp)
    per_pair = pl.concat([pl.read_parquet(parts.directory / f"{key}.parquet").select(
        pl.lit(model["name"]).alias("model"), pl.all()) for key, model in keys.items()])
    summary = summarise(per_pair, context["timesteps"])
    result = {"manifest": str(config.manifest), "pairs": pairs.height, "seed": config.seed,
              "timesteps": list(context["timesteps"]), "statistics": STATISTICS,
              "models": {m["name"]: {"kind": m["kind"], "spec": m["spec"], "accuracy": summary[m["name"]]}
                         for m in context["models"]}}
    if context["flow_matching"]:
        result["sigma"] = {str(t): round(float(t) / 1000, 6) for t in context["timesteps"]}
    per_pair.write_parquet(out / PER_PAIR_FILE)
    write_json_atomic(result, out / RESULT_FILE)
    plot(summary, out / PLOT_FILE, context["flow_matching"])
    result["out"] = str(out)
    return result
