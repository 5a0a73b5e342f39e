"""`lpo reward eval` and `lpo reward score`: an LRM's pairwise accuracy per timestep, with fixed noise seeds (ties
count 0.5), and the scores of image files."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import polars as pl
import torch
from PIL import Image

from lpo.core.device import resolve_device
from lpo.core.errors import InputError
from lpo.core.plots import pyplot, save_figure
from lpo.curate.ingest import PAIRS_FILE, IngestConfig
from lpo.curate.ingest import run as ingest
from lpo.curate.manifest import curation_dir_of, read_pairs
from lpo.reward.backbones import get_family
from lpo.reward.lrm.config import EVAL_TIMESTEPS, RewardEvalConfig, RewardScoreConfig
from lpo.reward.lrm.latents import LatentCache, build_cache, only_encoded, pair_uids
from lpo.reward.lrm.loss import pair_labels, pairwise_correct
from lpo.reward.lrm.model import LatentRewardModel, component, read_lrm_config, resolve_lrm

logger = logging.getLogger(__name__)

PER_PAIR_FILE = "per_pair.parquet"
PER_PAIR_SCHEMA = {"set": pl.String, "pair_id": pl.String, "timestep": pl.Float64, "blind": pl.Boolean,
                   "told_timestep": pl.Float64, "correct": pl.Float64}


def usable_pairs(pairs: pl.DataFrame) -> pl.DataFrame:
    """Pairs with a decision: a winner, or a tie."""
    return pairs.filter(pl.col("winner").is_not_null() | pl.col("is_tie"))


def manifest_labels(pairs: pl.DataFrame) -> torch.Tensor:
    """Soft labels [pairs, 2] of a manifest's pairs (`pair_labels` of its winner and tie columns)."""
    return pair_labels(torch.tensor(pairs["winner"].fill_null(-1).to_list()), torch.tensor(pairs["is_tie"].to_list()))


