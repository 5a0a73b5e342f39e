"""The family registry: what each family is, how a pipeline's family is found from its own files, and the one
loader of a generator (a LoRA loaded, or a fine-tuned denoiser swapped in).

This module imports nothing heavy (the command line reads the registry); a family's adapters load on first use.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lpo.core.errors import InputError
from lpo.core.refs import ModelRef, hub_file, load_args, weight_args

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class Family:
    """A model family: how to recognise its pipelines, its adapters, and its defaults."""

    name: str  # the command-line name: `lpo optimize <name>`
    title: str  # for messages: "SD1.x/2.x"
    denoiser: str  # the pipeline subfolder of the denoising network: "unet" or "transformer"
    pipeline: str  # the diffusers pipeline class
    sampler: str  # the kind of sampler, for messages: "DDIM" or "flow-matching" (`samplers`: its stochastic steps)
    accepts: Callable[[dict[str, Any]], bool]  # given the denoiser's config.json
    adapters: tuple[str, str]  # "module:class" of the family's Generator and LRMBackbone
    lora_targets: tuple[str, ...]  # module names LoRA adapts in LPO
    lpo_defaults: dict[str, Any] = field(default_factory=dict)  # LPOConfig fields the family sets when left unset
    lrm_defaults: dict[str, Any] = field(default_factory=dict)  # RewardTrainConfig fields, likewise
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)  # extra from_pretrained arguments
    optional_components: tuple[str, ...] = ()  # pipeline parts a saved pipeline may leave out (SD3: T5)
    half_precision: str = "fp16"  # the half precision it runs in on GPUs (FLUX.1 overflows in float16)
    samplers: tuple[str, ...] = ("ddim",)  # the stochastic steps `--sampler` takes
    # LPO's thresholds by image side where they depend on it (the nearest side's; else `lpo_defaults["threshold"]`)
    thresholds_by_resolution: dict[int, list[float]] = field(default_factory=dict)

    def sampling(self, eta: float | None, guidance: float | None, guided: bool) -> tuple[float, float]:
        """(step noise, guidance) of sampling where the user left them unset: the family's LPO values, the step
        deterministic (0) unless an LRM guides it (which needs a stochastic step to choose between candidates)."""
        if eta is None:
            eta = self.lpo_defaults["eta"] if guided else 0.0
        return eta, guidance if guidance is not None else self.lpo_defaults["guidance"]

    def threshold_at(self, pixels: int) -> list[float]:
        """LPO's default thresholds at an image side: the family's one range, or that of the nearest side in
        `thresholds_by_resolution` (on a log scale)."""
        if not self.thresholds_by_resolution:
            return list(self.lpo_defaults["threshold"])
        side = min(self.thresholds_by_resolution, key=lambda s: abs(math.log(s / pixels)))
        return list(self.thresholds_by_resolution[side])

    def check_sampler(self, name: str | None, where: str = "") -> None:
        """Refuse (InputError) a stochastic step the family does not take; None (the default) passes."""
        if name is not None and name not in self.samplers:
            raise InputError(f"--sampler {name!r}: {where or self.title} samples with {', '.join(self.samplers)}.")

    @property
    def default_sampler(self) -> str:
        """The stochastic step LPO, guided sampling and evaluation take when `--sampler` is left unset."""
        return self.lpo_defaults.get("sampler", self.samplers[0])

    @property
    def flow_matching(self) -> bool:
        """Whether the family's timesteps are sigma x 1000 of a flow-matching schedule (else DDPM's integers)."""
        return self.sampler == "flow-matching"

    @property
    def generator(self) -> type:
        """The family's `Generator` class."""
        return _load(self.adapters[0])

    @property
    def lrm_backbone(self) -> type:
        """The family's `LRMBackbone` class."""
        return _load(self.adapters[1])

    def load_pipeline(self, base: str, dtype: torch.dtype | None = None) -> Any:
        import diffusers

        pipeline_class = getattr(diffusers, self.pipeline)
        kwargs = diffusers_dtype(dtype) if dtype is not None else {}
        # a part saved as absent must be passed as None (diffusers' from_pretrained refuses to load it otherwise)
        kwargs |= {name: None for name in self.optional_components if not has_subfolder(base, name)}
        source, where = weight_args(base)
        pipeline = pipeline_class.from_pretrained(source, **where, **kwargs, **self.pipeline_kwargs)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def noise_schedule(self, source: str | Path, subfolder: str = "scheduler") -> Any:
        """The forward process (`add_noise(clean, noise, timesteps)`) of a pipeline or a saved LRM (folder or hub
        id; `subfolder` where its scheduler config is)."""
        return self.lrm_backbone.noise_schedule(source, subfolder)


