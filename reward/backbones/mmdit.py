"""The flow-matching transformers: what SD3 (`sd3`: SD3-Medium, SD3.5-Medium, SD3.5-Large) and FLUX.1 (`flux`,
`flux.py`) share, and the SD3 family. Both sample with the SDE form of the flow-matching Euler step
(`lpo.reward.backbones.flow`).

Generator: the pipeline's own prompt encoding (SD3: two CLIP encoders and, where the pipeline has it, T5; without T5
the pipeline feeds zeros in its place, and so do we), classifier-free guidance on the velocity in one transformer
forward, the flow step as a Gaussian transition.

LRM backbone: the stock transformer's input and position embedding, timestep + pooled-text embedding, context
embedder and its first `depth` joint (double-stream) blocks; the later blocks and the output head are neither built
nor run. Taps are the image tokens after given blocks (1-based: tap 6 is the output of the 6th block), mean-pooled
over tokens; the deepest block run is always the last feature. The pooled text feature is the pooled vector the
generator itself gets, projected by the reward model. The text encoders stay frozen (as the paper's SD3 LRM; T5-XXL
alone has 4.7B parameters) and live outside the module.
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import SD3Transformer2DModel
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from lpo.core.errors import InputError
from lpo.core.refs import weight_args
from lpo.reward.backbones import flow
from lpo.reward.backbones.base import Conditioning, Generator, LRMBackbone, StepStats, classifier_free, load_tokenizer
from lpo.reward.backbones.family import (
    diffusers_dtype,
    get_family,
    has_subfolder,
    pixel_resolution,
    read_subfolder_config,
)
from lpo.reward.images import to_pil

T5_MAX_LENGTH = 256  # the SD3 pipeline's default max_sequence_length
SD3_TEXT_TOKENS = 77 + T5_MAX_LENGTH  # the conditioning sequence: CLIP's 77 tokens, then T5's
CLIP_ENCODERS = ("text_encoder", "text_encoder_2")
T5_ENCODER = "text_encoder_3"



def t5_tokens(tokenizer: Any) -> int:
    """T5's share of the conditioning sequence: the pipeline's default 256, or fewer where the T5 tokenizer declares
    a shorter `model_max_length` (the toy world's T5 reads 8 tokens; T5 tokenizers declare 512). Without T5 the
    pipeline feeds 256 zero tokens in its place."""
    if tokenizer is None:
        return T5_MAX_LENGTH
    return min(T5_MAX_LENGTH, int(tokenizer.model_max_length))


# ---------------------------------------------------------------------------------------------------------------
# generator


class FlowGenerator(Generator):
    """What the flow-matching families share: the grid, the stochastic step (`sde` or `cps`, `flow.SAMPLERS`), the
    VAE's shift and scale."""

    scheduler_class = "FlowMatchEulerDiscreteScheduler"

    @property
    def transformer(self) -> nn.Module:
        return self.pipeline.transformer

    linear_sigmas = False  # the pipeline's grid: the scheduler's own (SD3), or sigmas linspace(1, 1/N, N) (FLUX)

    def image_tokens(self) -> int:
        """Tokens of one image at the native resolution (what a dynamic shift depends on): 2x2 latent patches, the
        SD3 patch embedding's and FLUX's packing alike."""
        _, height, width = self.latent_shape
        return (height // 2) * (width // 2)

    def timesteps(self, steps: int) -> list[float]:
        return flow.set_grid(self.scheduler, steps, self.image_tokens(), self.linear_sigmas)

    def clean_timestep(self) -> float:
        """The smallest non-zero timestep of the LRM's 20-step grid (sigma 0.0089 on SD3's)."""
        scheduler = copy.deepcopy(self.scheduler)
        return flow.lrm_timesteps(scheduler, self.image_tokens(), self.linear_sigmas)[0][0]

    def initial_latents(self, generators: list[torch.Generator]) -> torch.Tensor:
        shape = self.latent_shape
        return torch.stack([torch.randn(shape, generator=g) for g in generators])  # sigma = 1: pure noise

    def step(self, output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor,
             noise_level: float) -> StepStats:
        return flow.step_stats(self.scheduler, output, timesteps, sample, noise_level, self.sampler)

    def step_stds(self, noise_level: float) -> tuple[list[float], torch.Tensor]:
        index = flow.trained_steps(self.scheduler)
        return self.scheduler.timesteps[index].tolist(), flow.step_std(self.scheduler, index, noise_level,
                                                                        self.sampler)

    def noise_sigmas(self, timesteps: list[float]) -> torch.Tensor:
        """The forward process's noise share at each timestep: sigma = timestep / 1000."""
        return torch.as_tensor(timesteps, dtype=torch.float64) / flow.NUM_TRAIN_TIMESTEPS

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Any]:
        vae = self.vae
        shift = vae.config.get("shift_factor", 0.0) or 0.0
        return to_pil(vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample)


class SD3Generator(FlowGenerator):
    """An SD3 / SD3.5 pipeline: CFG on the velocity, the pooled CLIP vector beside the token sequence."""

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Exactly the pipeline's own encoding: the empty negative prompt through every encoder."""
        cond, uncond, pooled, uncond_pooled = self.pipeline.encode_prompt(
            prompts, None, None, device=self.device, do_classifier_free_guidance=True,
            max_sequence_length=t5_tokens(getattr(self.pipeline, "tokenizer_3", None)))
        return Conditioning(cond, uncond, pooled, uncond_pooled)

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, guidance: float,
                denoiser: Any = None, detach_uncond: bool = False) -> torch.Tensor:
        """v_uncond + guidance * (v_cond - v_uncond), both halves in one transformer forward."""
        transformer = denoiser if denoiser is not None else self.transformer
        n = latents.shape[0]
        latents = latents.to(self.dtype)
        timesteps = timesteps.to(latents.device, torch.float32).expand(n)
        if guidance == 1.0:
            return transformer(hidden_states=latents, encoder_hidden_states=cond.context,
                               pooled_projections=cond.pooled, timestep=timesteps).sample
        out = transformer(hidden_states=torch.cat([latents, latents]),
                          encoder_hidden_states=torch.cat([cond.uncond_context, cond.context]),
                          pooled_projections=torch.cat([cond.uncond_pooled, cond.pooled]),
                          timestep=torch.cat([timesteps, timesteps])).sample
        return classifier_free(out, guidance, detach_uncond)

    @classmethod
    def trace(cls, denoiser: nn.Module, n: int, side: int | None = None) -> torch.Tensor:
        config, device = denoiser.config, denoiser.device
        side = side or int(config.sample_size)
        return denoiser(hidden_states=torch.zeros(n, config.in_channels, side, side, device=device),
                        encoder_hidden_states=torch.zeros(n, SD3_TEXT_TOKENS, config.joint_attention_dim,
                                                          device=device),
                        pooled_projections=torch.zeros(n, config.pooled_projection_dim, device=device),
                        timestep=torch.zeros(n, device=device)).sample

    def save_lora(self, directory: str | Path, layers: dict[str, torch.Tensor],
                  metadata: dict[str, Any] | None = None) -> None:
        """In PEFT naming, as diffusers' SD3 training scripts save: `convert_state_dict_to_diffusers` would rename
        only the `to_q/k/v/out` layers to the old UNet naming, which the SD3 loader then silently drops."""
        type(self.pipeline).save_lora_weights(directory, transformer_lora_layers=layers, safe_serialization=True,
                                              transformer_lora_adapter_metadata=metadata)


