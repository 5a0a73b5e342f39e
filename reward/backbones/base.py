"""What a model family is: the interface every backbone adapter implements.

The method needs a family (SD1.x/2.x, SDXL; flow-matching transformers such as SD3 and FLUX.1 next) in two roles:

- `Generator`: the text-to-image model as sampling, LPO and evaluation use it: prompt conditioning, the guided
  denoiser output, the sampler's timestep grid, and each step as a Gaussian transition (its mean and std, so a
  child can be drawn and its likelihood computed), VAE decoding, LoRA in and out.
- `LRMBackbone`: the family's own denoiser, truncated, and text encoders as the latent reward model reads them:
  pooled features of a noisy latent at the tapped layers, the prompt conditioning and the pooled text feature.

A `Family` (`family.py`, the registry) names both, with the family's defaults. Everything else
(the LRM's projections and loss, the LPO sampler, loss and trainer, evaluation) is written once against these
interfaces. A new family is one module with a `Generator`, an `LRMBackbone` and a registry entry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers.utils import logging as diffusers_logging
from torch import nn
from transformers import AutoTokenizer

from lpo.core.refs import load_args
from lpo.reward.backbones.family import Family, check_resolution


def load_tokenizer(spec: str | Path, subfolder: str) -> Any:
    """The tokenizer in folder `subfolder` of a pipeline or a saved LRM (a local folder or a hub reference, pinned or
    not)."""
    source, where = load_args(spec, subfolder)
    return AutoTokenizer.from_pretrained(source, **where)


def load_lora_quietly(pipeline: Any, path: str | Path) -> None:
    """`pipeline.load_lora_weights(path)` without diffusers' warning that a denoiser-only LoRA (what LPO writes) has
    no text-encoder keys."""

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipeline.load_lora_weights(str(path))
    finally:
        diffusers_logging.set_verbosity(level)


def classifier_free(out: torch.Tensor, guidance: float, detach_uncond: bool = False) -> torch.Tensor:
    """uncond + guidance * (cond - uncond) of a denoiser output over the batch [uncond; cond]; `detach_uncond` stops
    the gradient through the unconditional half (its value is unchanged)."""
    uncond, conditional = out.chunk(2)
    if detach_uncond:
        uncond = uncond.detach()
    return uncond + guidance * (conditional - uncond)


@dataclass
class Conditioning:
    """Conditional and unconditional text conditioning for a batch of prompts (what the family's denoiser takes:
    a token sequence, optionally a pooled vector and extra conditioning such as SDXL's size ids)."""

    context: torch.Tensor
    uncond_context: torch.Tensor | None  # None for a family without an unconditional branch (FLUX.1)
    pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> Conditioning:
        """The conditioning of a subset (or a repetition) of the batch."""
        pick = (lambda x: None if x is None else x[index])  # noqa: E731
        return Conditioning(self.context[index], pick(self.uncond_context), pick(self.pooled),
                            pick(self.uncond_pooled), pick(self.time_ids))

    def repeat(self, k: int) -> Conditioning:
        """The batch repeated k times, in [batch, batch, ...] order."""
        index = torch.arange(self.context.shape[0]).repeat(k)
        return self.select(index)


@dataclass
class StepStats:
    """One sampler step from x_t as a Gaussian transition N(mean, std^2 I), per batch element."""

    mean: torch.Tensor
    std: torch.Tensor  # [B, 1, ..., 1]
    x0: torch.Tensor  # the clean-latent prediction
    prev_timestep: torch.Tensor  # [B]: the timestep the child is at


class Generator(ABC):
    """A family's text-to-image model as sampling, LPO and evaluation use it. `denoiser` is the network LPO adapts
    (a UNet or a transformer); `vae` decodes; the step maths follow the family's sampler."""

    family: Family
    scheduler_class: str  # the diffusers scheduler the family samples with, built from the pipeline's config
    classifier_free = True  # guidance runs an unconditional half in the same forward (not FLUX.1's embedded one)

    def __init__(self, pipeline: Any, base: str):
        self.pipeline = pipeline
        self.base = base
        self.vae = pipeline.vae
        self.scheduler = getattr(diffusers, self.scheduler_class).from_config(pipeline.scheduler.config)
        self.sampler = self.family.default_sampler  # the stochastic step `step` takes (`use_sampler`)
        self.side: int | None = None  # the image side sampled at (`use_resolution`; None: the native one)

    def use_resolution(self, pixels: int | None) -> None:
        """Sample (and train) at image side `pixels` (None: the pipeline's native side); an InputError names the
        sides the pipeline takes."""

        check_resolution(pixels, self.family, dict(self.denoiser.config), dict(self.vae.config))
        self.side = pixels

    def use_sampler(self, name: str | None) -> None:
        """Take the family's stochastic step `name` (None: the family's default)."""
        self.family.check_sampler(name)
        self.sampler = name if name is not None else self.family.default_sampler

    @classmethod
    def load(cls, base: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Generator:
        """The base pipeline with frozen VAE and text encoders, on `device` in `dtype`."""
        pipeline = cls.family.load_pipeline(base, dtype)
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(pipeline, name, None)
            if module is not None:
                module.requires_grad_(False)
        return cls(pipeline.to(device), base)

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipeline, self.family.denoiser)

    def set_denoiser(self, module: nn.Module) -> None:
        """Swap in another denoiser (e.g. a fully fine-tuned one)."""
        setattr(self.pipeline, self.family.denoiser, module)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    @abstractmethod
    def latent_channels(self) -> int:
        """Channels of one latent."""

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """[C, H, W] of one latent at the resolution sampled at."""
        side = self.resolution // self.pipeline.vae_scale_factor
        return (self.latent_channels, side, side)

    @property
    def native_resolution(self) -> int:
        """The pipeline's own image side in pixels: the denoiser's latent sample size times the VAE's downscaling."""
        return int(self.denoiser.config.sample_size) * self.pipeline.vae_scale_factor

    @property
    def resolution(self) -> int:
        """The image side sampled at: `use_resolution`'s, else the native one."""
        return self.side or self.native_resolution

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """The pipeline's own prompt encoding (conditional and unconditional), so sampling matches `pipe(prompt)`."""

    @abstractmethod
    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, guidance: float,
                denoiser: Any = None, detach_uncond: bool = False) -> torch.Tensor:
        """The (guided) denoiser output the step maths take (noise for DDIM families, velocity for flow ones);
        `denoiser` replaces the model's own (the LPO policy or its reference); `detach_uncond` stops the gradient
        through classifier-free guidance's unconditional half (no effect without one)."""

    @abstractmethod
    def timesteps(self, steps: int) -> list:
        """Set the sampler's grid for `steps` steps and return its timesteps, noisiest first."""

    @abstractmethod
    def clean_timestep(self) -> float:
        """The least noisy timestep the family's reward models are trained at: where a finished image is scored."""

    @abstractmethod
    def initial_latents(self, generators: list[torch.Generator]) -> torch.Tensor:
        """[B, *latent_shape] starting noise on the CPU, image b's from generators[b]."""

    @abstractmethod
    def step(self, output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor,
             noise_level: float) -> StepStats:
        """The stochastic step from `sample` at `timesteps` as a Gaussian transition; `noise_level` is the
        sampler's stochasticity (DDIM's eta)."""

    @abstractmethod
    def step_stds(self, noise_level: float) -> tuple[list, torch.Tensor]:
        """(timesteps, float64 std of each trained step) of the grid the last `timesteps` call set."""

    @abstractmethod
    def noise_sigmas(self, timesteps: list) -> torch.Tensor:
        """The noise share of the forward process at each timestep (float64): sigma for flow matching,
        sqrt(1 - alphas_cumprod) for DDPM schedules."""

    def step_kappas(self, noise_level: float) -> tuple[list, torch.Tensor]:
        """(timesteps, kappa of each trained step) of the grid the last `timesteps` call set: kappa = |d mean /
        d model output| / std, how far a unit change of the denoiser's output moves the step's log-density (in
        units of its noise), the per-step strength of a log-ratio signal. The step is affine in the output, so the
        mean's change between outputs 0 and 1 is the derivative."""
        timesteps, stds = self.step_stds(noise_level)
        t = torch.as_tensor(timesteps)
        sample = torch.zeros(len(timesteps), 1, 1, 1)
        zero = self.step(torch.zeros_like(sample), t, sample, noise_level).mean
        one = self.step(torch.ones_like(sample), t, sample, noise_level).mean
        gain = (one - zero).to(torch.float64).abs().flatten()
        return timesteps, gain / stds

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> list[Any]:
        """VAE-decode latents to PIL images."""

    @classmethod
    @abstractmethod
    def trace(cls, denoiser: nn.Module, n: int, side: int | None = None) -> torch.Tensor:
        """One forward of `denoiser` on n latents of side `side` (default: the pipeline's own) with conditioning of
        the right shapes, on the denoiser's own device (the meta device when planning a run), to size a training
        step."""

    @staticmethod
    def check_lpo(base: str) -> None:
        """Refuse (InputError) a model of the family whose step likelihood LPO cannot train on; from configs only.
        Every model of the UNet and SD3 families can be trained."""
        return None

    def load_lora(self, path: str | Path) -> None:
        load_lora_quietly(self.pipeline, path)

    @abstractmethod
    def save_lora(self, directory: str | Path, layers: dict[str, torch.Tensor],
                  metadata: dict[str, Any] | None = None) -> None:
        """Write the denoiser's LoRA layers (PEFT's `get_peft_model_state_dict`) in the naming the family's pipeline
        reads, where `pipe.load_lora_weights(directory)` finds them, with the adapter's config (`metadata`: its
        `LoraConfig.to_dict()`, so a loader applies the alpha it was trained with, not alpha = rank)."""


