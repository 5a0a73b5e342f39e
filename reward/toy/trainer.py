"""Train the toy world's models: the seeded script behind the weights shipped in manifests/toy-models/.

The toy world (`lpo.reward.toy.world`) is 32x32 renders of a coloured shape on a background of another colour, with
captions that describe them and a pixel oracle. Everything here is trained from scratch on freshly rendered images
and saved in the real on-disk formats the toolkit loads:

- `sd15/`: a StableDiffusionPipeline: an AutoencoderKL (32x32 pixels -> 4x8x8 latents), a CLIPTextModel over the
  world's words and a UNet2DConditionModel trained jointly as a text-to-image model (epsilon prediction, 10% empty
  captions so classifier-free guidance works), with a DDIM scheduler.
- `pickscore/`: a transformers CLIPModel + CLIPProcessor trained like a preference model: its image-caption
  similarities follow the oracle's weights (shape colour 0.5, shape 0.3, background 0.2) through soft targets.
- `sd3/`: a StableDiffusion3Pipeline trained on the flow-matching objective, reusing the VAE of `sd15/`
  (`lpo.reward.toy.flow_trainer`); `sd3-early/`: the same run after 300 of its 800 updates.
- `clip/`: an open_clip model folder (its tokenizer inside) trained to match images with their exact captions
  (near-hard targets).

The world has no notion of beauty and no question-answering model, so there is no `aesthetic` or `vqa` model:
the demo filters on the two metrics that say something real about it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTextModel

from lpo.core.errors import InputError
from lpo.curate.scorers import load_scorer
from lpo.curate.scorers.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, pooled_features
from lpo.reward.backbones import load_generator
from lpo.reward.images import to_uint8
from lpo.reward.lpo.sampler import sample
from lpo.reward.toy import flow_trainer
from lpo.reward.toy.config import ToyModelsConfig
from lpo.reward.toy.random_models import OPEN_CLIP_PREPROCESS, clip_image_processor
from lpo.reward.toy.world import (
    IMAGE_SIZE,
    TEXT_WIDTH,
    TOKENIZER_MAX_LENGTH,
    Scene,
    agreement,
    all_scenes,
    corrupt,
    match_rates,
    perceive,
    random_scene,
    render,
    render_batch,
    text_encoder_config,
    toy_tokenizer,
)

logger = logging.getLogger(__name__)

SUMMARY_FILE = "toy_models.json"
NOISE_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000}


def _token_ids(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=TOKENIZER_MAX_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


# ---------------------------------------------------------------------------------------------------------------
# VAE


def build_vae() -> Any:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64),
                         layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=IMAGE_SIZE)


def train_vae(config: ToyModelsConfig, rng: np.random.Generator) -> tuple[Any, dict[str, Any]]:
    """MSE reconstruction + a small KL term; returns the VAE with its scaling factor set (1 / latent std)."""
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(config.seed)
    for step in range(config.vae_steps):
        _, pixels = render_batch(rng, config.vae_batch_size)
        x = pixels * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        loss = F.mse_loss(vae.decode(z).sample, x) + 1e-5 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == config.vae_steps - 1:
            logger.info("vae step %d/%d: loss %.4f", step + 1, config.vae_steps, loss.item())
    vae.eval()
    scenes, pixels = render_batch(rng, 256)
    with torch.no_grad():
        latents = vae.encode(pixels * 2 - 1).latent_dist.mean
        recon = vae.decode(latents).sample
    scaling = float(1.0 / latents.pow(2).mean().sqrt())
    vae.register_to_config(scaling_factor=scaling)
    rates = match_rates(scenes, [perceive(image) for image in to_uint8(recon)])
    stats = {"scaling_factor": scaling, "fg_colour_correct": rates["fg_colour_correct"],
             "bg_colour_correct": rates["bg_colour_correct"]}
    logger.info("vae: scaling factor %.4f, reconstructions keep the shape colour in %.0f%% and the background in "
                "%.0f%%", scaling, 100 * stats["fg_colour_correct"], 100 * stats["bg_colour_correct"])
    return vae, stats


# ---------------------------------------------------------------------------------------------------------------
# text-to-image diffusion model


def build_unet() -> Any:
    return UNet2DConditionModel(sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",) * 2,
                                up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=TEXT_WIDTH,
                                attention_head_dim=8, norm_num_groups=16)


def train_diffusion(config: ToyModelsConfig, vae: Any, rng: np.random.Generator) -> tuple[Any, Any, Any, dict]:
    """UNet and text encoder trained together on cached VAE latents; returns them, the tokenizer and a summary."""

    tokenizer = toy_tokenizer()
    text_encoder = CLIPTextModel(text_encoder_config(tokenizer))
    unet = build_unet()
    noise_scheduler = DDPMScheduler(**NOISE_SCHEDULE)
    scenes, latents = [], []
    with torch.no_grad():
        for _ in range(config.diffusion_images // 512):
            batch_scenes, pixels = render_batch(rng, 512)
            scenes += batch_scenes
            latents.append(vae.encode(pixels * 2 - 1).latent_dist.mean * vae.config.scaling_factor)
    latents = torch.cat(latents)
    ids = _token_ids(tokenizer, [s.caption for s in scenes])
    empty = _token_ids(tokenizer, [""])
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(config.seed + 1)
    unet.train()
    text_encoder.train()
    for step in range(config.diffusion_steps):
        index = torch.randint(len(latents), (config.batch_size,), generator=generator)
        tokens = ids[index].clone()
        tokens[torch.rand(len(index), generator=generator) < 0.1] = empty  # for classifier-free guidance
        noise = torch.randn(latents[index].shape, generator=generator)
        t = torch.randint(noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noisy = noise_scheduler.add_noise(latents[index], noise, t)
        context = text_encoder(tokens).last_hidden_state
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == config.diffusion_steps - 1:
            logger.info("diffusion step %d/%d: loss %.4f", step + 1, config.diffusion_steps, loss.item())
    return unet.eval(), text_encoder.eval(), tokenizer, {"training_images": len(latents)}


def save_pipeline(path: Path, vae: Any, unet: Any, text_encoder: Any, tokenizer: Any) -> None:
    scheduler = DDIMScheduler(**NOISE_SCHEDULE, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(path)


def sample_accuracy(pipeline_dir: Path, guidance: float, n: int = 64, steps: int = 20, seed: int = 0) -> dict:
    """Share of samples (DDIM, eta 0) whose shape colour, background and shape the pixel reader finds as asked."""

    model = load_generator(str(pipeline_dir))
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    generators = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]
    cond = model.encode_prompts([s.caption for s in scenes])
    latents = sample(model, cond, generators, steps=steps, guidance=guidance, eta=0.0)["latents"]
    rates = match_rates(scenes, [perceive(np.asarray(image)) for image in model.decode(latents)])
    return {"guidance": guidance, **{k: rates[k] for k in ("fg_colour_correct", "bg_colour_correct",
                                                            "shape_correct", "oracle")}}


# ---------------------------------------------------------------------------------------------------------------
# CLIP-style scorers


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              scenes: list[Scene], captions: list[Scene], temperature: float) -> torch.Tensor:
    """Symmetric cross-entropy of the image x caption logits against soft targets softmax(agreement / temperature):
    per image over the captions, and per caption over the images of the batch. A small temperature gives
    (near-)hard caption matching; a larger one teaches the oracle's ordering of partial matches."""
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp() * image_features @ text_features.T
    match = torch.tensor([[agreement(c, s) for c in captions] for s in scenes]) / temperature
    rows = -(match.softmax(dim=1) * logits.log_softmax(dim=1)).sum(1).mean()
    cols = -(match.softmax(dim=0) * logits.log_softmax(dim=0)).sum(0).mean()
    return (rows + cols) / 2