# ---------------------------------------------------------------------------------------------------------------
# latent reward model backbone


def encode_sd3_prompts(tokenizers: list[Any], encoders: list[nn.Module], prompts: list[str], joint_dim: int,
                       device: torch.device, dtype: torch.dtype,
                       max_sequence_length: int = T5_MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """(token sequence [B, 77 + T, joint_dim], pooled [B, 2 x CLIP projection]) as `StableDiffusion3Pipeline.
    encode_prompt` computes them: each CLIP's penultimate states (channels concatenated, zero-padded to the joint
    width) then T5's (zeros when the pipeline has no T5); the pooled vector is both CLIPs' projections."""
    sequences, pooled = [], []
    for tokenizer, encoder in zip(tokenizers[:2], encoders[:2]):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        pooled.append(out[0])
        sequences.append(out.hidden_states[-2])
    clip = torch.cat(sequences, dim=-1)
    clip = nn.functional.pad(clip, (0, joint_dim - clip.shape[-1]))
    if len(encoders) > 2:
        ids = tokenizers[2](prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids.to(device)
        t5 = encoders[2](ids)[0]
    else:
        t5 = torch.zeros(len(prompts), max_sequence_length, joint_dim, device=device, dtype=dtype)
    return torch.cat([clip.to(t5.dtype), t5], dim=-2), torch.cat(pooled, dim=-1)


class MMDiTLRMBackbone(LRMBackbone):
    """A flow-matching transformer's first `depth` joint blocks, and its frozen text encoders.

    The text encoders never train, so they are not part of the module: not saved with the reward model (T5-XXL alone
    is 9.5 GB in bf16), not wrapped by DDP or FSDP, not in checkpoints. They are the base pipeline's own, loaded
    from `base` (hub id or folder) on first use, and they follow the module's `.to()`."""

    text_projected = False
    frozen_text = True
    transformer_class: str  # the diffusers class
    text_tokens: int  # the conditioning's sequence length

    def __init__(self, transformer: nn.Module, resolution: int, depth: int, base: str,
                 encoder_configs: dict[str, dict[str, Any]], tokenizers: list[Any] | None = None,
                 encoders: dict[str, nn.Module] | None = None):
        super().__init__()
        self.transformer = self.truncate(transformer, depth)
        self.resolution = resolution
        self.depth = depth
        self.base = base
        self.encoder_configs = dict(encoder_configs)  # pipeline subfolder -> config, in the pipeline's order
        self.tokenizers = tokenizers or []
        self.checkpointing = False
        self._encoders = encoders  # a plain dict: not registered as submodules
        if encoders is not None:
            self._freeze(encoders)

    @staticmethod
    def _freeze(encoders: dict[str, nn.Module]) -> None:
        for encoder in encoders.values():
            encoder.requires_grad_(False).eval()

    # what each family defines -------------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def _encoder_names(cls, base: str) -> list[str]:
        """The text encoders' pipeline subfolders, in the pipeline's order."""

    @staticmethod
    @abstractmethod
    def _encoder_class(name: str) -> type: ...

    @staticmethod
    @abstractmethod
    def default_depth(config: dict[str, Any]) -> int:
        """The joint blocks an LRM runs when --depth is not given."""

    @staticmethod
    @abstractmethod
    def truncate(transformer: nn.Module, depth: int) -> nn.Module:
        """The transformer without its blocks after `depth` and its output head."""

    @classmethod
    @abstractmethod
    def truncated_transformer(cls, config: dict[str, Any], depth: int) -> nn.Module:
        """A truncated transformer built from its config (fresh weights), never built whole."""

    @abstractmethod
    def block_outputs(self, latents: torch.Tensor, timesteps: torch.Tensor,
                      cond: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Image tokens [B, L, D] after each block run, as the stock transformer's forward computes them."""

    # construction -------------------------------------------------------------------------------------------

    @classmethod
    def load_encoders(cls, base: str, names: list[str], dtype: torch.dtype) -> dict[str, nn.Module]:
        return {name: cls._encoder_class(name).from_pretrained(source, **where, torch_dtype=dtype)
                for name in names for source, where in [weight_args(base, name)]}

    @classmethod
    def from_base(cls, base: str, dtype: torch.dtype = torch.float32, pretrained: bool = True,
                  depth: int | None = None, frozen_dtype: torch.dtype | None = None) -> MMDiTLRMBackbone:
        """`pretrained=False` starts the transformer from fresh weights; the frozen text encoders are the base's
        either way, in `frozen_dtype` (default `dtype`)."""

        config = read_subfolder_config(base, "transformer")
        depth = depth or cls.default_depth(config)
        if pretrained:
            transformer_class = getattr(diffusers, cls.transformer_class)
            source, where = weight_args(base, "transformer")
            transformer = cls.truncate(transformer_class.from_pretrained(source, **where, **diffusers_dtype(dtype)),
                                       depth)
        else:
            transformer = cls.truncated_transformer(config, depth).to(dtype)
        names = cls._encoder_names(base)
        tokenizers = [load_tokenizer(base, name.replace("text_encoder", "tokenizer")) for name in names]
        encoders = cls.load_encoders(base, names, frozen_dtype or dtype)
        configs = {name: encoder.config.to_dict() for name, encoder in encoders.items()}
        return cls(transformer, pixel_resolution(config, base), depth, base, configs, tokenizers, encoders)

    @classmethod
    def components_from_base(cls, base: str) -> dict[str, dict[str, Any]]:
        return {name: read_subfolder_config(base, name) for name in ("transformer", *cls._encoder_names(base))}

    @classmethod
    def from_components(cls, components: dict[str, dict[str, Any]], resolution: int, depth: int | None = None,
                        base: str | None = None) -> MMDiTLRMBackbone:
        config = components["transformer"]
        depth = depth or cls.default_depth(config)
        configs = {name: part for name, part in components.items() if name != "transformer"}
        return cls(cls.truncated_transformer(config, depth), resolution, depth, base or "", configs)

    @staticmethod
    def noise_schedule(source: str | Path, subfolder: str = "scheduler") -> Any:
        return flow.FlowNoise.from_pretrained(source, subfolder)

    @classmethod
    def default_timesteps(cls, source: str | Path, subfolder: str | None,
                          latent_shape: tuple[int, ...]) -> tuple[list, list]:
        """(training, evaluation) timesteps from the scheduler at `source` for latents of `latent_shape`."""
        _, height, width = latent_shape
        return flow.lrm_timesteps(cls.noise_schedule(source, subfolder).scheduler, (height // 2) * (width // 2),
                                  cls.family.generator.linear_sigmas)  # the grid the family samples on

    @staticmethod
    def check_timesteps(values: list[float]) -> list[float]:
        return flow.check_timesteps(values)

    @property
    def components(self) -> dict[str, dict[str, Any]]:
        return {"transformer": dict(self.transformer.config), **self.encoder_configs}

    def external_components(self) -> dict[str, dict[str, Any]]:
        return dict(self.encoder_configs)

    @property
    def encoder_names(self) -> tuple[str, ...]:
        return tuple(self.encoder_configs)

    @property
    def encoders(self) -> list[nn.Module]:
        """The base's frozen text encoders, loaded on first use where the module is."""
        if self._encoders is None:
            if not self.base:
                raise InputError("this reward model names no base pipeline to load its frozen text encoders from; "
                                 "build it with LatentRewardModel.from_base.")
            dtype, device = self.transformer.dtype, self.transformer.device
            try:
                encoders = self.load_encoders(self.base, list(self.encoder_names), dtype)
            except OSError as err:
                raise InputError(f"could not load the frozen text encoders of {self.base}, which this reward model "
                                 f"reads prompts with ({err}); make the base pipeline reachable (its folder, or the "
                                 "hub id cached).") from None
            self._freeze(encoders)
            self._encoders = {name: encoder.to(device) for name, encoder in encoders.items()}
        return [self._encoders[name] for name in self.encoder_names]

    def release_encoders(self) -> None:
        """Drop the loaded text encoders (T5-XXL alone holds 9.5 GB in bf16); the next prompt loads them again."""
        self._encoders = None

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> MMDiTLRMBackbone:
        super()._apply(fn, *args, **kwargs)
        for encoder in (self._encoders or {}).values():  # moved and cast with the module
            encoder._apply(fn, *args, **kwargs)
        return self

    def enable_gradient_checkpointing(self) -> None:
        self.checkpointing = True

    def run_block(self, block: nn.Module, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One joint block, checkpointed while training with gradient checkpointing on."""
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, use_reentrant=False, **inputs)
        return block(**inputs)

    # shapes -------------------------------------------------------------------------------------------------

    @property
    def width(self) -> int:
        config = self.transformer.config
        return int(config.num_attention_heads * config.attention_head_dim)

    def default_taps(self) -> list[int]:
        """A third and two thirds of the way to the deepest block (with the default depth of SD3-Medium: 6, 12,
        and 18 as the deepest)."""
        return sorted({tap for tap in (round(self.depth / 3), round(2 * self.depth / 3)) if 1 <= tap < self.depth})

    def feature_channels(self, taps: list[int]) -> list[int]:
        for tap in taps:
            if not 1 <= tap <= self.depth:
                raise InputError(f"feature tap {tap} is not one of the LRM's joint blocks (1..{self.depth}, "
                                 "1-based); choose taps in that range or a larger --depth.")
        return [self.width] * (len(taps) + 1)

    @property
    def text_width(self) -> int:
        return int(self.transformer.config.pooled_projection_dim)

    def conditioning(self, context: torch.Tensor, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """The transformer's conditioning and the text feature (the pooled vector), in the module's dtype: the
        frozen encoders may run in a lower precision than the trained parts."""
        dtype = self.transformer.dtype
        return {"context": context.to(dtype), "pooled": pooled.to(dtype), "text": pooled.to(dtype)}

    def trace(self, n: int, shape: Sequence[int] | None = None) -> list[torch.Tensor]:
        device = self.transformer.device
        config = self.transformer.config
        latents = torch.zeros(n, *(shape or self.latent_shape), device=device)
        cond = {"context": torch.zeros(n, self.text_tokens, config.joint_attention_dim, device=device),
                "pooled": torch.zeros(n, config.pooled_projection_dim, device=device)}
        return self.pooled_features(latents, torch.zeros(n, device=device), cond, self.default_taps())

    def pooled_features(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor],
                        taps: list[int]) -> list[torch.Tensor]:
        outputs = self.block_outputs(latents, timesteps, cond)
        return [outputs[tap - 1].mean(dim=1) for tap in taps] + [outputs[-1].mean(dim=1)]


class SD3LRMBackbone(MMDiTLRMBackbone):
    """SD3 / SD3.5: the first `depth` joint blocks of `SD3Transformer2DModel`; CLIP-L, CLIP-G (and T5) frozen."""

    transformer_class = "SD3Transformer2DModel"
    text_tokens = SD3_TEXT_TOKENS
    own_text_projection = True

    @classmethod
    def _encoder_names(cls, base: str) -> list[str]:
        return [*CLIP_ENCODERS, *([T5_ENCODER] if has_subfolder(base, T5_ENCODER) else [])]

    @staticmethod
    def _encoder_class(name: str) -> type:
        return T5EncoderModel if name == T5_ENCODER else CLIPTextModelWithProjection

    @staticmethod
    def default_depth(config: dict[str, Any]) -> int:
        """Three quarters of the joint blocks (18 of SD3-Medium's 24: the paper's SD3 LRM read its visual features
        at the 18th layer)."""
        return max(1, round(0.75 * int(config["num_layers"])))

    @staticmethod
    def truncate(transformer: nn.Module, depth: int) -> nn.Module:
        transformer.transformer_blocks = transformer.transformer_blocks[:depth]
        transformer.norm_out = None
        transformer.proj_out = None
        return transformer

    @classmethod
    def truncated_transformer(cls, config: dict[str, Any], depth: int) -> nn.Module:
        """Only the first `depth` joint blocks and no output head, never the whole model. Blocks before the model's
        last are built as the stock model builds them (the stock model's last block updates the image stream
        only)."""

        layers = int(config["num_layers"])
        model = SD3Transformer2DModel.from_config({**config, "num_layers": depth if depth == layers else depth + 1})
        model.register_to_config(num_layers=layers)  # the config stays the stock model's
        return cls.truncate(model, depth)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        config = self.transformer.config
        side = int(config.sample_size)
        return (int(config.in_channels), side, side)

    @property
    def projection_dim(self) -> int:
        """The joint space's width by default: CLIP-G's projection (1280), which the text projection starts as."""
        return int(self.encoder_configs["text_encoder_2"]["projection_dim"])

    def text_projection_init(self, projection_dim: int) -> torch.Tensor:
        """[projection_dim, 2 x CLIP width]: the identity on the CLIP-G half of the pooled vector, so the text
        feature starts as CLIP-G's own projected embedding (the pooled text SDXL's LRM compares with)."""
        first = int(self.encoder_configs["text_encoder"]["projection_dim"])
        weight = torch.zeros(projection_dim, self.text_width)
        span = min(projection_dim, self.text_width - first)
        weight[:span, first:first + span] = torch.eye(span)
        return weight

    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The transformer's conditioning (token sequence and pooled vector) and the pooled vector as the text
        feature. The encoders are frozen: no graph is kept."""
        device = self.transformer.device
        with torch.no_grad():
            context, pooled = encode_sd3_prompts(self.tokenizers, self.encoders, prompts,
                                                 int(self.transformer.config.joint_attention_dim), device,
                                                 self.transformer.dtype,
                                                 t5_tokens(self.tokenizers[2] if len(self.tokenizers) > 2 else None))
        return self.conditioning(context, pooled)

    def block_outputs(self, latents: torch.Tensor, timesteps: torch.Tensor,
                      cond: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        transformer = self.transformer
        hidden = transformer.pos_embed(latents).contiguous()
        temb = transformer.time_text_embed(timesteps.to(hidden.dtype), cond["pooled"].to(hidden.dtype))
        context = transformer.context_embedder(cond["context"].to(hidden.dtype))
        outputs = []
        for block in transformer.transformer_blocks:
            context, hidden = self.run_block(block, hidden_states=hidden, encoder_hidden_states=context, temb=temb)
            outputs.append(hidden)
        return outputs


SD3Generator.family = SD3LRMBackbone.family = get_family("sd3")
