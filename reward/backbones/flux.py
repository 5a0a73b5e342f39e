"""The FLUX.1 family (`flux`: `FluxPipeline` / `FluxTransformer2DModel`), sampled with the SDE form of the
flow-matching Euler step (`lpo.reward.backbones.flow`).

FLUX.1-dev is guidance-distilled: it has no unconditional branch. Sampling, the LPO loss and the reward model run
one transformer forward with the guidance value fed to the model's guidance embedder (`--guidance`, default 3.5,
the pipeline's); there is no classifier-free guidance. Latents are [16, H, W] everywhere in the toolkit and are
packed into 2x2 patches ([H/2 x W/2, 64] tokens) only for the transformer; the step is elementwise, so packing does
not change it. The grid is the pipeline's: sigmas linspace(1, 1/N, N) shifted by the image's token count.

FLUX.1-schnell is timestep-distilled (no guidance embedder): its velocity is trained to jump to the image in a few
steps, not to follow the probability flow, so the SDE built on it does not keep the model's marginals and its step
likelihood is not the sampler's. `lpo optimize flux` refuses it; scoring, sampling and evaluation take it.

LRM backbone: the first `depth` double-stream blocks (default all 19 of FLUX.1, none of the single-stream ones, as
DiNa-LRM reads FLUX), the image tokens after the taps mean-pooled; the text feature is CLIP-L's pooled output (not
projected in FLUX), projected by the reward model from a CLIP model's text projection, as for SD1.x/2.x. The
timestep and the guidance reach the embedders scaled as the stock forward scales them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from torch import nn
from transformers import CLIPTextModel, T5EncoderModel

from lpo.core.errors import InputError
from lpo.reward.backbones.base import Conditioning
from lpo.reward.backbones.family import get_family, read_subfolder_config
from lpo.reward.backbones.mmdit import FlowGenerator, MMDiTLRMBackbone

T5_MAX_LENGTH = 512  # the FLUX pipeline's default max_sequence_length
DEFAULT_GUIDANCE = 3.5  # FLUX.1-dev's pipeline default; the LRM reads every latent at it
DEFAULT_SIDE = 128  # latent side when planning on a config alone (the pipeline's 1024 px)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 x W/2, 4C]: 2x2 patches into channels, as `FluxPipeline._pack_latents`."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack` for latents of side height x width."""
    b, _, channels = tokens.shape
    x = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, height, width)


