"""The Latent Reward Model (LRM): a latent diffusion model's own denoiser and text encoders as a noise-aware reward
model that scores noisy latents at any timestep.

The family's backbone (`lpo.reward.backbones`) reads a noisy latent x_t at timestep t through its denoiser,
truncated after the last tapped layer, and returns pooled features at the taps and at the deepest layer it runs
(UNets: the down blocks' last resnets and the mid block). They are concatenated and projected; the text side is the
pooled text feature (projected here when the family's is not already in a joint space). The score is
exp(logit_scale) * cos(visual, text).

Visual Feature Enhancement (VFE): the backbone also runs with the empty prompt and the deepest feature is guided,
m = m_uncond + g * (m_cond - m_uncond); the tapped features come from the conditional branch (or are guided the same
way with `vfe_down=True`). One rule, used the same way in training and scoring.

Saved as a diffusers model (`config.json` + `diffusion_pytorch_model.safetensors`, only the parts that run) with
its tokenizers, and beside them the VAE and noise schedule it was trained with (`vae/`, `scheduler/`), so
`LatentRewardModel.from_pretrained(folder or hub id)` needs nothing else.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPModel

from lpo.core.errors import InputError
from lpo.core.refs import ModelRef, hub_file, is_path_like, weight_args
from lpo.reward.backbones import diffusers_dtype, family_of, get_family, read_subfolder_config
from lpo.reward.backbones.base import LRMBackbone
from lpo.reward.backbones.family import check_resolution
from lpo.reward.images import image_to_tensor

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CLASS_NAME = "LatentRewardModel"
DEFAULT_TEXT_PROJECTION_INIT = "openai/clip-vit-large-patch14"
RUN_SUBFOLDERS = ("best", "last")  # where `lpo reward train` exports the model in its run directory


def latent_shape_at(backbone: LRMBackbone, family: Any, base: str, resolution: int | None) -> list[int]:
    """The [C, H, W] latents an LRM on `backbone` reads at image side `resolution` (checked against the pipeline;
    None: the base's own side), the backbone's resolution set to it."""
    latent_shape = list(backbone.latent_shape)
    if resolution is not None:
        vae_config = read_subfolder_config(base, "vae")
        check_resolution(resolution, family, read_subfolder_config(base, family.denoiser), vae_config)
        side = resolution // 2 ** (len(vae_config["block_out_channels"]) - 1)
        backbone.resolution, latent_shape = resolution, [latent_shape[0], side, side]
    return latent_shape


class LatentRewardModel(ModelMixin, ConfigMixin):
    """Scores noisy latents against prompts. Build with `from_base` (a diffusers pipeline of a supported family) or
    `from_pretrained` (a saved LRM: a local folder or a hub id)."""

    config_name = CONFIG_FILE
    ignore_for_config = ["backbone"]

    @register_to_config
    def __init__(self, family: str, base: str, taps: list[int], projection_dim: int, resolution: int,
                 components: dict[str, dict[str, Any]], multi_scale: bool = True, vfe_scale: float = 7.5,
                 vfe_down: bool = False, logit_scale_init: float = math.log(1 / 0.07),
                 latent_shape: tuple[int, ...] = (4, 64, 64), vae_scaling_factor: float = 0.18215,
                 vae_shift_factor: float = 0.0, depth: int | None = None, backbone: LRMBackbone | None = None):
        super().__init__()
        family_adapter = get_family(family).lrm_backbone
        self.backbone = backbone if backbone is not None else family_adapter.from_components(components, resolution,
                                                                                              depth, base)
        channels = self.backbone.feature_channels(self.feature_taps)
        self.visual_projection = nn.Linear(sum(channels), projection_dim, bias=False)
        nn.init.normal_(self.visual_projection.weight, std=0.02)
        if self.backbone.text_projected:
            self.text_projection = None
        else:
            width = self.backbone.text_width
            self.text_projection = nn.Linear(width, projection_dim, bias=False)
            nn.init.normal_(self.text_projection.weight, std=width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.source: tuple[str, str | None] | None = None  # (folder or hub id, subfolder) it was loaded from
        self._pixel_side: dict[str, Any] = {}  # VAE and noise schedule for score_images, loaded on first use
        self._empty: dict[str, torch.Tensor] | None = None  # the empty prompt's encoding, while it cannot change

    @property
    def feature_taps(self) -> list[int]:
        """The taps whose pooled features enter the score besides the deepest one (none without multi-scale)."""
        return list(self.config.taps) if self.config.multi_scale else []

    # ----------------------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_base(cls, base: str, *, taps: list[int] | None = None, multi_scale: bool = True,
                  vfe_scale: float = 7.5, vfe_down: bool = False, projection_dim: int | None = None,
                  text_projection_init: str | None = DEFAULT_TEXT_PROJECTION_INIT,
                  dtype: torch.dtype = torch.float32, pretrained: bool = True,
                  depth: int | None = None, frozen_dtype: torch.dtype | None = None,
                  resolution: int | None = None) -> LatentRewardModel:
        """Build an untrained LRM from a diffusers pipeline (hub id or local directory). With `pretrained=False` the
        backbone keeps the base's architecture but starts from fresh random weights (the ablation against a
        diffusion-initialised backbone). `text_projection_init` initialises a text projection (families whose pooled
        text is not projected and who bring no initial projection of their own: SD1.x/2.x) from a CLIP model's (the
        paper used CLIP ViT-L/14's). `depth`: the blocks a transformer family's backbone runs. `frozen_dtype`: the
        dtype of parts that never train and are kept outside the module (SD3's and FLUX's text encoders; the
        trainer's half precision, so T5-XXL takes 9.5 GB instead of 19). `resolution`: the image side it reads
        (default: the base's own); its latents are that side over the VAE's downscaling."""
        family = family_of(base)
        backbone = family.lrm_backbone.from_base(base, dtype=dtype, pretrained=pretrained, depth=depth,
                                                 frozen_dtype=frozen_dtype)
        vae_config = read_subfolder_config(base, "vae")
        latent_shape = latent_shape_at(backbone, family, base, resolution)
        text_dim = backbone.text_width if backbone.text_projected else (projection_dim or backbone.projection_dim)
        model = cls(
            family=family.name, base=base, taps=list(taps) if taps is not None else backbone.default_taps(),
            projection_dim=text_dim, resolution=backbone.resolution, components=backbone.components,
            multi_scale=multi_scale, vfe_scale=vfe_scale, vfe_down=vfe_down,
            latent_shape=latent_shape,
            vae_scaling_factor=float(vae_config.get("scaling_factor", 0.18215)),
            vae_shift_factor=float(vae_config.get("shift_factor") or 0.0), depth=backbone.depth, backbone=backbone,
        )
        if dtype != torch.float32:  # diffusers warns about a cast even when nothing is kept in float32
            model = model.to(dtype)
        own = backbone.text_projection_init(text_dim) if model.text_projection is not None else None
        if own is not None:
            with torch.no_grad():
                model.text_projection.weight.copy_(own)
        elif model.text_projection is not None and text_projection_init:
            model.init_text_projection(text_projection_init)
        return model

    def to_latents(self, sample: torch.Tensor) -> torch.Tensor:
        """A VAE posterior sample in the denoiser's latent space: (z - shift) * scale (no shift for the UNet
        families)."""
        return (sample - self.config.vae_shift_factor) * self.config.vae_scaling_factor

    def init_text_projection(self, clip_id: str) -> None:
        """Initialise the text projection from a CLIP model's (the paper used CLIP ViT-L/14's)."""

        try:
            weight = CLIPModel.from_pretrained(clip_id).text_projection.weight
        except OSError as err:
            raise InputError(f"could not load the CLIP model '{clip_id}' to initialise the text projection ({err}); "
                             "pass a reachable hub id or local CLIPModel directory with --text-projection-init, or "
                             "--text-projection-init '' for a random init.") from err
        if tuple(weight.shape) != tuple(self.text_projection.weight.shape):
            logger.warning("text projection of %s has shape %s, the LRM needs %s: keeping a random init",
                           clip_id, tuple(weight.shape), tuple(self.text_projection.weight.shape))
            return
        with torch.no_grad():
            self.text_projection.weight.copy_(weight.to(self.text_projection.weight))

    # ----------------------------------------------------------------------------------------------------------
    # save / load

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                        **kwargs: Any) -> Path:
        """config.json + diffusion_pytorch_model.safetensors (only the parts the model runs) + tokenizer(s).
        `state_dict` is the full one when the module's own parameters are sharded (FSDP: `accelerator.
        get_state_dict(model)` gathers it)."""
        directory = Path(directory)
        if state_dict is None:
            super().save_pretrained(directory, **kwargs)
        else:
            directory.mkdir(parents=True, exist_ok=True)
            self.save_config(directory)
            save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()},
                      directory / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        self.backbone.save_tokenizers(directory)
        return directory

    @classmethod
    def from_pretrained(cls, source: str | Path, subfolder: str | None = None, dtype: torch.dtype = torch.float32,
                        **kwargs: Any) -> LatentRewardModel:
        """Load a saved LRM (a folder, a run directory of `lpo reward train`, or a hub id); needs nothing else."""
        source, subfolder = resolve_lrm(source, subfolder)
        _read_config(source, subfolder)  # a clear refusal for a folder that holds no reward model
        location, where = weight_args(source, subfolder)
        model = super().from_pretrained(location, **where, **diffusers_dtype(dtype), **kwargs)
        model.backbone.load_tokenizers(source, subfolder)
        model.source = (source, subfolder)
        return model.eval()

    # ----------------------------------------------------------------------------------------------------------
    # forward

    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The backbone's conditioning for `prompts` and, under "text", the pooled text feature in the joint space."""
        out = self.backbone.encode_text(prompts)
        if self.text_projection is not None:
            out["text"] = self.text_projection(out["text"])
        return out

    def text_from_embeddings(self, context: torch.Tensor, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """What `encode_text` gives, from prompts the base pipeline has already encoded (a flow family's token
        sequence [B, L, D] and pooled vector [B, P], as its `encode_prompt` returns them): no text encoder runs."""
        conditioning = getattr(self.backbone, "conditioning", None)
        if conditioning is None:
            raise InputError(f"a {self.config.family} reward model reads prompts with its own text encoder; only the "
                             "flow-matching families (sd3, flux) take a pipeline's prompt embeddings.")
        out = conditioning(context, pooled)
        if self.text_projection is not None:
            out["text"] = self.text_projection(out["text"])
        return out

    def release_text_encoders(self) -> None:
        """Drop the frozen text encoders of a flow family (the empty prompt's encoding stays cached); they load again
        if a prompt must be encoded."""
        release = getattr(self.backbone, "release_encoders", None)
        if release is not None:
            release()

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """`encode_text` with each distinct prompt encoded once (a training batch holds each caption twice, once per
        image of its pair), gathered back to one row per prompt."""
        rows: dict[str, int] = {}
        index = [rows.setdefault(prompt, len(rows)) for prompt in prompts]
        if len(rows) == len(prompts):
            return self.encode_text(prompts)
        encoded = self.encode_text(list(rows))
        gather = torch.tensor(index, device=self.device)
        return {key: value[gather] for key, value in encoded.items()}

    def empty_text(self) -> dict[str, torch.Tensor]:
        """The empty prompt's encoding (VFE's unconditional branch): once while the weights cannot change (eval mode,
        no gradients, or text encoders that never train), afresh at every call while training, as the text encoder
        learns."""
        if (self.training or torch.is_grad_enabled()) and not self.backbone.frozen_text:
            return self.encode_text([""])
        if self._empty is None:
            with torch.no_grad():  # VFE uses the conditioning only, which nothing trainable computes here
                self._empty = self.encode_text([""])
        return self._empty

    def train(self, mode: bool = True) -> LatentRewardModel:
        self._empty = None  # the weights may change from here on
        return super().train(mode)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> LatentRewardModel:
        self._empty = None  # moved or cast: encode again on the new device or dtype
        return super()._apply(fn, *args, **kwargs)

    def visual_features(self, latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor],
                        empty: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Pooled, concatenated, projected visual feature (with VFE when `empty` is given)."""
        n = latents.shape[0]
        guided = empty is not None
        cond = {key: value for key, value in text.items() if key != "text"}
        if guided:
            latents = torch.cat([latents, latents])
            timesteps = torch.cat([timesteps, timesteps])
            cond = {key: torch.cat([value, empty[key].expand(n, *value.shape[1:])]) for key, value in cond.items()}
        feats = self.backbone.pooled_features(latents, timesteps, cond, self.feature_taps)
        g = self.config.vfe_scale

        def guide(x: torch.Tensor, on: bool) -> torch.Tensor:
            if not guided:
                return x
            conditional, unconditional = x[:n], x[n:]
            return unconditional + g * (conditional - unconditional) if on else conditional

        *tapped, deepest = feats
        out = [guide(f, self.config.vfe_down) for f in tapped] + [guide(deepest, True)]
        return self.visual_projection(torch.cat(out, dim=-1))

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor | int, prompts: list[str],
                text: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """exp(logit_scale) * cos(visual(x_t, t), text(prompt)), one logit per latent (the trainers call the model,
        so that DDP, DeepSpeed and FSDP wrappers see every forward)."""
        return self.score(latents, timesteps, prompts, text)

    def score(self, latents: torch.Tensor, timesteps: torch.Tensor | int, prompts: list[str],
              text: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Score noisy latents (already VAE-scaled) at `timesteps`. `text` may hold a precomputed `encode_text`."""
        if len(prompts) != latents.shape[0]:
            raise ValueError(f"{latents.shape[0]} latents but {len(prompts)} prompts")
        if not torch.is_tensor(timesteps):
            timesteps = torch.full((latents.shape[0],), timesteps, device=latents.device)
        timesteps = timesteps.to(latents.device).expand(latents.shape[0])
        text = text if text is not None else self.encode_prompts(prompts)
        empty = self.empty_text() if self.config.vfe_scale != 1.0 else None
        visual = self.visual_features(latents.to(self.logit_scale.dtype), timesteps, text, empty)
        visual = visual / visual.norm(dim=-1, keepdim=True)
        textual = text["text"] / text["text"].norm(dim=-1, keepdim=True)
        return self.logit_scale.exp() * (visual * textual).sum(-1)

    @torch.no_grad()
    def score_images(self, images: list[Any], prompts: list[str], t: float = 1, seed: int = 0) -> torch.Tensor:
        """Encode images with the VAE saved beside the model, noise them to timestep `t` (seeded), and score."""

        if not self._pixel_side:
            if self.source is None:
                raise InputError("score_images needs the VAE saved beside the model (vae/ in the folder given to "
                                 "from_pretrained); export the model with `lpo reward train`.")
            vae_source, vae_subfolder = component(*self.source, "vae")
            try:
                location, where = weight_args(vae_source, vae_subfolder)
                vae = AutoencoderKL.from_pretrained(location, **where)
            except OSError as err:
                raise InputError(f"{self.source[0]} has no VAE beside the model (vae/); export the model with "
                                 "`lpo reward train`.") from err
            self._pixel_side["vae"] = vae.to(self.device).eval()
            self._pixel_side["noise"] = get_family(self.config.family).noise_schedule(*component(*self.source,
                                                                                                 "scheduler"))
        vae, noise_scheduler = self._pixel_side["vae"], self._pixel_side["noise"]
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.stack([image_to_tensor(image, self.config.resolution) for image in images])
        posterior = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator).to(self.device)
        latents = self.to_latents(posterior.mean + posterior.std * eps.to(posterior.mean.dtype))
        steps = torch.full((len(images),), t)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        noisy = noise_scheduler.add_noise(latents.cpu().float(), noise.cpu().float(), steps)
        return self.score(noisy.to(self.device), steps.to(self.device), list(prompts))


# --------------------------------------------------------------------------------------------------------------
# a saved model on disk or on the hub


def resolve_lrm(source: str | Path, subfolder: str | None = None) -> tuple[str, str | None]:
    """(folder or hub id, subfolder) of a saved LRM. A run directory of `lpo reward train` gives its `best/` export
    (else `last/`), and says so; a hub id may name a folder inside its repository (`owner/repo/sub/folder`)."""
    if not Path(source).exists() and not is_path_like(str(source)):
        ref = ModelRef.parse(source)  # a pinned reference keeps its revision: `owner/repo@revision`
        return f"{ref.root}@{ref.revision}" if ref.revision else ref.root, ref.inside(subfolder)
    path = Path(source) / (subfolder or "")
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        for name in RUN_SUBFOLDERS:
            if (path / name / CONFIG_FILE).is_file():
                logger.info("%s is a training run: using its %s/ model", path, name)
                return str(Path(source)), f"{subfolder}/{name}" if subfolder else name
    return str(source), subfolder


def component(source: str, subfolder: str | None, name: str) -> tuple[str, str | None]:
    """(path or hub id, subfolder) of a component saved beside an LRM (`vae`, `scheduler`). A local one is named by
    its own folder: diffusers would otherwise read the LRM's weights file beside it for the component's."""
    path = Path(source) / (subfolder or "") / name
    if path.is_dir():
        return str(path), None
    return source, f"{subfolder}/{name}" if subfolder else name


def read_lrm_config(source: str | Path, subfolder: str | None = None) -> dict[str, Any]:
    """The config of a saved LRM (a folder, a run directory or a hub id), checked without loading weights."""
    return _read_config(*resolve_lrm(source, subfolder))


def _read_config(source: str, subfolder: str | None) -> dict[str, Any]:
    """The config of the LRM `resolve_lrm` found."""
    path = Path(source) / (subfolder or "") / CONFIG_FILE
    if not Path(source).exists():
        if is_path_like(str(source)):
            raise InputError(f"{source} does not exist: pass a latent reward model directory (the folder "
                             "`lpo reward train` wrote, or its run directory) or a hub id.")
        try:
            ref = ModelRef.parse(source)
            path = hub_file(ref.root, CONFIG_FILE, ref.inside(subfolder), revision=ref.revision)
        except InputError as err:
            raise InputError(f"{err} It is neither a latent reward model directory nor a readable hub repository: "
                             "pass the folder `lpo reward train` wrote (or its run directory).") from None
    if not path.is_file():
        raise InputError(f"{path.parent} is not a latent reward model directory (no {CONFIG_FILE}, and no best/ or "
                         "last/ model in it); pass the folder `lpo reward train --out` wrote, or its best/ or last/.")
    config = json.loads(path.read_text())
    if config.get("_class_name") != CLASS_NAME:
        raise InputError(f"{path} is not a latent reward model config (_class_name={config.get('_class_name')!r}); "
                         "pass a folder written by `lpo reward train`.")
    get_family(config.get("family", "?"))
    return config


def check_text_projection_init(family_name: str, clip_id: str | None) -> None:
    """Before training: the CLIP model whose text projection initialises the LRM's is readable (where the family's
    pooled text needs a projection), so a missing download stops the run before any image is encoded."""
    backbone = get_family(family_name).lrm_backbone
    if not clip_id or backbone.text_projected or backbone.own_text_projection:
        return
    fix = ("pass a reachable hub id or a local CLIPModel folder with --text-projection-init, or "
           "--text-projection-init '' to start the projection at random")
    if Path(clip_id).is_dir():
        if not (Path(clip_id) / CONFIG_FILE).is_file():
            raise InputError(f"--text-projection-init {clip_id} has no {CONFIG_FILE}; {fix}.")
        return

    try:
        hub_file(clip_id, CONFIG_FILE)
    except InputError as err:
        raise InputError(f"the CLIP model whose text projection initialises the LRM's: {err} Or {fix}.") from None


def export_components(directory: str | Path, base: str, vae: str | None = None) -> None:
    """Copy the VAE and the noise schedule beside a saved LRM, so scoring images needs nothing else."""

    directory = Path(directory)
    source, where = weight_args(vae) if vae else weight_args(base, "vae")
    model = AutoencoderKL.from_pretrained(source, **where)
    model.save_pretrained(directory / "vae")
    family_of(base).noise_schedule(base).save_pretrained(directory / "scheduler")


def check_lrm_matches(lrm: str | Path, family_name: str, base: str) -> None:
    """An LRM scores latents of one latent space: refuse a base of another family."""
    config = read_lrm_config(lrm)
    if config["family"] != family_name:
        raise InputError(f"the latent reward model {lrm} was built on an {config['family']} backbone, but {base} is "
                         f"an {family_name} pipeline: their latent spaces differ. Use an LRM trained on the same "
                         "family (SD1.x and SD2.x share one).")
