"""The Latent Reward Model (LRM): a latent diffusion model's own UNet and text encoder as a noise-aware reward model.

The visual branch runs the stock diffusers UNet's conv_in, time (and SDXL added) embeddings, down blocks and mid
block on a noisy latent x_t at timestep t; the up blocks and conv_out are dropped. The output of each down block's
last resnet (the paper's taps: 2, 5, 8, 11 on SD1.5, 2, 5, 8 on SDXL) and the mid block are average-pooled,
concatenated and projected. The text branch is the pooled text embedding (SD1.5/2.x: projected; SDXL: the second
encoder's own projection). The score is exp(logit_scale) * cos(visual, text).

Visual Feature Enhancement (VFE): the UNet also runs with the empty prompt and the pooled mid feature is guided,
m = m_uncond + g * (m_cond - m_uncond); down features come from the conditional branch (or are guided the same way
with `vfe_down=True`). One rule, used the same way in training and scoring.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curate.errors import InputError

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FAMILIES = ("sd15", "sdxl")
DEFAULT_TEXT_PROJECTION_INIT = "openai/clip-vit-large-patch14"


@dataclass
class LRMConfig:
    family: str
    base: str
    taps: list[int]
    projection_dim: int
    resolution: int
    multi_scale: bool = True
    vfe_scale: float = 7.5
    vfe_down: bool = False
    logit_scale_init: float = math.log(1 / 0.07)
    unet_config: dict[str, Any] = field(default_factory=dict)
    text_encoder_config: dict[str, Any] = field(default_factory=dict)
    text_encoder_2_config: dict[str, Any] | None = None
    latent_channels: int = 4
    vae_scaling_factor: float = 0.18215

    def to_json(self) -> str:
        return json.dumps({"lpo_model": "latent_reward_model", **asdict(self)}, indent=2, default=str) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LRMConfig:
        data = json.loads(text)
        data.pop("lpo_model", None)
        return cls(**data)


def family_of(unet_config: dict[str, Any]) -> str:
    """sdxl for a UNet with SDXL's text-and-time added conditioning, sd15 for the SD1.x/2.x layout."""
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet_config.get("addition_embed_type") is None and unet_config.get("class_embed_type") is None:
        return "sd15"
    raise InputError(
        f"UNet with addition_embed_type={unet_config.get('addition_embed_type')!r} and "
        f"class_embed_type={unet_config.get('class_embed_type')!r} is not an SD1.x/2.x or SDXL UNet; "
        "the latent reward model supports those two families."
    )


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