@torch.no_grad()
def pair_noise(seed: int, t: int, index: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(posterior draw, forward-process noise), each [2, *shape] (image 0, image 1), of pair `index` at timestep
    `t`: a function of the three alone, so any batch size and any split over processes noise a pair alike."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + int(t)) * 1_000_033 + index)
    return torch.randn((2, *shape), generator=generator), torch.randn((2, *shape), generator=generator)


@torch.no_grad()
def noised_pairs(mean: torch.Tensor, std: torch.Tensor, rows: list[int], t: float, seed: int, noise_scheduler: Any,
                 to_latents: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """[2n, C, H, W]: image 0 of the n pairs `rows`, then image 1, each drawn from its VAE posterior (`mean`, `std`,
    [2n, ...] in the same order) and noised to `t` with the pair's own seeds (`pair_noise`)."""
    draws = [pair_noise(seed, t, index, tuple(mean.shape[1:])) for index in rows]
    eps = torch.cat([torch.stack([d[0][0] for d in draws]), torch.stack([d[0][1] for d in draws])])
    noise = torch.cat([torch.stack([d[1][0] for d in draws]), torch.stack([d[1][1] for d in draws])])
    return noise_scheduler.add_noise(to_latents(mean + std * eps), noise, torch.full((2 * len(rows),), t))


@torch.no_grad()
def accuracy_per_timestep(model: Any, cache: LatentCache, pairs: pl.DataFrame, noise_scheduler: Any,
                          timesteps: tuple[float, ...] | list[float] = EVAL_TIMESTEPS, seed: int = 1234,
                          batch_size: int = 32, rank: int = 0, world: int = 1,
                          total: Callable[[torch.Tensor], torch.Tensor] | None = None,
                          to_latents: Callable[[torch.Tensor], torch.Tensor] | None = None,
                          told: float | None = None, per_pair: torch.Tensor | None = None) -> dict[float, float]:
    """Accuracy at each t: every pair is noised by its own seeds (`pair_noise`), so runs compare exactly.

    Under several processes each scores the pairs `rank::world` and `total` sums the counts over them; `model` may
    then be the trainer's wrapped model (DDP, DeepSpeed, FSDP: pass `to_latents`, the unwrapped model's), which is
    only called, and every process makes the same number of calls (FSDP gathers the weights at each).

    `told`: the timestep the model is given at every noise level instead of the true one (a timestep-blind
    control); `per_pair` ([len(timesteps), pairs]) receives each of this process's pairs' correctness (1, 0, or
    0.5 for a tie)."""
    model_was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    labels_all = manifest_labels(pairs)
    to_latents = model.to_latents if to_latents is None else to_latents
    mine = list(range(rank, pairs.height, world))
    calls = math.ceil(math.ceil(pairs.height / world) / batch_size)  # the most chunks any process has
    correct = torch.zeros(len(timesteps), dtype=torch.float64)
    for chunk_index in range(calls):
        rows = mine[chunk_index * batch_size:(chunk_index + 1) * batch_size]
        padding = not rows  # this process is out of pairs: it still calls the model, on pair 0, and counts nothing
        rows = rows or [0]
        chunk = pairs[rows]
        n = len(rows)
        mean, std = cache.get(chunk["image_0_uid"].to_list() + chunk["image_1_uid"].to_list())
        captions = chunk["caption"].to_list() * 2
        for k, t in enumerate(timesteps):
            noisy = noised_pairs(mean, std, rows, t, seed, noise_scheduler, to_latents)
            steps = torch.full((2 * n,), t)
            given = steps if told is None else torch.full((2 * n,), told)
            scores = model(noisy.to(device), given.to(device), captions).float().cpu()
            if not padding:
                right = pairwise_correct(scores[:n], scores[n:], labels_all[rows])
                correct[k] += right.sum().item()
                if per_pair is not None:
                    per_pair[k, rows] = right.to(per_pair.dtype)
    if total is not None:
        correct = total(correct)
    model.train(model_was_training)
    return {t: correct[k].item() / max(pairs.height, 1) for k, t in enumerate(timesteps)}


def default_timesteps(lrm_config: dict[str, Any], source: str, subfolder: str | None,
                      given: list[float] | None = None) -> list:
    """The evaluation timesteps of a saved LRM: `given`, checked for its family, or its family's defaults from the
    noise schedule saved beside it."""

    backbone = get_family(lrm_config["family"]).lrm_backbone
    if given:
        return backbone.check_timesteps(given)
    return backbone.default_timesteps(*component(source, subfolder, "scheduler"),
                                      tuple(lrm_config["latent_shape"]))[1]


def plot_accuracy(curves: dict[str, dict[float, float]], path: Path, title: str = "LRM pairwise accuracy",
                  sigma: bool = False) -> Path:
    """Accuracy against the noise level, one line per evaluation set: the timestep (DDPM families) or sigma =
    timestep / 1000 (flow matching)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, accuracy in curves.items():
        ts = sorted(accuracy)
        ax.plot([t / 1000 if sigma else t for t in ts], [accuracy[t] for t in ts], marker="o", label=name)
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax.set_xlabel("sigma (noise level)" if sigma else "timestep t (noise level)")
    ax.set_ylabel("pairwise accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)


def evaluation_sets(config: RewardEvalConfig, out: Path) -> dict[str, Path]:
    """Name -> pairs manifest: the --manifest, or each split of --dataset ingested under OUT/pickapic/ (resumable:
    a finished split is not read again)."""

    if (config.manifest is None) == (config.dataset is None):
        raise InputError("give --manifest FILE or --dataset ID_OR_PATH (e.g. --dataset yuvalkirstain/pickapic_v1 for "
                         "the validation_unique and test_unique accuracy), not both.")
    if config.manifest is not None:
        return {Path(config.manifest).stem: Path(config.manifest)}
    if not config.splits:
        raise InputError("--splits is empty; name the splits of --dataset, e.g. validation_unique,test_unique.")
    sets = {}
    for split in config.splits:
        directory = out / "pickapic" / split
        ingest(IngestConfig(source=config.dataset, out=directory, split=split))
        sets[split] = directory / PAIRS_FILE
    return sets


def run(config: RewardEvalConfig) -> dict[str, Any]:
    """`lpo reward eval`: accuracy per timestep on each evaluation set (a manifest, or Pick-a-Pic's splits) as JSON
    plus a PNG plot."""

    lrm_config = read_lrm_config(config.lrm)
    source, subfolder = resolve_lrm(config.lrm)
    model_dir = Path(source) / (subfolder or "")
    if config.out is None and not Path(source).is_dir():
        raise InputError(f"{config.lrm} is a hub model: give --out DIR for accuracy.json and the data.")
    timesteps = default_timesteps(lrm_config, source, subfolder, config.timesteps)
    if config.blind_timestep is not None:
        default_timesteps(lrm_config, source, subfolder, [config.blind_timestep])  # a timestep the LRM takes
    out = Path(config.out) if config.out else model_dir / "eval"
    sets = {}
    for name, path in evaluation_sets(config, out).items():
        pairs = usable_pairs(read_pairs(path))
        if pairs.is_empty():
            raise InputError(f"{path} has no pairs with a winner or a tie; evaluate on a filtered manifest or a "
                             "labelled split.")
        sets[name] = (path, pairs)
    flow_matching = get_family(lrm_config["family"]).flow_matching
    device = resolve_device(config.device)
    vae_source, vae_subfolder = component(source, subfolder, "vae")
    cache = build_cache(Path(config.latent_cache or out / "latent_cache"),
                        {curation_dir_of(path): pair_uids(pairs) for path, pairs in sets.values()}, vae_source,
                        lrm_config["resolution"], device=device, subfolder=vae_subfolder)
    model = LatentRewardModel.from_pretrained(source, subfolder).to(device)
    noise = get_family(lrm_config["family"]).noise_schedule(*component(source, subfolder, "scheduler"))
    results, curves, rows = {}, {}, []
    for name, (path, pairs) in sets.items():
        encoded = only_encoded(pairs, cache)
        evaluate = partial(_evaluate_set, model, cache, encoded, noise, timesteps, config, name, rows)
        accuracy = curves[name] = evaluate(None)
        results[name] = {"manifest": str(path), "pairs": encoded.height,
                         "skipped_pairs_with_undecodable_images": pairs.height - encoded.height,
                         "accuracy": {str(t): a for t, a in accuracy.items()}}
        if flow_matching:  # the noise level of a flow-matching model is sigma = timestep / 1000
            results[name]["accuracy_by_sigma"] = {str(round(t / 1000, 6)): a for t, a in accuracy.items()}
        if config.blind_timestep is not None:
            blind = evaluate(config.blind_timestep)
            results[name]["accuracy_blind"] = {str(t): a for t, a in blind.items()}
    result = {"lrm": str(config.lrm) if not Path(source).is_dir() else str(model_dir), "seed": config.seed,
              "dataset": config.dataset, "sets": results}
    if config.manifest is not None:  # one set: its figures at the top level too
        result |= next(iter(results.values()))
    if config.blind_timestep is not None:
        result["blind_timestep"] = config.blind_timestep
    out.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows, schema=PER_PAIR_SCHEMA).write_parquet(out / PER_PAIR_FILE)
    (out / "accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_accuracy(curves, out / "accuracy.png", sigma=flow_matching)
    result["out"] = str(out)
    return result


def _evaluate_set(model: Any, cache: LatentCache, pairs: pl.DataFrame, noise: Any, timesteps: list, config: Any,
                  name: str, rows: list[dict[str, Any]], told: float | None) -> dict[float, float]:
    """The accuracy per timestep of one evaluation set (the model told `told` instead of the true timestep, when
    given), appending each pair's correctness at each level to `rows`."""
    correct = torch.zeros(len(timesteps), pairs.height, dtype=torch.float64)
    accuracy = accuracy_per_timestep(model, cache, pairs, noise, timesteps, config.seed, config.batch_size, told=told,
                                     per_pair=correct)
    ids = pairs["pair_id"].to_list()
    rows.extend({"set": name, "pair_id": pair_id, "timestep": float(t), "blind": told is not None,
                 "told_timestep": float(t if told is None else told), "correct": value}
                for k, t in enumerate(timesteps) for pair_id, value in zip(ids, correct[k].tolist()))
    return accuracy


def validate_score(config: RewardScoreConfig) -> tuple[list[Any], float]:
    """Everything `lpo reward score` can check before a model loads; returns the opened images and the timestep
    (default: the least noisy evaluation timestep of the LRM's family)."""

    lrm_config = read_lrm_config(config.lrm)
    t = default_timesteps(lrm_config, *resolve_lrm(config.lrm), [config.t] if config.t is not None else None)[0]
    if not config.images:
        raise InputError("give at least one image with --images FILE.")
    if len(config.prompts) not in (1, len(config.images)):
        raise InputError(f"{len(config.images)} images but {len(config.prompts)} prompts: give one prompt, or one "
                         "per image.")
    missing = [str(p) for p in config.images if not Path(p).is_file()]
    if missing:
        raise InputError(f"image file(s) not found: {missing}.")
    opened = []
    for path in config.images:
        try:
            opened.append(Image.open(path).convert("RGB"))
        except OSError as err:
            raise InputError(f"{path} is not a readable image ({err}).") from None
    return opened, t


def score(config: RewardScoreConfig) -> list[dict[str, Any]]:
    """`lpo reward score`: encode each image with the VAE saved beside the LRM, noise it to t, score it."""

    images, t = validate_score(config)
    prompts = list(config.prompts) * len(images) if len(config.prompts) == 1 else list(config.prompts)
    model = LatentRewardModel.from_pretrained(config.lrm).to(resolve_device(config.device))
    scores = model.score_images(images, prompts, t=t, seed=config.seed)
    return [{"image": str(path), "prompt": text, "t": t, "score": round(value, 6)}
            for path, text, value in zip(config.images, prompts, scores.tolist())]