class LRMBackbone(nn.Module, ABC):
    """A family's denoiser, truncated to the layers the latent reward model taps, with its text encoders.

    `components` maps each pipeline subfolder the backbone holds to that module's config, so `from_components`
    rebuilds it (with fresh weights) for loading a saved reward model; `resolution` is the image side it reads."""

    family: Family
    resolution: int
    text_projected: bool  # whether the pooled text feature is already in a joint image-text space (else projected)
    unused_parameters: bool = False  # some parameters never get a gradient (DDP must be told to look for them)
    frozen_text: bool = False  # the text encoders do not train (their encoding of a prompt never changes)
    own_text_projection: bool = False  # the text projection starts from `text_projection_init`, not a CLIP model's
    depth: int | None = None  # transformer families: the blocks the backbone runs (UNets: fixed by their taps)

    @classmethod
    @abstractmethod
    def from_base(cls, base: str, dtype: torch.dtype = torch.float32, pretrained: bool = True,
                  depth: int | None = None, frozen_dtype: torch.dtype | None = None) -> LRMBackbone:
        """The backbone of a pipeline (hub id or folder); `pretrained=False` keeps the architecture with fresh
        weights; `depth` (transformer families) the blocks it runs; `frozen_dtype` the dtype of the frozen parts held
        outside the module (default `dtype`)."""

    @classmethod
    @abstractmethod
    def components_from_base(cls, base: str) -> dict[str, dict[str, Any]]:
        """The configs of the modules the backbone takes from a pipeline (config files only)."""

    @classmethod
    @abstractmethod
    def from_components(cls, components: dict[str, dict[str, Any]], resolution: int, depth: int | None = None,
                        base: str | None = None) -> LRMBackbone:
        """The backbone's architecture from its components' configs (weights to be loaded by the caller; parts that
        never train and are not saved, such as SD3's text encoders, come from `base` on first use)."""

    @staticmethod
    @abstractmethod
    def noise_schedule(source: str | Path, subfolder: str = "scheduler") -> Any:
        """The forward process of the family (`add_noise(clean, noise, timesteps)`), read from `source`."""

    @classmethod
    @abstractmethod
    def default_timesteps(cls, source: str | Path, subfolder: str | None,
                          latent_shape: tuple[int, ...]) -> tuple[list, list]:
        """(training, evaluation) timesteps of a reward model of this family, given where its noise schedule is
        (a pipeline or a saved LRM, and the subfolder) and its latent shape."""

    @staticmethod
    @abstractmethod
    def check_timesteps(values: list[float]) -> list:
        """The timesteps as the family's models take them (integers for DDPM schedules), or an InputError."""

    @property
    @abstractmethod
    def components(self) -> dict[str, dict[str, Any]]:
        """Pipeline subfolder -> config of each module held."""

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """[C, H, W] of the latents it reads."""

    @abstractmethod
    def default_taps(self) -> list[int]:
        """The paper's feature taps on this architecture."""

    @abstractmethod
    def feature_channels(self, taps: list[int]) -> list[int]:
        """Widths of the pooled features `pooled_features(..., taps)` returns."""

    @property
    @abstractmethod
    def text_width(self) -> int:
        """Width of the pooled text feature `encode_text` returns under "text"."""

    def external_components(self) -> dict[str, dict[str, Any]]:
        """Configs of frozen parts the backbone uses but does not hold as submodules (not saved, not wrapped)."""
        return {}

    @property
    def projection_dim(self) -> int:
        """The default width of the joint space the reward model projects into."""
        return self.text_width

    def text_projection_init(self, projection_dim: int) -> torch.Tensor | None:
        """The family's own initial text projection [projection_dim, text_width], or None (then a CLIP model's
        text projection or a random one)."""
        return None

    @abstractmethod
    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The denoiser's conditioning for `prompts` (one tensor per key, batch first) and, under "text", the
        pooled text feature the score compares with."""

    @abstractmethod
    def pooled_features(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor],
                        taps: list[int]) -> list[torch.Tensor]:
        """Pooled [B, width] features at `taps`, then the deepest feature the backbone computes (always last)."""

    @abstractmethod
    def trace(self, n: int, shape: Sequence[int] | None = None) -> list[torch.Tensor]:
        """`pooled_features` of n latents of `shape` (default: `latent_shape`, the base's own side) with conditioning
        of the right shapes on the backbone's own device (the meta device when planning a run), to size a training
        step."""

    @abstractmethod
    def enable_gradient_checkpointing(self) -> None: ...

    @property
    @abstractmethod
    def encoder_names(self) -> tuple[str, ...]:
        """The pipeline subfolders of the text encoders it reads prompts with, in order (each with its tokenizer in
        the matching `tokenizer*` folder)."""

    def save_tokenizers(self, directory: Path) -> None:
        for name, tokenizer in zip(self.encoder_names, self.tokenizers):
            tokenizer.save_pretrained(Path(directory) / name.replace("text_encoder", "tokenizer"))

    def load_tokenizers(self, source: str | Path, subfolder: str | None = None) -> None:
        prefix = f"{subfolder}/" if subfolder else ""
        self.tokenizers = [load_tokenizer(source, prefix + name.replace("text_encoder", "tokenizer"))
                           for name in self.encoder_names]
