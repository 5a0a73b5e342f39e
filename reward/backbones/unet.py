"""The UNet families: SD1.x/2.x (`sd15`) and SDXL (`sdxl`), sampled with DDIM.

Generator: the pipeline's own prompt encoding (SDXL adds the pooled embedding and the size ids), classifier-free
guidance in one UNet forward, the DDIM step as a Gaussian transition (`lpo.reward.backbones.ddim`).

LRM backbone: the stock diffusers UNet's conv_in, time (and SDXL added) embeddings, down blocks and mid block; the
up blocks and conv_out are dropped. Taps are the outputs of each down block's last resnet (the paper's: 2, 5, 8, 11
on SD1.5, 2, 5, 8 on SDXL) and the mid block. The pooled text feature is the first encoder's pooler output
(SD1.x/2.x: projected by the reward model) or the second encoder's own projection (SDXL).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from lpo.core.errors import InputError
from lpo.core.refs import load_args, weight_args
from lpo.reward.backbones import ddim
from lpo.reward.backbones.base import Conditioning, Generator, LRMBackbone, StepStats, classifier_free, load_tokenizer
from lpo.reward.backbones.family import diffusers_dtype, get_family, pixel_resolution, read_subfolder_config
from lpo.reward.images import to_pil
from lpo.reward.lrm.config import CANDIDATE_TIMESTEPS, EVAL_TIMESTEPS

# ---------------------------------------------------------------------------------------------------------------
# generator


class UNetGenerator(Generator):
    """An SD1.x/2.x or SDXL pipeline with a DDIM scheduler."""

    scheduler_class = "DDIMScheduler"

    @property
    def unet(self) -> nn.Module:
        return self.pipeline.unet

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        cond, uncond = self.pipeline.encode_prompt(prompts, self.device, 1, True, negative_prompt=None)
        return Conditioning(cond, uncond)

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, guidance: float,
                denoiser: Any = None, detach_uncond: bool = False) -> torch.Tensor:
        """eps_uncond + guidance * (eps_cond - eps_uncond), both halves in one UNet forward."""
        unet = denoiser if denoiser is not None else self.unet
        n = latents.shape[0]
        latents = latents.to(self.dtype)  # the step maths keep latents in float32; the UNet may run in half
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
        return classifier_free(out, guidance, detach_uncond)

    @classmethod
    def trace(cls, denoiser: nn.Module, n: int, side: int | None = None) -> torch.Tensor:
        config, device = denoiser.config, denoiser.device
        side = side or int(config.sample_size)
        kwargs = {}
        if config.addition_embed_type == "text_time":  # SDXL: the pooled text and the six size ids
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(n, pooled, device=device),
                                           "time_ids": torch.zeros(n, 6, device=device)}
        return denoiser(torch.zeros(n, config.in_channels, side, side, device=device),
                        torch.zeros(n, dtype=torch.long, device=device),
                        encoder_hidden_states=torch.zeros(n, 77, config.cross_attention_dim, device=device),
                        **kwargs).sample

    def timesteps(self, steps: int) -> list[int]:
        self.scheduler.set_timesteps(steps)
        return self.scheduler.timesteps.tolist()

    def clean_timestep(self) -> int:
        return 1  # the reference LRM's least noisy training timestep

    def initial_latents(self, generators: list[torch.Generator]) -> torch.Tensor:
        shape = self.latent_shape
        return torch.stack([torch.randn(shape, generator=g) for g in generators]) * self.scheduler.init_noise_sigma

    def step(self, output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor,
             noise_level: float) -> StepStats:
        return ddim.step_stats(self.scheduler, output, timesteps, sample, noise_level)

    def step_stds(self, noise_level: float) -> tuple[list[int], torch.Tensor]:
        timesteps = self.scheduler.timesteps.to(torch.long)
        return timesteps.tolist(), ddim.step_std(self.scheduler, timesteps, noise_level)

    def noise_sigmas(self, timesteps: list[int]) -> torch.Tensor:
        """The forward process's noise share at each timestep: sqrt(1 - alphas_cumprod[t])."""
        cumprod = self.scheduler.alphas_cumprod.to(torch.float64)
        return torch.sqrt(1 - cumprod[torch.as_tensor(timesteps, dtype=torch.long)])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Any]:
        vae = self.vae
        return to_pil(vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample)

    def save_lora(self, directory: str | Path, layers: dict[str, torch.Tensor],
                  metadata: dict[str, Any] | None = None) -> None:
        """In diffusers' UNet LoRA naming (`convert_state_dict_to_diffusers`, as its UNet training scripts save)."""

        type(self.pipeline).save_lora_weights(directory, unet_lora_layers=convert_state_dict_to_diffusers(layers),
                                              unet_lora_adapter_metadata=metadata,
                                              safe_serialization=True)