def _normalise_pixels(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)


def train_clip(config: ToyModelsConfig, model: Any, encode_image: Any, encode_text: Any, logit_scale: Any,
               tokenizer: Any, temperature: float, rng: np.random.Generator, name: str) -> None:
    captions = all_scenes()
    ids = _token_ids(tokenizer, [c.caption for c in captions])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model.train()
    for step in range(config.clip_steps):
        scenes, pixels = render_batch(rng, config.batch_size)
        loss = clip_loss(encode_image(_normalise_pixels(pixels)), encode_text(ids), logit_scale(), scenes, captions,
                         temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == config.clip_steps - 1:
            logger.info("%s step %d/%d: loss %.4f", name, step + 1, config.clip_steps, loss.item())
    model.eval()


def _vision_config() -> dict[str, Any]:
    return {"hidden_size": TEXT_WIDTH, "intermediate_size": 2 * TEXT_WIDTH, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": IMAGE_SIZE, "patch_size": 4}


def train_pickscore(config: ToyModelsConfig, path: Path, rng: np.random.Generator) -> None:
    tokenizer = toy_tokenizer()
    model = CLIPModel(CLIPConfig(text_config=text_encoder_config(tokenizer).to_dict(), vision_config=_vision_config(),
                                 projection_dim=TEXT_WIDTH))
    train_clip(config, model, lambda x: pooled_features(model.get_image_features(pixel_values=x)),
               lambda ids: pooled_features(model.get_text_features(input_ids=ids)), lambda: model.logit_scale,
               tokenizer, config.pickscore_temperature, rng, "pickscore")
    model.save_pretrained(path)
    CLIPProcessor(image_processor=clip_image_processor(IMAGE_SIZE), tokenizer=tokenizer).save_pretrained(path)


def train_open_clip(config: ToyModelsConfig, path: Path, rng: np.random.Generator) -> None:
    tokenizer = toy_tokenizer()
    model_cfg = {
        "embed_dim": TEXT_WIDTH,
        "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": TEXT_WIDTH, "head_width": 16, "patch_size": 4},
        # hf_tokenizer_name makes open_clip load the tokenizer saved in this folder (local-dir:PATH).
        "text_cfg": {"context_length": TOKENIZER_MAX_LENGTH, "vocab_size": len(tokenizer), "width": TEXT_WIDTH,
                     "heads": 4, "layers": 2, "hf_tokenizer_name": "toy-world"},
    }
    model = open_clip.CLIP(**model_cfg)
    train_clip(config, model, model.encode_image, model.encode_text, lambda: model.logit_scale, tokenizer,
               config.clip_temperature, rng, "clip")
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "open_clip_model.safetensors")
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                            "preprocess_cfg": OPEN_CLIP_PREPROCESS}, indent=2) + "\n")
    tokenizer.save_pretrained(path)


