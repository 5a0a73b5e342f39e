"""The toy world's flow-matching generator: a StableDiffusion3Pipeline trained from scratch on the toy scenes, the
`sd3/` folder of the toy models (`lpo dev toy-models`).

- VAE: the SD1.5 toy model's own weights (`sd15/vae`), with the SD3 convention of a shift and a scale: latents are
  `(z - shift) * scale`, the shift and scale measured on fresh renders (mean and 1 / std of the latents).
- Text: the pipeline's three encoders at toy width: two CLIP text encoders with projections (the penultimate hidden
  states side by side form the sequence, their projected embeddings the pooled vector) over the world's tokenizer,
  and a T5 encoder. A caption is 7 words: the CLIP tokenizers read 10 tokens (start, words, end, padding) and the T5
  tokenizer declares 8 (words, end), so the sequence is 10 CLIP + 8 T5 tokens beside 16 image tokens (a pipeline
  without T5 would feed 256 zero tokens instead, which multiplies the cost of every step on a CPU).
- Transformer: an `SD3Transformer2DModel` over the 4x8x8 latents (2x2 patches: 16 image tokens), 4 joint blocks of
  width 64, trained jointly with the text encoders on the flow-matching objective: `x_sigma = (1 - sigma) x0 +
  sigma eps`, the model at timestep `sigma * 1000` predicts the velocity `eps - x0`; sigma is drawn from a
  logit-normal distribution (SD3's training default), 10% of captions are empty so classifier-free guidance works.
- Scheduler: `FlowMatchEulerDiscreteScheduler` with shift 1 (no resolution shift at 32 pixels).
- `sd3-early/`: the same run after `--sd3-early-steps` (300) of its updates, a generator that leaves room to
  improve (about two thirds of the shape colours right without guidance, where `sd3/` draws 93%): the flow demo
  fine-tunes and samples it, with LRMs initialised from `sd3/` (the same VAE, so the same latent space).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

from lpo.reward.backbones.mmdit import encode_sd3_prompts, t5_tokens
from lpo.reward.toy.config import ToyModelsConfig
from lpo.reward.toy.world import IMAGE_SIZE, render_batch, text_encoder_config, toy_t5_tokenizer, toy_tokenizer

logger = logging.getLogger(__name__)

WIDTH = 64  # CLIP hidden and projection width, transformer width
JOINT_WIDTH = 2 * WIDTH  # both CLIPs' states side by side; T5's width matches
SHIFT = 1.0
CLIP_TOKENS, T5_TOKENS = 10, 8  # a caption's 7 words with CLIP's start and end tokens; with T5's end token


def sd3_vae(vae: Any, rng: np.random.Generator) -> Any:
    """A copy of the SD1.5 toy VAE with SD3's shift and scale, both measured on 512 fresh renders."""

    vae = copy.deepcopy(vae)
    _, pixels = render_batch(rng, 512)
    with torch.no_grad():
        latents = vae.encode(pixels * 2 - 1).latent_dist.mean
    shift = float(latents.mean())
    vae.register_to_config(shift_factor=shift, scaling_factor=float(1.0 / (latents - shift).std()))
    return vae


def build_text_encoders(tokenizer: Any, t5_tokenizer: Any) -> list[Any]:
    clip_config = text_encoder_config(tokenizer)
    clip_config.projection_dim = WIDTH
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=JOINT_WIDTH, d_kv=16, d_ff=2 * JOINT_WIDTH,
                                 num_layers=2, num_heads=4, pad_token_id=t5_tokenizer.pad_token_id,
                                 eos_token_id=t5_tokenizer.eos_token_id, decoder_start_token_id=0))
    return [CLIPTextModelWithProjection(clip_config), CLIPTextModelWithProjection(clip_config), t5]


def build_transformer() -> Any:
    return SD3Transformer2DModel(sample_size=IMAGE_SIZE // 4, patch_size=2, in_channels=4, out_channels=4,
                                 num_layers=4, attention_head_dim=16, num_attention_heads=4,
                                 joint_attention_dim=JOINT_WIDTH, caption_projection_dim=WIDTH,
                                 pooled_projection_dim=2 * WIDTH, pos_embed_max_size=8)


def _pipeline(vae: Any, transformer: Any, encoders: list[Any], tokenizers: list[Any]) -> Any:
    """A StableDiffusion3Pipeline of copies of the trained modules (in eval mode), the toy scheduler."""

    transformer, encoders = copy.deepcopy(transformer).eval(), [copy.deepcopy(e).eval() for e in encoders]
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT),
        vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0], text_encoder_2=encoders[1],
        tokenizer_2=tokenizers[1], text_encoder_3=encoders[2], tokenizer_3=tokenizers[2])


def train_sd3(config: ToyModelsConfig, vae: Any, rng: np.random.Generator) -> tuple[Any, Any, dict[str, Any]]:
    """Transformer and text encoders trained together on cached latents; returns the pipeline, the pipeline of the
    same run after `config.sd3_early_steps` updates (the learning rate is constant, so it is the model a run of that
    many steps gives) and a summary."""

    vae = sd3_vae(vae, rng)
    tokenizers = [toy_tokenizer(CLIP_TOKENS), toy_tokenizer(CLIP_TOKENS), toy_t5_tokenizer(T5_TOKENS)]
    encoders = build_text_encoders(tokenizers[0], tokenizers[2])
    transformer = build_transformer()
    scenes, latents = [], []
    with torch.no_grad():
        for _ in range(config.diffusion_images // 512):
            batch_scenes, pixels = render_batch(rng, 512)
            scenes += batch_scenes
            z = vae.encode(pixels * 2 - 1).latent_dist.mean
            latents.append((z - vae.config.shift_factor) * vae.config.scaling_factor)
    latents = torch.cat(latents)
    captions = [s.caption for s in scenes]
    params = [p for module in (transformer, *encoders) for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(config.seed + 5)
    for module in (transformer, *encoders):
        module.train()
    length = t5_tokens(tokenizers[2])
    for step in range(config.sd3_steps):
        index = torch.randint(len(latents), (config.batch_size,), generator=generator)
        drop = (torch.rand(len(index), generator=generator) < 0.1).tolist()  # empty captions, for guidance
        batch_captions = ["" if d else captions[i] for d, i in zip(drop, index.tolist())]
        context, pooled = encode_sd3_prompts(tokenizers, encoders, batch_captions, JOINT_WIDTH, torch.device("cpu"),
                                             torch.float32, length)
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        sigma = torch.sigmoid(torch.randn(len(index), generator=generator))  # logit-normal(0, 1)
        noisy = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
        velocity = transformer(hidden_states=noisy, encoder_hidden_states=context, pooled_projections=pooled,
                               timestep=sigma * 1000).sample
        loss = F.mse_loss(velocity, noise - x0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == config.sd3_steps - 1:
            logger.info("sd3 step %d/%d: loss %.4f", step + 1, config.sd3_steps, loss.item())
        if step + 1 == config.sd3_early_steps:
            early, early_loss = _pipeline(vae, transformer, encoders, tokenizers), loss.item()
    pipeline = _pipeline(vae, transformer, encoders, tokenizers)
    summary = {"training_images": len(latents), "shift_factor": vae.config.shift_factor,
               "scaling_factor": vae.config.scaling_factor, "final_loss": loss.item(),
               "early_steps": config.sd3_early_steps, "early_loss": early_loss}
    return pipeline, early, summary