class SDXLGenerator(UNetGenerator):
    """SDXL: two text encoders, the pooled embedding and the size ids as added conditioning."""

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Exactly the pipeline's own prompt encoding (zeros for the empty negative prompt, as its config asks)."""
        cond, uncond, pooled, uncond_pooled = self.pipeline.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True)
        time_ids = size_ids(self.resolution, cond.dtype, self.device)
        return Conditioning(cond, uncond, pooled, uncond_pooled, time_ids.expand(len(prompts), 6))


def size_ids(resolution: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """SDXL's micro-conditioning for an uncropped square image: original size, crop top-left, target size."""
    size = float(resolution)
    return torch.tensor([[size, size, 0.0, 0.0, size, size]], device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# latent reward model backbone


def _layers(unet_config: dict[str, Any]) -> list[int]:
    layers = unet_config["layers_per_block"]
    n = len(unet_config["down_block_types"])
    return [layers] * n if isinstance(layers, int) else list(layers)


def res_channels(unet_config: dict[str, Any]) -> list[int]:
    """Channels of each entry of `down_block_res_samples`: conv_in's output, then per down block one entry per
    resnet and one for the downsampler, which every block but the last has."""
    blocks = unet_config["block_out_channels"]
    layers = _layers(unet_config)
    out = [blocks[0]]
    for i, n in enumerate(layers):
        out += [blocks[i]] * (n + (1 if i < len(layers) - 1 else 0))
    return out


def default_taps(unet_config: dict[str, Any]) -> list[int]:
    """Index in `down_block_res_samples` of each down block's last resnet output (before its downsampler).
    On SD1.5 this gives [2, 5, 8, 11], on SDXL [2, 5, 8]: the paper's taps."""
    layers = _layers(unet_config)
    taps, index = [], 0
    for i, n in enumerate(layers):
        taps.append(index + n)
        index += n + (1 if i < len(layers) - 1 else 0)
    return taps


def truncate_unet(unet: nn.Module) -> nn.Module:
    """Drop what the reward model never runs: the up blocks and the output head."""
    unet.up_blocks = nn.ModuleList()
    unet.conv_norm_out = None
    unet.conv_act = None
    unet.conv_out = None
    return unet


class UNetLRMBackbone(LRMBackbone):
    """SD1.x/2.x: the truncated UNet and the CLIP text encoder; the pooled text is its pooler output."""

    text_encoders = ("text_encoder",)
    text_projected = False

    def __init__(self, unet: nn.Module, text_encoders: list[nn.Module], resolution: int,
                 tokenizers: list[Any] | None = None):
        super().__init__()
        self.unet = truncate_unet(unet)
        self.text_encoder = text_encoders[0]
        if len(text_encoders) > 1:
            self.text_encoder_2 = text_encoders[1]
        self.resolution = resolution
        self.tokenizers = tokenizers or []

    # construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_base(cls, base: str, dtype: torch.dtype = torch.float32, pretrained: bool = True,
                  depth: int | None = None, frozen_dtype: torch.dtype | None = None) -> UNetLRMBackbone:
        if pretrained:
            source, where = weight_args(base, "unet")
            unet = UNet2DConditionModel.from_pretrained(source, **where, **diffusers_dtype(dtype))
        else:
            unet = UNet2DConditionModel.from_config(read_subfolder_config(base, "unet"))
            if dtype != torch.float32:  # diffusers warns about a cast even when there is nothing to cast
                unet = unet.to(dtype)
        encoders = []
        for subfolder, encoder_class in zip(cls.text_encoders, cls._encoder_classes()):
            if pretrained:
                source, where = weight_args(base, subfolder)
                encoders.append(encoder_class.from_pretrained(source, **where, torch_dtype=dtype))
            else:
                source, where = load_args(base, subfolder)
                config = encoder_class.config_class.from_pretrained(source, **where)
                encoders.append(encoder_class(config).to(dtype))
        tokenizers = [load_tokenizer(base, name.replace("text_encoder", "tokenizer")) for name in cls.text_encoders]
        return cls(unet, encoders, pixel_resolution(dict(unet.config), base), tokenizers)

    @classmethod
    def components_from_base(cls, base: str) -> dict[str, dict[str, Any]]:
        return {name: read_subfolder_config(base, name) for name in ("unet", *cls.text_encoders)}

    @classmethod
    def from_components(cls, components: dict[str, dict[str, Any]], resolution: int, depth: int | None = None,
                        base: str | None = None) -> UNetLRMBackbone:
        unet = UNet2DConditionModel.from_config(components["unet"])
        encoders = [encoder_class(encoder_class.config_class.from_dict(components[name]))
                    for name, encoder_class in zip(cls.text_encoders, cls._encoder_classes())]
        return cls(unet, encoders, resolution)

    @staticmethod
    def _encoder_classes() -> list[type]:
        return [CLIPTextModel]

    @staticmethod
    def noise_schedule(source: str | Path, subfolder: str = "scheduler") -> Any:
        source, where = load_args(source, subfolder)
        return DDPMScheduler.from_pretrained(source, **where)

    @classmethod
    def default_timesteps(cls, source: str | Path, subfolder: str | None,
                          latent_shape: tuple[int, ...]) -> tuple[list, list]:
        return list(CANDIDATE_TIMESTEPS), list(EVAL_TIMESTEPS)

    @staticmethod
    def check_timesteps(values: list[float]) -> list[int]:
        bad = [t for t in values if not (0 <= t < 1000 and float(t).is_integer())]
        if bad or not values:
            raise InputError(f"timesteps must be non-empty integers in [0, 999]; got {bad or values}.")
        return [int(t) for t in values]

    @property
    def components(self) -> dict[str, dict[str, Any]]:
        out = {"unet": dict(self.unet.config)}
        for name in self.text_encoders:
            out[name] = getattr(self, name).config.to_dict()
        return out

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()
        for name in self.text_encoders:
            encoder = getattr(self, name)
            # transformers 5.x renamed it and deprecates the old name; >=4.46 (our floor) has only the old one
            getattr(encoder, "activation_checkpointing_enable", encoder.gradient_checkpointing_enable)()

    @property
    def encoder_names(self) -> tuple[str, ...]:
        return self.text_encoders

    # shapes -------------------------------------------------------------------------------------------------

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = int(self.unet.config.sample_size)
        return (int(self.unet.config.in_channels), side, side)

    def default_taps(self) -> list[int]:
        return default_taps(self.unet.config)

    def feature_channels(self, taps: list[int]) -> list[int]:
        available = res_channels(self.unet.config)
        for tap in taps:
            if not 0 <= tap < len(available):
                raise InputError(f"feature tap {tap} is outside the UNet's down_block_res_samples "
                                 f"(0..{len(available) - 1}); choose taps in that range.")
        return [available[tap] for tap in taps] + [self.unet.config.block_out_channels[-1]]

    @property
    def text_width(self) -> int:
        return self.text_encoder.config.hidden_size

    # forward ------------------------------------------------------------------------------------------------

    def _token_ids(self, prompts: list[str]) -> list[torch.Tensor]:
        ids = []
        for name, tokenizer in zip(self.text_encoders, self.tokenizers):
            length = min(tokenizer.model_max_length, getattr(self, name).config.max_position_embeddings)
            ids.append(tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                                 return_tensors="pt").input_ids.to(self.unet.device))
        return ids

    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Cross-attention context and the pooled text feature (the reward model projects it)."""
        (ids,) = self._token_ids(prompts)
        out = self.text_encoder(ids)
        return {"context": out.last_hidden_state, "text": out.pooler_output}

    def _added_cond(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}

    def unet_features(self, latents: torch.Tensor, timesteps: torch.Tensor,
                      cond: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The stock UNet's down_block_res_samples and mid-block output, computed without the up blocks."""
        unet, context = self.unet, cond["context"]
        emb = unet.time_embedding(unet.get_time_embed(sample=latents, timestep=timesteps))
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=self._added_cond(cond))
        if aug is not None:
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        sample = unet.conv_in(latents)
        res = [sample]
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, out = block(hidden_states=sample, temb=emb, encoder_hidden_states=context)
            else:
                sample, out = block(hidden_states=sample, temb=emb)
            res.extend(out)
        mid = unet.mid_block(sample, emb, encoder_hidden_states=context)
        return res, mid

    def trace(self, n: int, shape: Sequence[int] | None = None) -> list[torch.Tensor]:
        device = self.unet.device
        latents = torch.zeros(n, *(shape or self.latent_shape), device=device)
        return self.pooled_features(latents, torch.zeros(n, dtype=torch.long, device=device),
                                    self._blank_cond(n, device), self.default_taps())

    def _blank_cond(self, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        tokens = self.text_encoder.config.max_position_embeddings
        return {"context": torch.zeros(n, tokens, self.unet.config.cross_attention_dim, device=device)}

    def pooled_features(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor],
                        taps: list[int]) -> list[torch.Tensor]:
        res, mid = self.unet_features(latents, timesteps, cond)
        return [res[i].mean(dim=(2, 3)) for i in taps] + [mid.mean(dim=(2, 3))]