class LatentRewardModel(nn.Module):
    """Scores noisy latents against prompts. Build with `from_base` (a diffusers SD/SDXL pipeline) or
    `from_pretrained` (a saved LRM directory)."""

    def __init__(self, config: LRMConfig, unet: nn.Module, text_encoder: nn.Module, tokenizer: Any,
                 text_encoder_2: nn.Module | None = None, tokenizer_2: Any = None):
        super().__init__()
        self.config = config
        self.unet = unet
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        channels = self._tap_channels()
        self.visual_projection = nn.Linear(sum(channels), config.projection_dim, bias=False)
        nn.init.normal_(self.visual_projection.weight, std=0.02)
        if config.family == "sd15":
            hidden = text_encoder.config.hidden_size
            self.text_projection = nn.Linear(hidden, config.projection_dim, bias=False)
            nn.init.normal_(self.text_projection.weight, std=hidden**-0.5)
        else:
            self.text_projection = None
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.source: Path | None = None  # the directory it was loaded from (holds vae/ and scheduler/)
        self._pixel_side: dict[str, Any] = {}  # VAE and noise schedule for score_images, loaded on first use

    # ----------------------------------------------------------------------------------------------------------
    # construction

    def _tap_channels(self) -> list[int]:
        """Channels of each pooled feature, in concatenation order: taps (when multi-scale), then mid."""
        available = res_channels(self.config.unet_config)
        channels = []
        if self.config.multi_scale:
            for tap in self.config.taps:
                if not 0 <= tap < len(available):
                    raise InputError(f"feature tap {tap} is outside the UNet's down_block_res_samples "
                                     f"(0..{len(available) - 1}); choose taps in that range.")
                channels.append(available[tap])
        channels.append(self.config.unet_config["block_out_channels"][-1])
        return channels

    @classmethod
    def from_base(cls, base: str, *, taps: list[int] | None = None, multi_scale: bool = True,
                  vfe_scale: float = 7.5, vfe_down: bool = False, projection_dim: int | None = None,
                  text_projection_init: str | None = DEFAULT_TEXT_PROJECTION_INIT,
                  dtype: torch.dtype = torch.float32, pretrained: bool = True) -> LatentRewardModel:
        """Build an untrained LRM from a diffusers SD1.x/2.x or SDXL pipeline (hub id or local directory).
        With `pretrained=False` the UNet and text encoders keep the base's architecture but start from fresh
        random weights (the ablation against a diffusion-initialised backbone)."""
        from diffusers import UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        unet_config = read_unet_config(base)
        family = family_of(unet_config)
        from reward.diffusion import diffusers_dtype

        def load(cls: Any, subfolder: str) -> nn.Module:
            if pretrained:
                return cls.from_pretrained(base, subfolder=subfolder, torch_dtype=dtype)
            return cls(cls.config_class.from_pretrained(base, subfolder=subfolder)).to(dtype)

        if pretrained:
            unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", **diffusers_dtype(dtype))
        else:
            unet = UNet2DConditionModel.from_config(unet_config)
            if dtype != torch.float32:  # diffusers warns about a cast even when there is nothing to cast
                unet = unet.to(dtype)
        unet = truncate_unet(unet)
        tokenizer = AutoTokenizer.from_pretrained(base, subfolder="tokenizer")
        text_encoder = load(CLIPTextModel, "text_encoder")
        text_encoder_2 = tokenizer_2 = None
        if family == "sdxl":
            tokenizer_2 = AutoTokenizer.from_pretrained(base, subfolder="tokenizer_2")
            text_encoder_2 = load(CLIPTextModelWithProjection, "text_encoder_2")
            proj = text_encoder_2.config.projection_dim
        else:
            proj = projection_dim or text_encoder.config.hidden_size
        vae_config = read_subfolder_config(base, "vae")
        resolution = pixel_resolution(unet_config, base)
        config = LRMConfig(
            family=family, base=base,
            taps=list(taps) if taps is not None else default_taps(unet_config),
            projection_dim=proj,
            resolution=resolution,
            multi_scale=multi_scale, vfe_scale=vfe_scale, vfe_down=vfe_down,
            unet_config=dict(unet.config), text_encoder_config=text_encoder.config.to_dict(),
            text_encoder_2_config=text_encoder_2.config.to_dict() if text_encoder_2 is not None else None,
            latent_channels=int(vae_config.get("latent_channels", 4)),
            vae_scaling_factor=float(vae_config.get("scaling_factor", 0.18215)),
        )
        model = cls(config, unet, text_encoder, tokenizer, text_encoder_2, tokenizer_2).to(dtype)
        if family == "sd15" and text_projection_init:
            model.init_text_projection(text_projection_init)
        return model

    def init_text_projection(self, clip_id: str) -> None:
        """Initialise the SD1.x/2.x text projection from a CLIP model's (the paper used CLIP ViT-L/14's)."""
        from transformers import CLIPModel

        try:
            weight = CLIPModel.from_pretrained(clip_id).text_projection.weight
        except OSError as err:
            raise InputError(f"could not load the CLIP model '{clip_id}' to initialise the text projection ({err}); "
                             "pass a reachable hub id or local CLIPModel directory, or disable the init.") from err
        if tuple(weight.shape) != tuple(self.text_projection.weight.shape):
            logger.warning("text projection of %s has shape %s, the LRM needs %s: keeping a random init",
                           clip_id, tuple(weight.shape), tuple(self.text_projection.weight.shape))
            return
        with torch.no_grad():
            self.text_projection.weight.copy_(weight.to(self.text_projection.weight))

    # ----------------------------------------------------------------------------------------------------------
    # save / load

    def save_pretrained(self, directory: str | Path) -> Path:
        """config.json + model.safetensors (only the parts the model runs) + tokenizer(s)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})
        (directory / CONFIG_FILE).write_text(self.config.to_json())
        self.tokenizer.save_pretrained(directory / "tokenizer")
        if self.tokenizer_2 is not None:
            self.tokenizer_2.save_pretrained(directory / "tokenizer_2")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype = torch.float32) -> LatentRewardModel:
        """Load a saved LRM; needs nothing but the directory."""
        from accelerate import init_empty_weights
        from diffusers import UNet2DConditionModel
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        directory = Path(directory)
        config = read_lrm_config(directory)
        with init_empty_weights():
            unet = truncate_unet(UNet2DConditionModel.from_config(config.unet_config))
            text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(config.text_encoder_config))
            text_encoder_2 = None
            if config.text_encoder_2_config is not None:
                text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config.text_encoder_2_config))
            tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
            tokenizer_2 = AutoTokenizer.from_pretrained(directory / "tokenizer_2") if text_encoder_2 else None
            model = cls(config, unet, text_encoder, tokenizer, text_encoder_2, tokenizer_2)
        state = load_file(directory / WEIGHTS_FILE)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise InputError(f"{directory / WEIGHTS_FILE} does not match its config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}; re-export the model with save_pretrained.")
        _materialise_buffers(model)
        model.source = directory
        return model.to(dtype).eval()

    # ----------------------------------------------------------------------------------------------------------
    # forward

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        def ids(tokenizer: Any, encoder: nn.Module) -> torch.Tensor:
            length = min(tokenizer.model_max_length, encoder.config.max_position_embeddings)
            return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)

        out = {"input_ids": ids(self.tokenizer, self.text_encoder)}
        if self.text_encoder_2 is not None:
            out["input_ids_2"] = ids(self.tokenizer_2, self.text_encoder_2)
        return out

    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Cross-attention context, the pooled text feature (score side) and, on SDXL, the added text embeds."""
        tokens = self.tokenize(prompts)
        if self.config.family == "sd15":
            out = self.text_encoder(tokens["input_ids"])
            return {"context": out.last_hidden_state, "text": self.text_projection(out.pooler_output)}
        first = self.text_encoder(tokens["input_ids"], output_hidden_states=True)
        second = self.text_encoder_2(tokens["input_ids_2"], output_hidden_states=True)
        context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return {"context": context, "text": second.text_embeds, "text_embeds": second.text_embeds}

    def _added_cond(self, text_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        size = float(self.config.resolution)
        time_ids = torch.tensor([size, size, 0.0, 0.0, size, size], device=text_embeds.device, dtype=text_embeds.dtype)
        return {"text_embeds": text_embeds, "time_ids": time_ids.expand(text_embeds.shape[0], 6)}

    def unet_features(self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                      text_embeds: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The stock UNet's down_block_res_samples and mid-block output, computed without the up blocks."""
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=latents, timestep=timesteps))
        added = self._added_cond(text_embeds) if text_embeds is not None else {}
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added)
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

    def visual_features(self, latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor],
                        empty: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Pooled, concatenated, projected visual feature (with VFE when `empty` is given)."""
        n = latents.shape[0]
        guided = empty is not None
        if guided:
            latents = torch.cat([latents, latents])
            timesteps = torch.cat([timesteps, timesteps])
            context = torch.cat([text["context"], empty["context"].expand(n, -1, -1)])
            embeds = (torch.cat([text["text_embeds"], empty["text_embeds"].expand(n, -1)])
                      if "text_embeds" in text else None)
        else:
            context, embeds = text["context"], text.get("text_embeds")
        res, mid = self.unet_features(latents, timesteps, context, embeds)
        g = self.config.vfe_scale

        def pool(x: torch.Tensor, guide: bool) -> torch.Tensor:
            x = x.mean(dim=(2, 3))
            if not guided:
                return x
            cond, uncond = x[:n], x[n:]
            return uncond + g * (cond - uncond) if guide else cond

        feats = [pool(res[i], self.config.vfe_down) for i in self.config.taps] if self.config.multi_scale else []
        feats.append(pool(mid, True))
        return self.visual_projection(torch.cat(feats, dim=-1))

    @torch.no_grad()
    def score_images(self, images: list[Any], prompts: list[str], t: int = 1, seed: int = 0) -> torch.Tensor:
        """Encode images with the VAE saved beside the model, noise them to timestep `t` (seeded), and score."""
        from diffusers import AutoencoderKL

        from reward.latents import image_to_tensor

        if not self._pixel_side:
            if self.source is None or not (Path(self.source) / "vae").is_dir():
                raise InputError("score_images needs the VAE saved beside the model (vae/ in the directory given to "
                                 "from_pretrained); export the model with `lpo reward train`.")
            self._pixel_side["vae"] = AutoencoderKL.from_pretrained(Path(self.source) / "vae").to(self.device).eval()
            self._pixel_side["noise"] = load_noise_scheduler(self.source)
        vae, noise_scheduler = self._pixel_side["vae"], self._pixel_side["noise"]
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.stack([image_to_tensor(image, self.config.resolution) for image in images])
        posterior = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator).to(self.device)
        latents = (posterior.mean + posterior.std * eps.to(posterior.mean.dtype)) * self.config.vae_scaling_factor
        steps = torch.full((len(images),), int(t), dtype=torch.long)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        noisy = noise_scheduler.add_noise(latents.cpu().float(), noise.cpu().float(), steps)
        return self.score(noisy.to(self.device), steps.to(self.device), list(prompts))

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor | int, prompts: list[str]) -> torch.Tensor:
        """exp(logit_scale) * cos(visual(x_t, t), text(prompt)), one logit per latent."""
        return self.score(latents, timesteps, prompts)

    def score(self, latents: torch.Tensor, timesteps: torch.Tensor | int, prompts: list[str],
              text: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Score noisy latents (already VAE-scaled) at `timesteps`. `text` may hold a precomputed `encode_text`."""
        if len(prompts) != latents.shape[0]:
            raise ValueError(f"{latents.shape[0]} latents but {len(prompts)} prompts")
        if not torch.is_tensor(timesteps):
            timesteps = torch.full((latents.shape[0],), int(timesteps), dtype=torch.long, device=latents.device)
        timesteps = timesteps.to(latents.device).expand(latents.shape[0])
        text = text if text is not None else self.encode_text(prompts)
        empty = self.encode_text([""]) if self.config.vfe_scale != 1.0 else None
        visual = self.visual_features(latents.to(self.logit_scale.dtype), timesteps, text, empty)
        visual = visual / visual.norm(dim=-1, keepdim=True)
        textual = text["text"] / text["text"].norm(dim=-1, keepdim=True)
        return self.logit_scale.exp() * (visual * textual).sum(-1)


