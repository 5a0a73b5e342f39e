"""Configs of `lpo reward train | eval | score` (light imports only, so `lpo --help` stays fast)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lpo.core.config import option
from lpo.core.refs import REVISION_HELP, VARIANT_HELP, pin_base
from lpo.reward.backbones import get_family
from lpo.reward.backbones.family import latent_side, latent_side_at, read_subfolder_config

CANDIDATE_TIMESTEPS = list(range(1, 952, 50))  # the reference's training timesteps {1, 51, ..., 951}
EVAL_TIMESTEPS = (1, 251, 501, 751, 951)


@dataclass
class RewardTrainConfig:
    manifest: Path = option(None, "Kept pairs to train on: filtered.parquet from `lpo curate filter`.")
    base: str = option(None, "Diffusers pipeline of a supported family (SD1.x/2.x, SDXL, SD3/SD3.5, FLUX.1; hub id "
                             "or local directory) to build the LRM from.")
    revision: str | None = option(None, REVISION_HELP)
    variant: str | None = option(None, VARIANT_HELP)
    out: Path = option(None, "Run directory: checkpoints, latent cache, best/ and last/ exports, logs.")
    val_manifest: Path | None = option(None, "Validation pairs (e.g. filtered from validation_unique); default: "
                                             "hold out --val-fraction of the captions of --manifest.")
    val_fraction: float = option(0.05, "Share of captions held out for validation when no --val-manifest is given.")
    vae: str | None = option(None, "VAE to encode images with (default: the base's vae/; for SDXL the paper used "
                                   "madebyollin/sdxl-vae-fp16-fix).")
    timesteps: list[float] = option(help="Candidate timesteps, one drawn uniformly per pair (default: sd15/sdxl "
                                         "1,51,...,951; sd3, flux the 20-step sampler grid, sigma x 1000).",
                                    factory=list)
    eval_timesteps: list[float] = option(help="Timesteps of the validation accuracy (default: sd15/sdxl "
                                              "1,251,501,751,951; sd3, flux five points of the 20-step grid).",
                                         factory=list)
    select_timestep: float | None = option(None, "Validation timestep whose accuracy picks the best checkpoint "
                                                 "(default: the least noisy of --eval-timesteps).")
    depth: int | None = option(None, "sd3, flux: joint blocks the LRM runs (default: sd3 3/4 of them, 18 of "
                                     "SD3-Medium's 24; flux its 19 double-stream blocks); the rest are not built.")
    resolution: int | None = option(None, "Image side in pixels the LRM reads (images are encoded at it; default: "
                                          "the base's own, SD1.5 512, SDXL, SD3.5-Medium and FLUX.1-dev 1024).")
    batch_size: int = option(16, "Pairs per process per micro-step.")
    grad_accum: int = option(1, "Micro-steps per optimizer update.")
    max_steps: int = option(4000, "Optimizer updates.")
    lr: float = option(1e-5, "AdamW learning rate.")
    weight_decay: float = option(0.3, "AdamW weight decay.")
    warmup_steps: int = option(500, "Linear warmup updates, then linear decay to 0 at max_steps.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 disables).")
    mixed_precision: str = option("auto", "auto (bf16 on CUDA, none on CPU), no, bf16, fp16.")
    gradient_checkpointing: bool | None = option(None, "Trade compute for memory in the UNet and text encoders "
                                                       "(default: on for SDXL, off for SD1.x/2.x).")
    multi_scale: bool = option(True, "Pool the tapped features (UNets: the down blocks) as well as the deepest "
                                     "(UNets: the mid block; transformers: the last block run).")
    vfe_scale: float = option(7.5, "Visual Feature Enhancement guidance on the deepest feature (1 disables).")
    vfe_down: bool = option(False, "Also guide the tapped features.")
    text_projection_init: str | None = option("openai/clip-vit-large-patch14", "CLIP model whose text projection "
                                              "initialises the SD1.x/2.x and FLUX.1 ones ('' for random).")
    init: str = option("diffusion", "Backbone init: diffusion (the base's trained denoiser and text encoders, as the "
                                    "paper) or random (the same architecture with fresh weights, for ablations; "
                                    "sd3/flux keep their frozen text encoders).")
    eval_every: int = option(100, "Validate every N updates.")
    save_every: int = option(500, "save_state every N updates.")
    keep_checkpoints: int = option(2, "How many save_state checkpoints to keep.")
    seed: int = option(42, "Seed for init, data order, timesteps and noise.")
    resume: bool = option(False, "Continue from the latest checkpoint in --out.")
    latent_cache: Path | None = option(None, "Root folder of VAE-latent caches to reuse and extend (e.g. `lpo reward "
                                             "cache --out`), shared by runs; default: OUT/latent_cache.")
    timeout_minutes: float = option(120.0, "Process-group timeout under accelerate launch: how long a process may "
                                           "wait for the others at a collective.")
    log_with: list[str] = option(help="accelerate trackers (tensorboard, wandb, ...).", factory=list)
    device: str = option("auto", "auto, cpu or cuda (under accelerate launch, each process's own).")
    dry_run: bool = option(False, "Print the plan per process (parameters, memory, batch, updates, images to "
                                  "encode) from the configs alone, and stop: no weights read, nothing encoded.")
    processes: int | None = option(None, "--dry-run: processes to plan for (default: accelerate launch's, else 1).")
    sharding: str = option("auto", "--dry-run: none, zero2 (DeepSpeed ZeRO-2) or fsdp (full shard) to plan for "
                                   "(default: what accelerate launch's config sets).")
    gpu_memory_gb: float = option(80.0, "--dry-run: warn when the estimate per process exceeds this.")
    gpu: str = option("a100", "--dry-run: GPU the time is planned on: a100, h100 or h200 (dense bf16 peaks 312, 989 "
                              "and 989 TFLOP/s).")
    mfu: float = option(0.3, "--dry-run: model-FLOPs utilisation assumed for the GPU-hours: the share of the GPU's "
                             "peak the run achieves.")

    def __post_init__(self) -> None:
        pin_base(self)

    def resolved(self, family: str) -> RewardTrainConfig:
        """A copy with the family's defaults filled in where a field is left at None."""

        family_ = get_family(family)
        defaults = family_.lrm_defaults
        config = dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})
        if not (config.timesteps and config.eval_timesteps):
            side = latent_side(read_subfolder_config(self.base, family_.denoiser), self.base) \
                if self.resolution is None else latent_side_at(self.base, self.resolution)
            train, evaluation = family_.lrm_backbone.default_timesteps(self.base, "scheduler", (0, side, side))
            config = dataclasses.replace(config, timesteps=config.timesteps or train,
                                         eval_timesteps=config.eval_timesteps or evaluation)
        check = family_.lrm_backbone.check_timesteps
        config = dataclasses.replace(config, timesteps=check(config.timesteps),
                                     eval_timesteps=check(config.eval_timesteps))
        select = config.select_timestep if config.select_timestep is not None else min(config.eval_timesteps)
        return dataclasses.replace(config, select_timestep=check([select])[0])


