"""Latent reward model cost at Stable Diffusion 1.5's real size, on the CPU, against the pixel-level alternatives.

    python bench/bench_lrm.py [--batch 1] [--pairs 1] [--repeats 2] [--threads N] [--sections 1 2 3]

1. Scoring a noisy 64x64x4 latent with the LRM (`score`: text encoder, conv_in, time embedding, down and mid blocks;
   with VFE 7.5 the UNet runs the empty prompt too, 2x batch; and with VFE off) against decoding it with the VAE to
   512 px and running an open_clip ViT-H-14 image tower at 224 px.
2. The truncated UNet (down + mid, `UNetLRMBackbone.unet_features`) against the full UNet forward, same inputs.
3. One training step (forward + backward over a pair batch with VFE 7.5, AdamW step) on latents drawn from cached
   VAE posteriors (`LatentCache.sample`) against one that VAE-encodes both 512 px images of every pair each step, as
   the paper's reference code does.

Every model is built from its SD1.5 (or open_clip) config with random weights, so nothing is downloaded; the CLIP
tokenizer is a byte-level stand-in, since only its 77-token length matters for the timing. Each contender gets a
warm-up call, then the repeats alternate between contenders and the fastest of each is kept; `--sections` reruns
only some parts. The default run takes about 7.5 minutes on 2 cores (peak memory about 12 GB): half of it is
section 3's five training steps (backward through the down and mid blocks at UNet batch 4, AdamW over 476M
parameters, the VAE encoder at 512 px), a fifth is section 1's three VAE decodes to 512 px.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2, "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2, "sample_size": 512, "scaling_factor": 0.18215,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}
SD15_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear"}


def build_lrm(vfe_scale: float, keep_full_unet: bool):
    """An SD1.5-sized LRM (random weights) and, for section 2, the full UNet it was truncated from."""
    import copy

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lpo.reward.backbones.unet import UNetLRMBackbone, default_taps
    from lpo.reward.lrm.model import LatentRewardModel
    from lpo.reward.toy.random_models import clip_tokenizer

    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(**SD15_UNET)
    full = copy.deepcopy(unet).eval() if keep_full_unet else None
    backbone = UNetLRMBackbone(unet, [text_encoder], resolution=512, tokenizers=[tokenizer])
    lrm = LatentRewardModel(family="sd15", base="random-sd15", taps=default_taps(dict(unet.config)),
                            projection_dim=768, resolution=512, components=backbone.components, vfe_scale=vfe_scale,
                            latent_shape=[4, 64, 64], backbone=backbone)
    return lrm, full


def fastest(contenders: dict[str, Callable[[], object]], repeats: int,
            warm_up: Callable[[], object] | None = None) -> dict[str, float]:
    """Warm up (each contender once, or `warm_up` where one call covers them all), then alternate the timed
    repeats to spread machine noise over the contenders; min seconds per name."""
    for fn in [warm_up] if warm_up else contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def noisy_latents(scheduler, batch: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    t = torch.full((batch,), 501)
    noisy = scheduler.add_noise(torch.randn(batch, 4, 64, 64), torch.randn(batch, 4, 64, 64), t)
    return noisy, t, ["a photo of a red fox sitting in fresh snow, golden hour"] * batch


def scoring_section(lrm, vae, scheduler, batch: int, repeats: int) -> None:
    """1. LRM score (VFE on and off) against VAE decode + CLIP ViT-H-14 image forward."""
    import open_clip

    clip = open_clip.create_model("ViT-H-14", pretrained=None).eval()
    noisy, t, prompts = noisy_latents(scheduler, batch)
    # CLIP's input stands in for the decoded image: pixel values do not change its time, and a decode costs ~20 s
    decoded = torch.rand(batch, 3, 512, 512) * 2 - 1
    from lpo.curate.scorers.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)

    def lrm_score(vfe: float) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            lrm.register_to_config(vfe_scale=vfe)
            return lrm.score(noisy, t, prompts)

        return run

    def decode() -> torch.Tensor:
        return vae.decode(noisy / vae.config.scaling_factor).sample

    def clip_image() -> torch.Tensor:
        pixels = F.interpolate((decoded + 1) / 2, size=224, mode="bicubic", align_corners=False, antialias=True)
        return clip.encode_image((pixels - mean) / std)

    with torch.inference_mode():
        s = fastest({"vfe": lrm_score(7.5), "plain": lrm_score(1.0), "decode": decode, "clip": clip_image}, repeats)
    pixel = s["decode"] + s["clip"]
    print(f"1. Scoring {batch} noisy 64x64x4 latent(s)")
    print(f"  LRM score, VFE 7.5 (UNet batch x2):     {s['vfe']:7.2f} s")
    print(f"  LRM score, VFE off (1.0):               {s['plain']:7.2f} s")
    print(f"  VAE decode to 512 px:                   {s['decode']:7.2f} s")
    print(f"  CLIP ViT-H-14 image forward at 224 px:  {s['clip']:7.2f} s")
    print(f"  decode + CLIP / LRM:                    {pixel / s['vfe']:7.1f}x with VFE, "
          f"{pixel / s['plain']:.1f}x without", flush=True)


def unet_section(lrm, full_unet, scheduler, batch: int, repeats: int) -> None:
    """2. The LRM's down + mid forward against the full UNet (the same weights) on the same inputs."""
    noisy, t, prompts = noisy_latents(scheduler, batch)
    with torch.inference_mode():
        cond = lrm.encode_text(prompts)
        s = fastest({"truncated": lambda: lrm.backbone.unet_features(noisy, t, cond),
                     "full": lambda: full_unet(noisy, t, encoder_hidden_states=cond["context"]).sample}, repeats)
    print(f"2. UNet forward at batch {batch}")
    print(f"  down + mid (truncated):                 {s['truncated']:7.2f} s")
    print(f"  full UNet:                              {s['full']:7.2f} s")
    print(f"  full / truncated:                       {s['full'] / s['truncated']:7.2f}x", flush=True)


