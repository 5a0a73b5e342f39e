"""A text-to-image latent diffusion model (SD1.x/2.x or SDXL) as LPO and sampling need it: prompt conditioning,
classifier-free-guided noise prediction in one UNet forward, a DDIM scheduler, and VAE decoding."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from curate.errors import InputError

logger = logging.getLogger(__name__)


def diffusers_dtype(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype keyword of diffusers' from_pretrained: `dtype` where `torch_dtype` is deprecated, else the old one."""
    from diffusers.utils import deprecation_utils

    renamed = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")
    return {"dtype": dtype} if renamed else {"torch_dtype": dtype}


@dataclass
class Conditioning:
    """Conditional and unconditional text conditioning for a batch of prompts."""

    context: torch.Tensor
    uncond_context: torch.Tensor
    pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> Conditioning:
        """The conditioning of a subset (or a repetition) of the batch."""
        pick = (lambda x: None if x is None else x[index])  # noqa: E731
        return Conditioning(self.context[index], self.uncond_context[index], pick(self.pooled),
                            pick(self.uncond_pooled), pick(self.time_ids))

    def repeat(self, k: int) -> Conditioning:
        """The batch repeated k times, in [batch, batch, ...] order."""
        index = torch.arange(self.context.shape[0]).repeat(k)
        return self.select(index)


class DiffusionModel:
    """Pipeline components with a DDIM scheduler; `family` is sd15 (SD1.x/2.x) or sdxl."""

    def __init__(self, pipeline: Any, family: str, base: str):
        from diffusers import DDIMScheduler

        self.pipeline = pipeline
        self.family = family
        self.base = base
        self.unet = pipeline.unet
        self.vae = pipeline.vae
        self.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        self.resolution = int(self.unet.config.sample_size) * pipeline.vae_scale_factor

    @classmethod
    def load(cls, base: str, family: str | None = None, dtype: torch.dtype = torch.float32,
             device: str = "cpu") -> DiffusionModel:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        from reward.lrm import family_of, read_unet_config

        found = family_of(read_unet_config(base))
        if family is not None and family != found:
            raise InputError(f"{base} is an {found} pipeline, not {family}; use `lpo optimize {found}`.")
        if found == "sdxl":
            pipeline = StableDiffusionXLPipeline.from_pretrained(base, **diffusers_dtype(dtype))
        else:
            pipeline = StableDiffusionPipeline.from_pretrained(base, **diffusers_dtype(dtype), safety_checker=None,
                                                               requires_safety_checker=False)
        pipeline.set_progress_bar_config(disable=True)
        for module in (pipeline.vae, pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)):
            if module is not None:
                module.requires_grad_(False)
        return cls(pipeline.to(device), found, base)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = int(self.unet.config.sample_size)
        return (int(self.unet.config.in_channels), size, size)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Exactly the pipeline's own prompt encoding (SDXL: zeros for the empty negative prompt, as its config
        asks), so sampling here matches `pipe(prompt)`."""
        device = self.device
        if self.family == "sd15":
            cond, uncond = self.pipeline.encode_prompt(prompts, device, 1, True, negative_prompt=None)
            return Conditioning(cond, uncond)
        cond, uncond, pooled, uncond_pooled = self.pipeline.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
        size = float(self.resolution)
        time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=device, dtype=cond.dtype)
        return Conditioning(cond, uncond, pooled, uncond_pooled, time_ids.expand(len(prompts), 6))

    def predict_noise(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                      guidance: float, unet: Any = None) -> torch.Tensor:
        """eps_uncond + guidance * (eps_cond - eps_uncond), both halves in one UNet forward."""
        unet = unet if unet is not None else self.unet
        n = latents.shape[0]
        timesteps = timesteps.to(latents.device).expand(n)
        if guidance == 1.0:
            kwargs = {}
            if cond.pooled is not None:
                kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
            return unet(latents, timesteps, encoder_hidden_states=cond.context, **kwargs).sample
        kwargs = {}
        if cond.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.cat([cond.uncond_pooled, cond.pooled]),
                                           "time_ids": torch.cat([cond.time_ids, cond.time_ids])}
        out = unet(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                   encoder_hidden_states=torch.cat([cond.uncond_context, cond.context]), **kwargs).sample
        uncond, conditional = out[:n], out[n:]
        return uncond + guidance * (conditional - uncond)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Any]:
        """VAE-decode latents to PIL images."""
        from PIL import Image

        vae = self.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return [Image.fromarray(a) for a in to_uint8(images)]


def to_uint8(images: torch.Tensor) -> Any:
    """[n, 3, H, W] in [-1, 1] -> a numpy array [n, H, W, 3] of uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def check_lrm_matches(model_family: str, lrm_dir: str | Path, base: str) -> None:
    """An LRM scores latents of one latent space: SD1.x/2.x (one VAE) or SDXL (another)."""
    from reward.lrm import read_lrm_config

    config = read_lrm_config(Path(lrm_dir))
    if config.family != model_family:
        raise InputError(f"the latent reward model {lrm_dir} was built on an {config.family} backbone, but {base} is "
                         f"an {model_family} pipeline: their latent spaces differ. Use an LRM trained on the same "
                         "family (SD1.x and SD2.x share one).")


def save_image_grid(images: list[Any], rows: int, path: str | Path) -> Path:
    """A grid PNG of equally sized images, row-major."""
    from PIL import Image

    cols = max(1, -(-len(images) // rows))
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * width, (i // cols) * height))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
