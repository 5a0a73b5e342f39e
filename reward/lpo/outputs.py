"""What an `lpo optimize` run writes besides its checkpoints: the per-epoch validation grids, the trained LoRA (or
denoiser) and its merge, and the policy of the monitor's best check in `OUT/best/`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from peft.utils import get_peft_model_state_dict

from lpo.core.files import write_json_atomic
from lpo.reward.backbones.base import load_lora_quietly
from lpo.reward.images import save_image_grid
from lpo.reward.lpo.config import LPOConfig
from lpo.reward.lpo.monitor import BEST_DIR
from lpo.reward.lpo.sampler import sample


def validation_grid(model, denoiser, prompts: list[str], config: LPOConfig, path: Path) -> Path:
    denoiser.eval()
    images = []
    for i, prompt in enumerate(prompts):
        cond = model.encode_prompts([prompt] * config.validation_images)
        generators = [torch.Generator().manual_seed(10_000 + 100 * i + j) for j in range(config.validation_images)]
        latents = sample(model, cond, generators, config.steps, config.guidance, eta=0.0, denoiser=denoiser)["latents"]
        images += model.decode(latents)
    return save_image_grid(images, len(prompts), path)


def save_policy(config: LPOConfig, model: Any, policy: Any, folder: Path) -> dict[str, str]:
    """The trained policy in `folder`: its LoRA in `lora/` (`pipe.load_lora_weights` accepts it), or the fully
    fine-tuned denoiser in `<denoiser>/`; returns {name: path}."""
    if config.lora_rank > 0:
        (adapter,) = policy.active_adapters()
        model.save_lora(folder / "lora", get_peft_model_state_dict(policy), policy.peft_config[adapter].to_dict())
        return {"lora": str(folder / "lora")}
    name = model.family.denoiser
    policy.save_pretrained(folder / name)
    return {name: str(folder / name)}


def export(config: LPOConfig, accelerator, model, denoiser, out: Path) -> dict[str, str]:
    """The policy in `out` (`save_policy`); with --merge a LoRA merged into a full denoiser too."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return {}
    outputs = save_policy(config, model, accelerator.unwrap_model(denoiser), out)
    if config.merge and "lora" in outputs:
        outputs[f"merged_{model.family.denoiser}"] = merge(config, model, out)
    return outputs


def merge(config: LPOConfig, model: Any, folder: Path) -> str:
    """The full denoiser with `folder/lora` merged in, saved as `folder/merged_<denoiser>`; returns its path."""
    name = model.family.denoiser
    merged = model.family.load_pipeline(config.base)
    load_lora_quietly(merged, folder / "lora")
    merged.fuse_lora()
    merged.unload_lora_weights()
    getattr(merged, name).save_pretrained(folder / f"merged_{name}")
    return str(folder / f"merged_{name}")


def save_best(config: LPOConfig, model: Any, policy: Any, out: Path, row: dict[str, Any]) -> Path:
    """The policy of the best monitor check as `OUT/best/` (`save_policy`), with the check's row in
    `monitor.json`; the folder is replaced whole, so a kill leaves the old best."""
    best = out / BEST_DIR
    staging = out / f".{BEST_DIR}-new"
    shutil.rmtree(staging, ignore_errors=True)
    save_policy(config, model, policy, staging)
    write_json_atomic(row, staging / "monitor.json")
    old = out / f".{BEST_DIR}-old"
    shutil.rmtree(old, ignore_errors=True)
    if best.exists():
        best.rename(old)
    staging.rename(best)
    shutil.rmtree(old, ignore_errors=True)
    return best
