"""`lpo sample`: plain generation with per-image seeds, and LRM-guided sampling that needs no training."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from lpo.core.device import resolve_device
from lpo.core.errors import InputError
from lpo.reward.backbones import family_of, load_generator, resolve_denoiser, resolve_lora
from lpo.reward.backbones.family import check_base_resolution
from lpo.reward.lpo.config import SampleConfig
from lpo.reward.lpo.sampler import sample
from lpo.reward.lrm.model import LatentRewardModel, check_lrm_matches

logger = logging.getLogger(__name__)


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of one image: fixed per (prompt, image index), whatever the batch."""
    return seed + 1000 * prompt_index + image_index


def validate(config: SampleConfig) -> None:
    if not config.base or not config.out:
        raise InputError("--base and --out are required.")
    if not config.prompts or not all(p.strip() for p in config.prompts):
        raise InputError("give at least one non-empty --prompt.")
    family = family_of(config.base)
    family.check_sampler(config.sampler)
    check_base_resolution(config.resolution, config.base, family)
    if config.lrm is not None:
        check_lrm_matches(config.lrm, family.name, config.base)
    if config.candidates > 1 and config.lrm is None:
        raise InputError("--candidates > 1 needs --lrm to choose between the candidates.")
    if config.candidates < 1 or config.images_per_prompt < 1 or config.steps < 1:
        raise InputError("--candidates, --images-per-prompt and --steps must be at least 1.")
    if config.lrm is not None and config.eta is not None and config.eta <= 0:
        raise InputError("LRM-guided sampling needs --eta > 0 (with eta 0 every candidate is the same).")
    if config.lora is not None:
        resolve_lora(config.lora)
    if config.denoiser is not None and config.lora is not None:
        raise InputError("give --lora or --denoiser, not both: a LoRA adapts the base's own denoiser.")
    if config.denoiser is not None:
        resolve_denoiser(config.denoiser, family)


def run(config: SampleConfig) -> dict[str, Any]:
    """Generate every (prompt, image) with its own seed; with an LRM, also plain samples with the same seeds, and
    the LRM score of both."""

    validate(config)
    device = resolve_device(config.device)
    model = load_generator(config.base, lora=config.lora, denoiser=config.denoiser, device=device)
    eta, guidance = model.family.sampling(config.eta, config.guidance, guided=config.lrm is not None)
    model.use_sampler(config.sampler)
    model.use_resolution(config.resolution)
    lrm = LatentRewardModel.from_pretrained(config.lrm).to(device) if config.lrm is not None else None
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for p, prompt in enumerate(config.prompts):
        n = config.images_per_prompt
        cond = model.encode_prompts([prompt] * n)
        seeds = [image_seed(config.seed, p, i) for i in range(n)]
        runs = {"guided": config.candidates} if lrm is not None else {"plain": 1}
        if lrm is not None:
            runs["plain"] = 1
        finals = {}
        for name, k in runs.items():
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            finals[name] = sample(model, cond, generators, config.steps, guidance, eta,
                                  lrm=lrm if name == "guided" else None, prompts=[prompt] * n, candidates=k,
                                  score_timestep=config.score_timestep)["latents"]
        for name, latents in finals.items():
            scores = None
            if lrm is not None:
                steps = torch.full((n,), model.clean_timestep(), device=device)
                scores = lrm.score(latents.to(lrm.device, lrm.dtype), steps, [prompt] * n).tolist()
            for i, image in enumerate(model.decode(latents)):
                path = out / f"{name}-p{p:04d}-i{i:02d}.png"
                image.save(path)
                records.append({"prompt": prompt, "prompt_index": p, "image_index": i, "seed": seeds[i],
                                "kind": name, "path": str(path), "lrm_score": None if scores is None else scores[i]})
    summary: dict[str, Any] = {"base": config.base, "lora": str(config.lora) if config.lora else None,
                               "denoiser": config.denoiser, "lrm": str(config.lrm) if config.lrm else None,
                               "candidates": config.candidates, "steps": config.steps, "guidance": guidance,
                               "eta": eta, "sampler": model.sampler, "resolution": model.resolution, "images": records}
    if lrm is not None:
        mean = {kind: sum(r["lrm_score"] for r in records if r["kind"] == kind) /
                max(1, sum(r["kind"] == kind for r in records)) for kind in ("guided", "plain")}
        summary["mean_lrm_score"] = mean
        summary["lrm_score_gain"] = mean["guided"] - mean["plain"]
    (out / "samples.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