def training_section(lrm, vae, scheduler, n: int, repeats: int) -> None:
    """3. A training step on cached posteriors against one that VAE-encodes the pair's images every step."""
    from lpo.reward.lrm.config import CANDIDATE_TIMESTEPS
    from lpo.reward.lrm.latents import LatentCache
    from lpo.reward.lrm.loss import bradley_terry_loss, pair_labels, pair_weights

    lrm.register_to_config(vfe_scale=7.5)
    lrm.train()
    params = [p for p in lrm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.3)
    scaling = vae.config.scaling_factor
    uids = [f"img{i}" for i in range(2 * n)]
    captions = [f"caption {i}" for i in range(n)]
    labels = pair_labels(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool))
    weights = pair_weights(torch.ones(n))
    candidates = torch.tensor(CANDIDATE_TIMESTEPS)
    images = torch.rand(2 * n, 3, 512, 512) * 2 - 1
    generator = torch.Generator().manual_seed(0)

    def step(clean: torch.Tensor) -> None:
        steps = candidates[torch.randint(len(candidates), (n,), generator=generator)].repeat(2)
        x_t = scheduler.add_noise(clean, torch.randn(clean.shape, generator=generator), steps)
        scores = lrm(x_t, steps, captions * 2)
        bradley_terry_loss(scores[:n], scores[n:], labels, weights).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    def encode_each_step() -> None:
        with torch.no_grad():
            clean = vae.encode(images).latent_dist.sample(generator) * scaling
        step(clean)

    with tempfile.TemporaryDirectory() as tmp:
        cache = LatentCache(tmp)
        cache.write_part(uids, torch.randn(2 * n, 4, 64, 64), torch.rand(2 * n, 4, 64, 64) * 0.1)
        # one step with encoding warms the encoder, the forward/backward and AdamW's state for both contenders
        s = fastest({"cached": lambda: step(cache.sample(uids, generator) * scaling), "encode": encode_each_step},
                    repeats, warm_up=encode_each_step)
    print(f"3. Training step, {n} pair(s) (UNet batch {4 * n} with VFE), AdamW over "
          f"{sum(p.numel() for p in params) / 1e6:.0f}M parameters")
    print(f"  cached latents (LatentCache.sample):    {s['cached']:7.2f} s")
    print(f"  VAE-encode both 512 px images per step: {s['encode']:7.2f} s")
    print(f"  encode per step / cached:               {s['encode'] / s['cached']:7.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1, help="latents per scoring call (sections 1 and 2)")
    parser.add_argument("--pairs", type=int, default=1, help="pairs per training step (section 3)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per contender; the fastest is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--sections", type=int, nargs="+", choices=(1, 2, 3), default=[1, 2, 3],
                        help="parts to run, to rerun one alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL, DDPMScheduler

    torch.manual_seed(0)
    lrm, full_unet = build_lrm(vfe_scale=7.5, keep_full_unet=2 in args.sections)
    lrm.eval()
    vae = AutoencoderKL(**SD15_VAE).eval()
    scheduler = DDPMScheduler(**SD15_SCHEDULER)
    print(f"LRM at SD1.5 size, random weights, CPU ({torch.get_num_threads()} threads), fastest of {args.repeats} "
          "after a warm-up", flush=True)
    if 1 in args.sections:
        scoring_section(lrm, vae, scheduler, args.batch, args.repeats)
    if 2 in args.sections:
        unet_section(lrm, full_unet, scheduler, args.batch, args.repeats)
    if 3 in args.sections:
        training_section(lrm, vae, scheduler, args.pairs, args.repeats)


if __name__ == "__main__":
    main()