# --------------------------------------------------------------------------------------------------------------
# helpers


def _materialise_buffers(model: nn.Module) -> None:
    """Non-persistent buffers left on the meta device by init_empty_weights (e.g. CLIP position ids)."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                if name == "position_ids":
                    module._buffers[name] = torch.arange(buf.shape[-1]).expand(buf.shape)
                else:
                    raise RuntimeError(f"buffer {name} of {type(module).__name__} was not loaded")


def read_subfolder_config(base: str, subfolder: str) -> dict[str, Any]:
    """A diffusers component's config.json from a local pipeline directory or a hub id (config only)."""
    local = Path(base) / subfolder / CONFIG_FILE
    if Path(base).is_dir():
        if not local.is_file():
            raise InputError(f"{base} has no {subfolder}/{CONFIG_FILE}; give a diffusers SD1.x/2.x or SDXL pipeline "
                             "directory (with unet/, vae/, text_encoder/, tokenizer/).")
        return json.loads(local.read_text())
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(base, f"{subfolder}/{CONFIG_FILE}")).read_text())
    except Exception as err:  # hub errors come in many types; all mean "not a usable pipeline id"
        raise InputError(f"could not read {subfolder}/{CONFIG_FILE} of '{base}' ({type(err).__name__}); give a "
                         "diffusers pipeline directory or a reachable hub id.") from err


