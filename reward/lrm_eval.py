"""Pairwise accuracy of a latent reward model per timestep, with fixed noise seeds (ties count 0.5)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import polars as pl
import torch

from curate.errors import InputError
from reward.configs import EVAL_TIMESTEPS, RewardEvalConfig
from reward.latents import LatentCache
from reward.lrm_loss import pair_labels, pairwise_correct

logger = logging.getLogger(__name__)



def usable_pairs(pairs: pl.DataFrame) -> pl.DataFrame:
    """Pairs with a decision: a winner, or a tie."""
    return pairs.filter(pl.col("winner").is_not_null() | pl.col("is_tie"))


@torch.no_grad()
def accuracy_per_timestep(model: Any, cache: LatentCache, pairs: pl.DataFrame, noise_scheduler: Any,
                          timesteps: tuple[int, ...] | list[int] = EVAL_TIMESTEPS, seed: int = 1234,
                          batch_size: int = 32) -> dict[int, float]:
    """Accuracy at each t: every pair is noised with the same seeds on every call, so runs compare exactly."""
    model_was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    labels_all = pair_labels(torch.tensor(pairs["winner"].fill_null(-1).to_list()),
                             torch.tensor(pairs["is_tie"].to_list()))
    scaling = model.config.vae_scaling_factor
    result = {}
    for t in timesteps:
        generator = torch.Generator().manual_seed(seed + int(t))
        correct = 0.0
        for start in range(0, pairs.height, batch_size):
            chunk = pairs.slice(start, batch_size)
            n = chunk.height
            uids = chunk["image_0_uid"].to_list() + chunk["image_1_uid"].to_list()
            clean = cache.sample(uids, scaling, generator)
            noise = torch.randn(clean.shape, generator=generator)
            steps = torch.full((2 * n,), int(t), dtype=torch.long)
            noisy = noise_scheduler.add_noise(clean, noise, steps)
            captions = chunk["caption"].to_list() * 2
            scores = model.score(noisy.to(device), steps.to(device), captions).float().cpu()
            correct += pairwise_correct(scores[:n], scores[n:], labels_all[start:start + n]).sum().item()
        result[int(t)] = correct / max(pairs.height, 1)
    model.train(model_was_training)
    return result


def plot_accuracy(accuracy: dict[int, float], path: Path, title: str = "LRM pairwise accuracy") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ts = sorted(accuracy)
    ax.plot(ts, [accuracy[t] for t in ts], marker="o")
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax.set_xlabel("timestep t (noise level)")
    ax.set_ylabel("pairwise accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_eval(config: RewardEvalConfig) -> dict[str, Any]:
    """`lpo reward eval`: accuracy per timestep as JSON plus a PNG plot."""
    from curate.manifest import curation_dir_of, read_pairs
    from reward.latents import build_cache, cache_dir, only_encoded, pair_uids
    from reward.lrm import load_noise_scheduler, read_lrm_config, resolve_device

    lrm_config = read_lrm_config(Path(config.lrm))
    pairs = usable_pairs(read_pairs(config.manifest))
    if pairs.is_empty():
        raise InputError(f"{config.manifest} has no pairs with a winner or a tie; evaluate on a filtered manifest.")
    bad = [t for t in config.timesteps if not 0 <= t < 1000]
    if bad:
        raise InputError(f"timesteps {bad} are outside [0, 999].")
    from reward.lrm import LatentRewardModel

    device = resolve_device(config.device)
    out = Path(config.out) if config.out else Path(config.lrm) / "eval"
    uids = pair_uids(pairs)
    cache = build_cache(cache_dir(out / "latent_cache", str(Path(config.lrm).resolve()), lrm_config.resolution),
                        curation_dir_of(config.manifest), uids, str(config.lrm), lrm_config.resolution, device=device)
    encoded = only_encoded(pairs, cache)
    model = LatentRewardModel.from_pretrained(config.lrm).to(device)
    accuracy = accuracy_per_timestep(model, cache, encoded, load_noise_scheduler(config.lrm), config.timesteps,
                                     config.seed, config.batch_size)
    result = {"lrm": str(config.lrm), "manifest": str(config.manifest), "pairs": encoded.height,
              "skipped_pairs_with_undecodable_images": pairs.height - encoded.height, "seed": config.seed,
              "accuracy": {str(t): a for t, a in accuracy.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_accuracy(accuracy, out / "accuracy.png")
    result["out"] = str(out)
    return result