def diffusers_dtype(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype keyword of diffusers' from_pretrained: `dtype` where `torch_dtype` is deprecated, else the old one."""
    from diffusers.utils import deprecation_utils

    renamed = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")
    return {"dtype": dtype} if renamed else {"torch_dtype": dtype}


def _load(path: str) -> type:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _is_sd15(unet_config: dict[str, Any]) -> bool:
    return unet_config.get("addition_embed_type") is None and unet_config.get("class_embed_type") is None


def _is_sdxl(unet_config: dict[str, Any]) -> bool:
    return unet_config.get("addition_embed_type") == "text_time"


def _is_sd3(transformer_config: dict[str, Any]) -> bool:
    return transformer_config.get("_class_name") == "SD3Transformer2DModel"


def _is_flux(transformer_config: dict[str, Any]) -> bool:
    return transformer_config.get("_class_name") == "FluxTransformer2DModel"


UNET_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
# both streams of the joint attention; bare names also reach SD3.5's image-only second attention (attn2)
MMDIT_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out")
# FLUX.1 as Flow-GRPO adapts it: the attention (also the single-stream blocks' q/k/v) and the double blocks' MLPs
FLUX_LORA_TARGETS = (*MMDIT_LORA_TARGETS, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
# the flow families' stochastic step and LPO calibration, chosen on the flow demo's ablation (docs/demo.md): the
# coefficients-preserving step raised the oracle by 7-8 points where the SDE step raised it by 1-3; the kappa beta
# schedule and sigma thresholds moved it by less than seed noise, so the paper's one beta and std thresholds stay
FLOW_CALIBRATION = {"sampler": "cps", "beta_schedule": "constant", "threshold_scale": "std"}
FLOW_THRESHOLDS = {512: [0.35, 0.5], 1024: [0.45, 0.6]}
FAMILIES: dict[str, Family] = {family.name: family for family in (
    # LPO defaults are those of the released runs (design/method.md section 9.2).
    Family(name="sd15", title="SD1.x/2.x", denoiser="unet", pipeline="StableDiffusionPipeline", sampler="DDIM",
           accepts=_is_sd15,
           adapters=("lpo.reward.backbones.unet:UNetGenerator", "lpo.reward.backbones.unet:UNetLRMBackbone"),
           lora_targets=UNET_LORA_TARGETS,
           lpo_defaults={"lora_rank": 4, "lr": 6e-5, "threshold": [0.35, 0.5], "sample_batch_size": 5,
                         "train_batch_size": 10, "gradient_checkpointing": False, "eta": 1.0, "guidance": 5.0,
                         "sampler": "ddim", "beta_schedule": "constant", "threshold_scale": "std"},
           lrm_defaults={"gradient_checkpointing": False},
           pipeline_kwargs={"safety_checker": None, "requires_safety_checker": False}),
    Family(name="sdxl", title="SDXL", denoiser="unet", pipeline="StableDiffusionXLPipeline", sampler="DDIM",
           accepts=_is_sdxl,
           adapters=("lpo.reward.backbones.unet:SDXLGenerator", "lpo.reward.backbones.unet:SDXLLRMBackbone"),
           lora_targets=UNET_LORA_TARGETS,
           lpo_defaults={"lora_rank": 64, "lr": 1e-5, "threshold": [0.45, 0.6], "sample_batch_size": 4,
                         "train_batch_size": 4, "gradient_checkpointing": True, "eta": 1.0, "guidance": 5.0,
                         "sampler": "ddim", "beta_schedule": "constant", "threshold_scale": "std"},
           # a full SDXL LRM step does not fit 80 GB at the paper's 4 pairs without it (`lpo reward train --dry-run`)
           lrm_defaults={"gradient_checkpointing": True}),
    # Flow-matching: noise level 0.7 and CFG 4.5 (Flow-GRPO's SD3.5-Medium settings); LPO-XL's learning rate; the
    # thresholds by resolution: SD1.5's range at 512 px, SDXL's at 1024 (LPO's own choices at those sides)
    Family(name="sd3", title="SD3/SD3.5", denoiser="transformer", pipeline="StableDiffusion3Pipeline",
           sampler="flow-matching", accepts=_is_sd3,
           adapters=("lpo.reward.backbones.mmdit:SD3Generator", "lpo.reward.backbones.mmdit:SD3LRMBackbone"),
           lora_targets=MMDIT_LORA_TARGETS, optional_components=("text_encoder_3", "tokenizer_3"),
           samplers=("sde", "cps"),
           thresholds_by_resolution=FLOW_THRESHOLDS,
           lpo_defaults={"lora_rank": 32, "lr": 1e-5, "sample_batch_size": 4,
                         "train_batch_size": 4, "gradient_checkpointing": True, "eta": 0.7, "guidance": 4.5,
                         **FLOW_CALIBRATION},
           lrm_defaults={"gradient_checkpointing": True}),
    # FLUX.1-dev: no CFG, the embedded guidance 3.5 (the pipeline's); noise level 0.9 and LoRA rank 64 (Flow-GRPO's
    # FLUX settings)
    Family(name="flux", title="FLUX.1", denoiser="transformer", pipeline="FluxPipeline", sampler="flow-matching",
           accepts=_is_flux,
           adapters=("lpo.reward.backbones.flux:FluxGenerator", "lpo.reward.backbones.flux:FluxLRMBackbone"),
           lora_targets=FLUX_LORA_TARGETS, half_precision="bf16", samplers=("sde", "cps"),
           thresholds_by_resolution=FLOW_THRESHOLDS,
           lpo_defaults={"lora_rank": 64, "lr": 1e-5, "sample_batch_size": 4,
                         "train_batch_size": 4, "gradient_checkpointing": True, "eta": 0.9, "guidance": 3.5,
                         **FLOW_CALIBRATION},
           lrm_defaults={"gradient_checkpointing": True}),
)}



def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise InputError(f"family {name!r} is not one of {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def _supported() -> str:
    return ", ".join(f"{family.title} ({family.name})" for family in FAMILIES.values())


def read_subfolder_config(base: str, subfolder: str) -> dict[str, Any]:
    """A diffusers component's config.json from a local pipeline directory or a hub id (config only)."""
    local = Path(base) / subfolder / CONFIG_FILE
    if Path(base).is_dir():
        if not local.is_file():
            raise InputError(f"{base} has no {subfolder}/{CONFIG_FILE}; give a diffusers pipeline directory of a "
                             f"supported family ({_supported()}) with {subfolder}/, vae/, text_encoder/, tokenizer/.")
        return json.loads(local.read_text())
    ref = ModelRef.parse(base)
    return json.loads(hub_file(ref.root, CONFIG_FILE, ref.inside(subfolder), spec=base, revision=ref.revision)
                      .read_text())


def has_subfolder(base: str, subfolder: str) -> bool:
    """Whether a pipeline (local directory or hub id) has a component, from its model_index.json."""
    if Path(base).is_dir():
        index = Path(base) / "model_index.json"
        if index.is_file():
            entry = json.loads(index.read_text()).get(subfolder)
            if not (isinstance(entry, list) and entry[0] is not None):
                return False
        return (Path(base) / subfolder).is_dir()
    ref = ModelRef.parse(base)
    index = json.loads(hub_file(ref.root, "model_index.json", ref.inside(None), spec=base, revision=ref.revision)
                       .read_text())
    entry = index.get(subfolder)
    return isinstance(entry, list) and entry[0] is not None


def _denoiser_folder(base: str) -> str:
    denoisers = list(dict.fromkeys(family.denoiser for family in FAMILIES.values()))
    if Path(base).is_dir():
        found = [d for d in denoisers if (Path(base) / d / CONFIG_FILE).is_file()]
        if not found:
            raise InputError(f"{base} has no {' or '.join(f'{d}/{CONFIG_FILE}' for d in denoisers)}; give a diffusers "
                             f"pipeline directory of a supported family ({_supported()}).")
        return found[0]
    return next((d for d in denoisers if has_subfolder(base, d)), denoisers[0])


def family_of(base: str) -> Family:
    """The family of a diffusers pipeline (hub id or local directory), from its denoiser's config alone."""
    folder = _denoiser_folder(base)
    config = read_subfolder_config(base, folder)
    for family in FAMILIES.values():
        if family.denoiser == folder and family.accepts(config):
            return family
    if folder != "unet":
        raise InputError(f"{base}: a {config.get('_class_name', 'denoiser')} belongs to none of the supported "
                         f"families ({_supported()}).")
    raise InputError(
        f"{base}: a {config.get('_class_name', 'denoiser')} with addition_embed_type="
        f"{config.get('addition_embed_type')!r} and class_embed_type={config.get('class_embed_type')!r} belongs to "
        f"none of the supported families ({_supported()})."
    )


def pixel_resolution(denoiser_config: dict[str, Any], base: str, vae: str | None = None) -> int:
    """The image side the model was trained at: the denoiser's latent sample_size times the VAE's downscaling
    factor, or, for a denoiser whose config has none (FLUX), the VAE's own sample_size."""
    if vae:
        from diffusers import AutoencoderKL

        source, where = load_args(vae)
        vae_config = dict(AutoencoderKL.load_config(source, **where))
    else:
        vae_config = read_subfolder_config(base, "vae")
    if "sample_size" not in denoiser_config:
        return int(vae_config["sample_size"])
    return int(denoiser_config["sample_size"]) * 2 ** (len(vae_config["block_out_channels"]) - 1)


def resolution_rule(family: Family, denoiser_config: dict[str, Any],
                    vae_config: dict[str, Any]) -> tuple[int, int | None]:
    """(multiple, maximum or None) of the image sides a pipeline samples: the VAE's downscaling times the UNet's
    downsampling or the transformer's patch (FLUX packs 2x2), up to SD3's largest position embedding."""
    scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    if family.denoiser == "unet":
        return scale * 2 ** (len(denoiser_config["block_out_channels"]) - 1), None
    patch = int(denoiser_config.get("patch_size", 2)) if family.name == "sd3" else 2
    largest = denoiser_config.get("pos_embed_max_size")
    return scale * patch, (int(largest) * patch * scale if largest else None)


def check_resolution(pixels: int | None, family: Family, denoiser_config: dict[str, Any],
                     vae_config: dict[str, Any]) -> None:
    """Refuse (InputError) an image side the pipeline cannot sample at; None (the native side) passes."""
    if pixels is None:
        return
    multiple, largest = resolution_rule(family, denoiser_config, vae_config)
    if pixels < multiple or pixels % multiple or (largest is not None and pixels > largest):
        bound = f" and at most {largest}" if largest is not None else ""
        raise InputError(f"--resolution {pixels}: this {family.title} pipeline samples image sides that are "
                         f"multiples of {multiple}{bound} (e.g. {max(multiple, (512 // multiple) * multiple)}).")


def check_base_resolution(pixels: int | None, base: str, family: Family) -> None:
    """`check_resolution` from a pipeline's config files (folder or hub id) before any weights load."""
    if pixels is not None:
        check_resolution(pixels, family, read_subfolder_config(base, family.denoiser),
                         read_subfolder_config(base, "vae"))


def base_resolution(base: str, family: Family, pixels: int | None = None, vae: str | None = None) -> int:
    """The image side a run on `base` uses: `pixels` where given (checked against the pipeline), else the
    pipeline's own (`pixel_resolution`)."""
    if pixels is not None:
        check_base_resolution(pixels, base, family)
        return pixels
    return pixel_resolution(read_subfolder_config(base, family.denoiser), base, vae)


def latent_side_at(base: str, pixels: int) -> int:
    """The latent side of an image of side `pixels` under the base's VAE."""
    return pixels // 2 ** (len(read_subfolder_config(base, "vae")["block_out_channels"]) - 1)


def latent_side(denoiser_config: dict[str, Any], base: str) -> int:
    """The latent side at the model's native resolution: the denoiser's sample_size, or (FLUX) the VAE's
    sample_size over its downscaling factor."""
    if "sample_size" in denoiser_config:
        return int(denoiser_config["sample_size"])
    vae_config = read_subfolder_config(base, "vae")
    return int(vae_config["sample_size"]) // 2 ** (len(vae_config["block_out_channels"]) - 1)


def resolve_lora(path: str | Path) -> Path:
    """The folder of a LoRA saved by `lpo optimize`: the folder itself, or the `lora/` of its run directory."""
    path = Path(path)
    if (path / LORA_WEIGHTS).is_file():
        return path
    if (path / "lora" / LORA_WEIGHTS).is_file():
        logger.info("%s is an LPO run: using its lora/", path)
        return path / "lora"
    raise InputError(f"{path} holds no LoRA ({LORA_WEIGHTS}, here or in lora/); pass the lora/ folder `lpo optimize` "
                     "wrote, or its run directory.")


def resolve_denoiser(spec: str | Path, family: Family) -> tuple[str, str | None, dict[str, Any]]:
    """(folder or hub id, subfolder, config) of a fine-tuned denoiser for `family`'s pipelines, checked against the
    family before any weights load. `spec` is a folder saved with save_pretrained; a folder holding one in `unet/`
    or `transformer/` (a pipeline), `merged_unet/` or `merged_transformer/` (`lpo optimize --merge`'s run
    directory); a hub id (the same, at the repository's root); or `owner/repo/sub/folder`, a folder inside a hub
    repository (the released checkpoints' layout, e.g. `casiatao/LPO/lpo_sd15_merge/unet`)."""
    spec = str(spec)
    name = family.denoiser
    inside = (None, name, f"merged_{name}")
    ref = ModelRef.parse(spec)
    if ref.local:
        path = Path(ref.root)
        if not path.exists():
            raise InputError(f"{spec} does not exist; pass a folder saved with save_pretrained, a pipeline folder, "
                             "`lpo optimize --merge`'s run directory, or a hub id.")
        found = next((path / (sub or "") for sub in inside if (path / (sub or "") / CONFIG_FILE).is_file()), None)
        if found is None:
            raise InputError(f"{spec} holds no {name} ({CONFIG_FILE} here, or in {name}/ or merged_{name}/); pass a "
                             f"folder saved with save_pretrained, a pipeline folder, or `lpo optimize --merge`'s run "
                             "directory.")
        source, subfolder, config = str(found), None, json.loads((found / CONFIG_FILE).read_text())
    else:
        source, subfolder, config = _hub_denoiser(ref, inside)
    if not family.accepts(config) or (family.denoiser == "unet") != ("UNet" in config.get("_class_name", "")):
        raise InputError(f"{spec} is a {config.get('_class_name', 'model')} that does not fit a {family.title} "
                         f"pipeline's {name}; pass a fine-tuned {name} of the base's family.")
    return source, subfolder, config


def _hub_denoiser(ref: ModelRef, inside: tuple[str | None, ...]) -> tuple[str, str | None, dict[str, Any]]:
    unreadable = None
    for candidate in ((ref.subfolder,) if ref.subfolder else inside):
        try:
            path = hub_file(ref.root, CONFIG_FILE, candidate, spec=ref.spec, missing_ok=True, revision=ref.revision)
        except InputError as err:  # unreadable (offline and not cached, gated, no such repository): try the rest
            unreadable = unreadable or err
            continue
        if path is not None:  # a pinned reference keeps its revision for the load: `owner/repo@revision`
            pinned = f"{ref.root}@{ref.revision}" if ref.revision else ref.root
            return pinned, candidate, json.loads(path.read_text())
    if unreadable is not None:
        raise unreadable
    where = ref.subfolder or " or ".join(str(c or "its root") for c in inside)
    raise InputError(f"the hub repository {ref.root} has no {CONFIG_FILE} in {where}; name the folder that holds the "
                     "denoiser, e.g. owner/repo/sub/folder.")


def load_generator(base: str, *, family: Family | None = None, lora: str | Path | None = None,
                   denoiser: str | Path | None = None, dtype: torch.dtype | None = None,
                   device: str = "cpu") -> Any:
    """The generator of `base` (its family found from its files, or checked against `family`), with a LoRA loaded
    or its denoiser replaced by a fine-tuned one (`resolve_denoiser`: a folder, a hub id or a folder in one). The
    VAE stays in float32: decoding in half precision overflows on the SDXL VAE."""
    import torch

    dtype = dtype or torch.float32
    found = family_of(base)
    if family is not None and family is not found:
        raise InputError(f"{base} is a pipeline of the {found.name} family, not {family.name}; use `lpo optimize "
                         f"{found.name}`.")
    model = found.generator.load(base, dtype=dtype, device=device)
    if dtype != torch.float32:
        model.vae.to(torch.float32)
    if lora is not None:
        model.load_lora(resolve_lora(lora))
    if denoiser is not None:
        source, subfolder, _ = resolve_denoiser(denoiser, found)
        source, where = load_args(source, subfolder)
        module = type(model.denoiser).from_pretrained(source, **where, **diffusers_dtype(dtype))
        model.set_denoiser(module.to(device).eval())
    return model