class SDXLLRMBackbone(UNetLRMBackbone):
    """SDXL: both text encoders' penultimate states as context; the second's projected embedding is the pooled text
    feature and, with the size ids, the UNet's added conditioning."""

    text_encoders = ("text_encoder", "text_encoder_2")
    text_projected = True
    unused_parameters = True  # the first text encoder feeds only its penultimate layer: its last gets no gradient

    @staticmethod
    def _encoder_classes() -> list[type]:
        return [CLIPTextModel, CLIPTextModelWithProjection]

    @property
    def text_width(self) -> int:
        return self.text_encoder_2.config.projection_dim

    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        ids, ids_2 = self._token_ids(prompts)
        first = self.text_encoder(ids, output_hidden_states=True)
        second = self.text_encoder_2(ids_2, output_hidden_states=True)
        context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return {"context": context, "text": second.text_embeds, "text_embeds": second.text_embeds}

    def _blank_cond(self, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        return super()._blank_cond(n, device) | {"text_embeds": torch.zeros(n, self.text_width, device=device)}

    def _added_cond(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        embeds = cond["text_embeds"]
        time_ids = size_ids(self.resolution, embeds.dtype, embeds.device)[0]
        return {"text_embeds": embeds, "time_ids": time_ids.expand(embeds.shape[0], 6)}


UNetGenerator.family = UNetLRMBackbone.family = get_family("sd15")
SDXLGenerator.family = SDXLLRMBackbone.family = get_family("sdxl")