@dataclass
class RewardCacheConfig:
    manifests: list[Path] = option(help="Pairs manifests whose images to encode (filtered.parquet, pairs.parquet). "
                                        "Repeatable.", factory=list)
    base: str = option(None, "Diffusers pipeline whose VAE and resolution the LRM will use (hub id or folder).")
    revision: str | None = option(None, REVISION_HELP)
    variant: str | None = option(None, VARIANT_HELP)
    out: Path = option(None, "Root folder of the caches (one subfolder per VAE and resolution); pass it to "
                             "`lpo reward train --latent-cache`.")
    vae: str | None = option(None, "VAE to encode with instead of the base's vae/ (as `lpo reward train --vae`).")
    resolution: int | None = option(None, "Image side to encode at (as `lpo reward train --resolution`; default: the "
                                          "base's own).")
    batch_size: int = option(16, "Images per VAE forward.")
    timeout_minutes: float = option(120.0, "Process-group timeout under accelerate launch.")
    device: str = option("auto", "auto, cpu or cuda (under accelerate launch, each process's own).")

    def __post_init__(self) -> None:
        pin_base(self)


@dataclass
class RewardEvalConfig:
    lrm: Path = option(None, "Latent reward model: the folder `lpo reward train` wrote (its run directory, best/ or "
                             "last/) or a hub id.")
    manifest: Path | None = option(None, "Pairs manifest to evaluate on (filtered.parquet, or a curation dir's "
                                         "pairs.parquet); or give --dataset.")
    dataset: str | None = option(None, "Pick-a-Pic to evaluate on instead of --manifest (yuvalkirstain/pickapic_v1, "
                                       "streamed; a save_to_disk folder or parquet files): each of --splits is "
                                       "ingested into OUT/pickapic/<split> (resumable) and scored on its labelled "
                                       "pairs, as the paper's validation and test accuracy.")
    splits: list[str] = option(help="Splits of --dataset.", factory=lambda: ["validation_unique", "test_unique"])
    out: Path | None = option(None, "Where to write accuracy.json and accuracy.png (default: next to a local LRM; "
                                    "required for a hub one).")
    timesteps: list[float] = option(help="Timesteps to evaluate (default: sd15/sdxl 1,251,501,751,951; sd3, flux "
                                         "five points of the 20-step sampler grid).", factory=list)
    seed: int = option(1234, "Noise seed (the same seed gives the same noise for every model).")
    blind_timestep: float | None = option(None, "Also score every noise level telling the LRM this timestep instead "
                                                "of the true one (a timestep-blind control: what knowing the noise "
                                                "level is worth); reported as accuracy_blind.")
    latent_cache: Path | None = option(None, "Root folder of VAE-latent caches to reuse and extend; default: "
                                             "OUT/latent_cache.")
    batch_size: int = option(32, "Pairs per forward.")
    device: str = option("auto", "Device: auto, cpu, cuda.")


