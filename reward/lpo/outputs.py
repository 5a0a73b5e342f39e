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


def export(config: LPOConfig, accelerator, model, denoiser, out: Path) -> dict[str, str]:
    """A diffusers LoRA (`pipe.load_lora_weights(out / "lora")` accepts it), or the full denoiser; optionally
    merged into a full denoiser too."""
    outputs: dict[str, str] = {}
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return outputs
    policy = accelerator.unwrap_model(denoiser)
    name = model.family.denoiser
    if config.lora_rank > 0:
        (adapter,) = policy.active_adapters()
        model.save_lora(out / "lora", get_peft_model_state_dict(policy), policy.peft_config[adapter].to_dict())
        outputs["lora"] = str(out / "lora")
        if config.merge:
            outputs |= merge(config, model, out)
    else:
        policy.save_pretrained(out / name)
        outputs[name] = str(out / name)
    return outputs


def merge(config: LPOConfig, model: Any, folder: Path) -> dict[str, str]:
    """The full denoiser with `folder/lora` merged in, saved as `folder/merged_<denoiser>` (a LoRA run; nothing
    for a fully fine-tuned denoiser, which is saved whole already)."""
    if not (folder / "lora").is_dir():
        return {}
    name = model.family.denoiser
    merged = model.family.load_pipeline(config.base)
    load_lora_quietly(merged, folder / "lora")
    merged.fuse_lora()
    merged.unload_lora_weights()
    getattr(merged, name).save_pretrained(folder / f"merged_{name}")
    return {f"{folder.name}_merged_{name}" if folder.name == BEST_DIR else f"merged_{name}":
            str(folder / f"merged_{name}")}


def save_best(config: LPOConfig, model: Any, policy: Any, out: Path, row: dict[str, Any]) -> Path:
    """The policy of the best monitor check as `OUT/best/` (its LoRA in `lora/`, or the fully fine-tuned
    denoiser), with the check's row in `monitor.json`; the folder is replaced whole, so a kill leaves the old best."""
    best = out / BEST_DIR
    staging = out / f".{BEST_DIR}-new"
    shutil.rmtree(staging, ignore_errors=True)
    if config.lora_rank > 0:
        (adapter,) = policy.active_adapters()
        model.save_lora(staging / "lora", get_peft_model_state_dict(policy), policy.peft_config[adapter].to_dict())
    else:
        policy.save_pretrained(staging / model.family.denoiser)
    write_json_atomic(row, staging / "monitor.json")
    old = out / f".{BEST_DIR}-old"
    shutil.rmtree(old, ignore_errors=True)
    if best.exists():
        best.rename(old)
    staging.rename(best)
    shutil.rmtree(old, ignore_errors=True)
    return best