def image_ids(height: int, width: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """[(H/2)(W/2), 3] position ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def guidance_input(config: Any, value: float, n: int, device: Any) -> torch.Tensor | None:
    """The guidance the model's embedder takes (None for a model without one, FLUX.1-schnell)."""
    return torch.full((n,), float(value), device=device) if config.guidance_embeds else None


class FluxGenerator(FlowGenerator):
    """A FLUX.1 pipeline: one forward per step with the embedded guidance, no CFG."""

    linear_sigmas = True
    classifier_free = False

    @property
    def native_resolution(self) -> int:
        return int(self.vae.config.sample_size)  # FLUX's transformer config names no sample size

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels) // 4  # 2x2 patches packed into channels

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """The pipeline's own encoding: T5's token sequence and CLIP-L's pooled output (no negative prompt)."""
        context, pooled, _ = self.pipeline.encode_prompt(prompts, None, device=self.device,
                                                         max_sequence_length=T5_MAX_LENGTH)
        return Conditioning(context, None, pooled, None)

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, guidance: float,
                denoiser: Any = None, detach_uncond: bool = False) -> torch.Tensor:
        """The velocity at the embedded guidance `guidance` (the model's forward takes sigma = timestep / 1000)."""
        transformer = denoiser if denoiser is not None else self.transformer
        n, _, height, width = latents.shape
        device = latents.device
        tokens = pack(latents.to(self.dtype))
        out = transformer(hidden_states=tokens, timestep=timesteps.to(device, torch.float32).expand(n) / 1000,
                          guidance=guidance_input(self.transformer.config, guidance, n, device),
                          pooled_projections=cond.pooled, encoder_hidden_states=cond.context,
                          txt_ids=torch.zeros(cond.context.shape[1], 3, device=device, dtype=self.dtype),
                          img_ids=image_ids(height, width, device, self.dtype)).sample
        return unpack(out, height, width)

    @classmethod
    def trace(cls, denoiser: nn.Module, n: int, side: int | None = None) -> torch.Tensor:
        config, device = denoiser.config, denoiser.device
        side = side or DEFAULT_SIDE
        return denoiser(hidden_states=torch.zeros(n, (side // 2) ** 2, config.in_channels, device=device),
                        timestep=torch.zeros(n, device=device),
                        guidance=guidance_input(config, DEFAULT_GUIDANCE, n, device),
                        pooled_projections=torch.zeros(n, config.pooled_projection_dim, device=device),
                        encoder_hidden_states=torch.zeros(n, T5_MAX_LENGTH, config.joint_attention_dim,
                                                          device=device),
                        txt_ids=torch.zeros(T5_MAX_LENGTH, 3, device=device),
                        img_ids=image_ids(side, side, device, torch.float32)).sample

    @staticmethod
    def check_lpo(base: str) -> None:
        """FLUX.1-schnell (no guidance embedder: timestep-distilled) has no meaningful step likelihood."""

        if not read_subfolder_config(base, "transformer").get("guidance_embeds", False):
            raise InputError(f"{base} is a timestep-distilled FLUX model (no guidance embedder, as FLUX.1-schnell): "
                             "its velocity jumps towards the image in a few steps instead of following the "
                             "probability flow, so the SDE step LPO trains on would not be the model's sampler. "
                             "Use a guidance-distilled FLUX.1 such as black-forest-labs/FLUX.1-dev.")

    def save_lora(self, directory: str | Path, layers: dict[str, torch.Tensor],
                  metadata: dict[str, Any] | None = None) -> None:
        """In PEFT naming, as diffusers' FLUX training scripts save."""
        type(self.pipeline).save_lora_weights(directory, transformer_lora_layers=layers, safe_serialization=True,
                                              transformer_lora_adapter_metadata=metadata)


class FluxLRMBackbone(MMDiTLRMBackbone):
    """FLUX.1: the first `depth` double-stream blocks of `FluxTransformer2DModel`; CLIP-L and T5 frozen."""

    transformer_class = "FluxTransformer2DModel"
    text_tokens = T5_MAX_LENGTH

    @classmethod
    def _encoder_names(cls, base: str) -> list[str]:
        return ["text_encoder", "text_encoder_2"]

    @staticmethod
    def _encoder_class(name: str) -> type:
        return T5EncoderModel if name == "text_encoder_2" else CLIPTextModel

    @staticmethod
    def default_depth(config: dict[str, Any]) -> int:
        """Every double-stream block (19 in FLUX.1), none of the single-stream ones."""
        return int(config["num_layers"])

    @staticmethod
    def truncate(transformer: nn.Module, depth: int) -> nn.Module:
        transformer.transformer_blocks = transformer.transformer_blocks[:depth]
        transformer.single_transformer_blocks = nn.ModuleList()
        transformer.norm_out = None
        transformer.proj_out = None
        return transformer

    @classmethod
    def truncated_transformer(cls, config: dict[str, Any], depth: int) -> nn.Module:
        model = FluxTransformer2DModel.from_config({**config, "num_layers": depth, "num_single_layers": 0})
        model.register_to_config(num_layers=config["num_layers"], num_single_layers=config["num_single_layers"])
        return model

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // 8
        return (int(self.transformer.config.in_channels) // 4, side, side)

    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """T5's token sequence (the transformer's context) and CLIP-L's pooled output (its pooled input and the
        text feature), as `FluxPipeline.encode_prompt` computes them."""
        clip_tokenizer, t5_tokenizer = self.tokenizers
        clip, t5 = self.encoders
        device = self.transformer.device
        with torch.no_grad():
            ids = clip_tokenizer(prompts, padding="max_length", max_length=clip_tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(device)
            pooled = clip(ids, output_hidden_states=False).pooler_output
            ids = t5_tokenizer(prompts, padding="max_length", max_length=T5_MAX_LENGTH, truncation=True,
                               return_tensors="pt").input_ids.to(device)
            context = t5(ids, output_hidden_states=False)[0]
        return self.conditioning(context, pooled)

    def block_outputs(self, latents: torch.Tensor, timesteps: torch.Tensor,
                      cond: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The stock forward's double-stream part. `timesteps` are sigma x 1000: what the stock forward makes of
        the sigma the pipeline passes; the guidance likewise reaches the embedder x 1000."""
        transformer = self.transformer
        config = transformer.config
        n, _, height, width = latents.shape
        hidden = transformer.x_embedder(pack(latents))
        dtype, device = hidden.dtype, hidden.device
        guidance = guidance_input(config, DEFAULT_GUIDANCE, n, device)
        pooled = cond["pooled"].to(dtype)
        steps = timesteps.to(dtype)
        if guidance is None:
            temb = transformer.time_text_embed(steps, pooled)
        else:
            temb = transformer.time_text_embed(steps, guidance.to(dtype) * 1000, pooled)
        context = transformer.context_embedder(cond["context"].to(dtype))
        ids = torch.cat([torch.zeros(context.shape[1], 3, device=device, dtype=dtype),
                         image_ids(height, width, device, dtype)])
        rotary = transformer.pos_embed(ids)
        outputs = []
        for block in transformer.transformer_blocks:
            context, hidden = self.run_block(block, hidden_states=hidden, encoder_hidden_states=context, temb=temb,
                                             image_rotary_emb=rotary)
            outputs.append(hidden)
        return outputs


FluxGenerator.family = FluxLRMBackbone.family = get_family("flux")