@dataclass
class RewardCompareConfig:
    manifest: Path = option(None, "Pairs manifest every model is scored on (filtered.parquet, or a curation dir's "
                                  "pairs.parquet): the same pairs, the same noise.")
    out: Path = option(None, "Where to write compare.json, compare.png and per_pair.parquet (resumable: a model "
                             "already scored there is not scored again).")
    lrms: list[Path] = option(help="Latent reward models to compare (folders or run directories of `lpo reward "
                                   "train`, imported reference LRMs, hub ids); one latent space: the same family "
                                   "and VAE.", factory=list)
    metrics: list[str] = option(help="Image metrics to compare beside them (pickscore, hpsv21, clip, ...), scored on "
                                     "the noisy latents decoded by the VAE at each noise level.", factory=list)
    models: dict[str, str] = option(help="Model per metric (hub id or local directory).", factory=dict)
    models_dir: Path | None = option(None, "A directory with one model folder per metric, for metrics without an "
                                           "explicit model.")
    timesteps: list[float] = option(help="Timesteps to evaluate (default: the first LRM's, as `lpo reward eval`).",
                                    factory=list)
    seed: int = option(1234, "Noise seed (the same seed gives the same noise for every model; `lpo reward eval`'s "
                             "default).")
    latent_cache: Path | None = option(None, "Root folder of VAE-latent caches to reuse and extend; default: "
                                             "OUT/latent_cache.")
    batch_size: int = option(32, "Pairs per forward.")
    device: str = option("auto", "Device: auto, cpu, cuda.")


@dataclass
class RewardScoreConfig:
    lrm: Path = option(None, "Latent reward model: the folder `lpo reward train` wrote (its run directory, best/ or "
                             "last/) or a hub id.")
    images: list[Path] = option(help="Image files to score.", factory=list)
    prompts: list[str] = option(help="One prompt for all images, or one per image.", factory=list)
    t: float | None = option(None, "Timestep to noise the encoded images to before scoring (default: the least "
                                   "noisy evaluation timestep: 1 for sd15/sdxl).")
    seed: int = option(0, "Noise seed.")
    device: str = option("auto", "auto, cpu or cuda.")


@dataclass
class ImportReferenceConfig:
    source: str = option(None, "An LRM in the reference code's layout (unet/, text_encoder/, text_encoder_2/ for "
                               "SDXL, state_dict.pt): a folder, a hub id, or owner/repo/sub/folder (the released "
                               "ones: casiatao/LRM/lrm_sd15, casiatao/LRM/lrm_sdxl).")
    base: str = option(None, "The pipeline it was trained from, for its tokenizers, VAE and noise schedule "
                             "(LRM-1.5: sd-legacy/stable-diffusion-v1-5; LRM-XL: "
                             "stabilityai/stable-diffusion-xl-base-1.0).")
    revision: str | None = option(None, REVISION_HELP)
    variant: str | None = option(None, VARIANT_HELP)
    out: Path = option(None, "Folder to write the LRM to, in the toolkit's format (must not hold one already).")
    vae: str | None = option(None, "VAE saved beside it for scoring images (default: the base's; LRM-XL was "
                                   "trained with madebyollin/sdxl-vae-fp16-fix).")

    def __post_init__(self) -> None:
        pin_base(self)