def read_unet_config(base: str) -> dict[str, Any]:
    if Path(base).is_dir() and (Path(base) / "transformer").is_dir() and not (Path(base) / "unet").is_dir():
        raise InputError(f"{base} is a transformer-based pipeline (e.g. SD3/Flux); the latent reward model supports "
                         "UNet pipelines of the SD1.x/2.x and SDXL families.")
    return read_subfolder_config(base, "unet")


def read_lrm_config(directory: Path) -> LRMConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{directory} is not a latent reward model directory (no {CONFIG_FILE}); "
                         "train one with `lpo reward train` or pass the directory it wrote.")
    data = json.loads(path.read_text())
    if data.get("lpo_model") != "latent_reward_model":
        raise InputError(f"{path} is not a latent reward model config (lpo_model={data.get('lpo_model')!r}); "
                         "pass a directory written by `lpo reward train`.")
    return LRMConfig.from_json(path.read_text())


def resolve_device(name: str = "auto") -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name} was asked for but CUDA is not available; use --device cpu.")
    return name


def load_noise_scheduler(source: str | Path) -> Any:
    """The DDPM forward process (for add_noise) of a pipeline or a saved LRM directory."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(source, subfolder="scheduler")


def export_components(directory: str | Path, base: str, vae: str | None = None) -> None:
    """Copy the VAE and the noise schedule beside a saved LRM, so scoring images needs nothing else."""
    from diffusers import AutoencoderKL, DDPMScheduler

    directory = Path(directory)
    model = AutoencoderKL.from_pretrained(vae) if vae else AutoencoderKL.from_pretrained(base, subfolder="vae")
    model.save_pretrained(directory / "vae")
    DDPMScheduler.from_pretrained(base, subfolder="scheduler").save_pretrained(directory / "scheduler")


def pixel_resolution(unet_config: dict[str, Any], base: str, vae: str | None = None) -> int:
    """The image side the UNet was trained at: latent sample_size times the VAE's downscaling factor."""
    if vae:
        from diffusers import AutoencoderKL

        vae_config = dict(AutoencoderKL.load_config(vae))
    else:
        vae_config = read_subfolder_config(base, "vae")
    return int(unet_config["sample_size"]) * 2 ** (len(vae_config["block_out_channels"]) - 1)
