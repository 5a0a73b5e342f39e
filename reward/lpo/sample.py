"""`lpo sample`: plain generation with per-image seeds, and LRM-guided sampling that needs no training."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from lpo.core import rundir
from lpo.core.device import resolve_device
from lpo.core.errors import InputError
from lpo.reward.lpo import generation
from lpo.reward.lpo.config import SampleConfig
from lpo.reward.lpo.sampler import sample
from lpo.reward.lrm.model import LatentRewardModel

logger = logging.getLogger(__name__)


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of one image: fixed per (prompt, image index), whatever the batch."""
    return seed + 1000 * prompt_index + image_index


def validate(config: SampleConfig) -> None:
    if not config.base or not config.out:
        raise InputError("--base and --out are required.")
    if not config.prompts or not all(p.strip() for p in config.prompts):
        raise InputError("give at least one non-empty --prompt.")
    if config.images_per_prompt < 1:
        raise InputError(f"--images-per-prompt {config.images_per_prompt}: must be at least 1.")
    rundir.claim(config.out, "samples")
    generation.check(config)


def run(config: SampleConfig) -> dict[str, Any]:
    """Generate every (prompt, image) with its own seed; with an LRM, also plain samples with the same seeds, and
    the LRM score of both."""

    validate(config)
    device = resolve_device(config.device)
    model = generation.load(config, device=device)
    eta, guidance = model.family.sampling(config.eta, config.guidance, guided=config.lrm is not None)
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