def scorer_agreement(metric: str, path: Path, pairs: int = 300, seed: int = 7) -> float:
    """Share of clean toy pairs (different oracle scores) that the scorer orders as the oracle does."""

    rng = np.random.default_rng(seed)
    scorer = load_scorer(metric, str(path))
    images, captions, truth = [], [], []
    for _ in range(pairs):
        scene = random_scene(rng)
        a, b = corrupt(scene, rng), (scene if rng.random() < 0.5 else corrupt(scene, rng))
        if agreement(scene, a) == agreement(scene, b):
            continue
        images += [Image.fromarray(render(a, rng)), Image.fromarray(render(b, rng))]
        captions += [scene.caption] * 2
        truth.append(agreement(scene, a) > agreement(scene, b))
    scores = scorer.score(images, captions)
    return float(np.mean([(scores[2 * i] > scores[2 * i + 1]) == t for i, t in enumerate(truth)]))


# ---------------------------------------------------------------------------------------------------------------


MODELS = ("sd15", "pickscore", "clip", "sd3")  # in training order; sd3 reuses sd15's VAE


def validate(config: ToyModelsConfig) -> None:
    if not config.out:
        raise InputError("an output directory is required.")
    for name in ("batch_size", "vae_batch_size", "vae_steps", "diffusion_steps", "clip_steps", "sd3_steps",
                 "sd3_early_steps"):
        if getattr(config, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1.")
    if config.sd3_early_steps > config.sd3_steps:
        raise InputError(f"--sd3-early-steps {config.sd3_early_steps} must be at most --sd3-steps "
                         f"{config.sd3_steps} (it is a snapshot of the same run).")
    if config.diffusion_images < 512:
        raise InputError("--diffusion-images must be at least 512 (images are rendered in batches of 512).")
    for name in ("pickscore_temperature", "clip_temperature"):
        if getattr(config, name) <= 0:
            raise InputError(f"{name} must be positive.")
    unknown = sorted(set(config.models) - set(MODELS))
    if unknown:
        raise InputError(f"--models {', '.join(unknown)}: not a toy model; choose from {', '.join(MODELS)}.")
    vae = Path(config.out) / "sd15" / "vae" / "config.json"
    if "sd3" in config.models and "sd15" not in config.models and not vae.is_file():
        raise InputError(f"the sd3 model reuses the SD1.5 toy model's VAE, and {vae} is missing: add sd15 to "
                         "--models, or write sd3 into a folder that holds sd15/.")


def run(config: ToyModelsConfig) -> dict[str, Any]:
    """Train the toy models named by `config.models` (default all: sd15/, pickscore/, clip/, sd3/) into
    `config.out` and write toy_models.json (a partial run updates the parts it trained). sd15, pickscore and clip
    draw their initial weights from one random stream in that order (train them together to reproduce the shipped
    weights); sd3 has seeds of its own, so it trains the same alone or with the others."""
    validate(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    models = [m for m in MODELS if m in (config.models or MODELS)]
    path = out / SUMMARY_FILE
    summary: dict[str, Any] = json.loads(path.read_text()) if path.is_file() and len(models) < len(MODELS) else {}
    summary.update({"seed": config.seed, "torch": torch.__version__, "threads": torch.get_num_threads()})
    seconds = summary.setdefault("seconds", {})
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 1)
        clock = now

    vae = None
    if "sd15" in models:
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        vae, summary["vae"] = train_vae(config, rng)
        lap("vae")
        unet, text_encoder, tokenizer, summary["diffusion"] = train_diffusion(config, vae, rng)
        save_pipeline(out / "sd15", vae, unet, text_encoder, tokenizer)
        lap("diffusion")
    if "pickscore" in models:
        train_pickscore(config, out / "pickscore", np.random.default_rng(config.seed + 2))
        lap("pickscore")
    if "clip" in models:
        train_open_clip(config, out / "clip", np.random.default_rng(config.seed + 3))
        lap("clip")
    if "sd3" in models:
        vae = vae if vae is not None else AutoencoderKL.from_pretrained(out / "sd15", subfolder="vae")
        torch.manual_seed(config.seed + 4)
        pipeline, early, summary["sd3"] = flow_trainer.train_sd3(config, vae, np.random.default_rng(config.seed + 4))
        pipeline.save_pretrained(out / "sd3")
        early.save_pretrained(out / "sd3-early")
        lap("sd3")
    if "sd15" in models:
        summary["samples"] = [sample_accuracy(out / "sd15", g) for g in (1.0, 3.0)]
    if "sd3" in models:
        summary["sd3"]["samples"] = [sample_accuracy(out / "sd3", g) for g in (1.0, 3.0)]
        summary["sd3"]["early_samples"] = [sample_accuracy(out / "sd3-early", g) for g in (1.0, 3.0)]
    agreement = summary.setdefault("scorer_agreement_with_oracle", {})
    agreement.update({m: scorer_agreement(m, out / m) for m in ("pickscore", "clip") if m in models})
    lap("checks")
    summary["total_seconds"] = round(sum(seconds.values()), 1)
    summary["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(config).items() if k != "out"}
    path.write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("toy models %s written to %s in %.0f s", ", ".join(models), out, sum(seconds.values()))
    return summary
