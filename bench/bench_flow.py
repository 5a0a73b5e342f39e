"""The flow-matching LRM and one LPO round at Stable Diffusion 3.5-Medium's real size, on the CPU.

    python bench/bench_flow.py [--resolution 512] [--threads N] [--candidates 4] [--steps 20]

1. Scoring one noisy latent with the LRM (the first 18 of the 24 joint blocks, VFE 7.5: the blocks run the empty
   prompt too, 2x batch) against one full transformer forward with CFG (2x batch: a sampling step), and against the
   pixel route of image-space reward models: decoding a latent with the SD3 VAE and running an open_clip ViT-H-14
   image tower at 224 px, after predicting the clean latent with one CFG forward where the latent is noisy.
2. One LPO round for one prompt, split into its parts: sampling (one CFG forward and the SDE step per step),
   scoring (the LRM on the K children of every step) and training (one preference tuple: the policy's CFG forward
   and backward through a rank-32 LoRA with gradient checkpointing, the reference's CFG forward with the adapter
   disabled, the LPO loss on the flow step's log-densities). Each part is measured once and multiplied by how often
   a round runs it (steps, K x steps, and the tuples: one per trained step when every gap passes).

Every model is built from its published config (`lpo.reward.backbones.published`) with random weights, so nothing is
downloaded; text conditioning is random tensors of the real shapes (77 CLIP + 256 T5 tokens of 4096, a pooled 2048),
since a prompt is encoded once per round. A part costs tens of seconds at 512 px on 2 cores, so each is timed once
(no repeats); the whole run takes about 12 minutes there and peaks near 14 GB (the transformer in float32).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def conditioning(seed: int, config) -> dict[str, torch.Tensor]:
    """One prompt's conditioning of the real shapes (random values: a prompt's cost does not depend on them)."""
    from lpo.reward.backbones.mmdit import SD3_TEXT_TOKENS

    generator = torch.Generator().manual_seed(seed)
    return {"context": torch.randn(1, SD3_TEXT_TOKENS, config.joint_attention_dim, generator=generator),
            "pooled": torch.randn(1, config.pooled_projection_dim, generator=generator)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (SD3.5-M: 512 to 1440)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--candidates", type=int, default=4, help="K children per step")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps per trajectory")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from peft import LoraConfig

    from lpo.reward.backbones import flow
    from lpo.reward.backbones.base import classifier_free
    from lpo.reward.backbones.family import FAMILIES
    from lpo.reward.backbones.mmdit import SD3_TEXT_TOKENS, SD3LRMBackbone
    from lpo.reward.backbones.published import PIPELINES
    from lpo.reward.lpo.loss import lpo_loss
    from lpo.reward.lpo.step import gaussian_log_prob
    from lpo.reward.lrm.model import LatentRewardModel

    published = PIPELINES["sd35m"]
    side = args.resolution // 8
    torch.manual_seed(0)
    start = time.perf_counter()
    transformer = SD3Transformer2DModel.from_config(published["transformer"]).eval()
    config = transformer.config
    n_params = sum(p.numel() for p in transformer.parameters())
    print(f"SD3.5-Medium transformer: {n_params / 1e9:.3f}B parameters, built in {time.perf_counter() - start:.0f} s; "
          f"{args.resolution} px = {(side // 2) ** 2} image tokens + {SD3_TEXT_TOKENS} text tokens; "
          f"{torch.get_num_threads()} threads", flush=True)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(args.steps)
    t = scheduler.timesteps[args.steps // 2].item()
    x = torch.randn(1, 16, side, side, generator=torch.Generator().manual_seed(1))
    cond, uncond = conditioning(1, config), conditioning(2, config)
    both = {key: torch.cat([uncond[key], cond[key]]) for key in cond}

    def cfg_velocity(model) -> torch.Tensor:
        out = model(hidden_states=torch.cat([x, x]), encoder_hidden_states=both["context"],
                    pooled_projections=both["pooled"], timestep=torch.full((2,), t)).sample
        return classifier_free(out, 4.5)

    # a sampling step: one CFG forward of the full transformer and the SDE step
    with torch.inference_mode():
        sample_s = timed(lambda: flow.step_stats(scheduler, cfg_velocity(transformer), torch.tensor([t]), x, 0.7))
    print(f"  sampling step (CFG forward, 24 blocks, batch 2):      {sample_s:7.1f} s", flush=True)

    # one preference tuple's training step: LoRA policy forward + backward, reference forward
    family = FAMILIES["sd3"]
    transformer.add_adapter(LoraConfig(r=32, lora_alpha=32, init_lora_weights="gaussian",
                                       target_modules=list(family.lora_targets)))
    transformer.enable_gradient_checkpointing()
    transformer.train()
    stats = flow.step_stats(scheduler, torch.randn_like(x), torch.tensor([t]), x, 0.7)
    x_w, x_l = stats.mean + stats.std * torch.randn_like(x), stats.mean + stats.std * torch.randn_like(x)

    def train_tuple() -> None:
        policy = flow.step_stats(scheduler, cfg_velocity(transformer), torch.tensor([t]), x, 0.7)
        with torch.no_grad():
            transformer.disable_adapters()
            reference = flow.step_stats(scheduler, cfg_velocity(transformer), torch.tensor([t]), x, 0.7)
            transformer.enable_adapters()
        losses = lpo_loss(gaussian_log_prob(x_w, policy.mean, policy.std), gaussian_log_prob(x_l, policy.mean,
                                                                                           policy.std),
                          gaussian_log_prob(x_w, reference.mean, reference.std),
                          gaussian_log_prob(x_l, reference.mean, reference.std))
        losses["loss"].backward()

    train_s = timed(train_tuple)
    print(f"  training on one tuple (LoRA fwd+bwd, ref fwd, CFG):   {train_s:7.1f} s", flush=True)
    transformer.disable_adapters()
    transformer.disable_gradient_checkpointing()
    transformer.eval()

    # the LRM: the same transformer's first 18 blocks (no copy), the projections, VFE 7.5
    backbone = SD3LRMBackbone(transformer, args.resolution, 18, "", {"text_encoder": {"projection_dim": 768},
                                                                       "text_encoder_2": {"projection_dim": 1280}})
    lrm = LatentRewardModel(family="sd3", base="", taps=backbone.default_taps(), projection_dim=1280,
                            resolution=args.resolution, components=backbone.components, latent_shape=[16, side, side],
                            depth=18, backbone=backbone).eval()
    text = {**cond, "text": lrm.text_projection(cond["pooled"])}
    with torch.inference_mode():
        lrm_s = timed(lambda: lrm.visual_features(x, torch.tensor([t]), text, uncond))
    print(f"  LRM score of one latent (18 blocks, VFE, batch 2):    {lrm_s:7.1f} s", flush=True)
    lrm = backbone = transformer = None  # free the ~10 GB transformer before the VAE and ViT-H

    # the pixel route: the SD3 VAE decode and an open_clip ViT-H-14 image forward
    import open_clip

    from lpo.curate.scorers.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    vae = AutoencoderKL.from_config(published["vae"]).eval()
    clip = open_clip.create_model("ViT-H-14", pretrained=None).eval()
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        decoded: list[torch.Tensor] = []
        decode_s = timed(lambda: decoded.append(vae.decode(x / 1.5305 + 0.0609).sample))
        pixels = F.interpolate((decoded[0].clamp(-1, 1) + 1) / 2, size=224, mode="bicubic", antialias=True)
        clip_s = timed(lambda: clip.encode_image((pixels - mean) / std))
    pixel_s = decode_s + clip_s
    print(f"  VAE decode to {args.resolution} px + ViT-H-14 at 224 px:        {pixel_s:7.1f} s "
          f"({decode_s:.1f} + {clip_s:.1f})", flush=True)

    k, steps = args.candidates, args.steps
    tuples = steps - 1  # every trained step forms a pair at threshold 0; the last step forms none
    sampling, scoring, training = steps * sample_s, steps * k * lrm_s, tuples * train_s
    total = sampling + scoring + training
    # an image-space reward model cannot read a noisy child: it needs the child's clean prediction first, one more
    # CFG forward of the generator, then the decode and the image tower
    noisy_pixel_s = sample_s + pixel_s
    print("1. Scoring one noisy latent")
    print(f"  LRM (VFE) / a CFG transformer forward:        {lrm_s / sample_s:6.2f} (18 of 24 blocks: {18 / 24:.2f})")
    print(f"  decode + ViT-H of a clean latent / LRM:       {pixel_s / lrm_s:6.2f}x")
    print(f"  x0 prediction + decode + ViT-H / LRM:         {noisy_pixel_s / lrm_s:6.2f}x (what a noisy child needs)")
    print(f"2. One LPO round, one prompt, {steps} steps, K = {k}, {tuples} tuples")
    for name, seconds in (("sampling", sampling), ("scoring", scoring), ("training", training)):
        print(f"  {name:9s} {seconds / 60:7.1f} min  {100 * seconds / total:5.1f}%")
    print(f"  scoring with the pixel route instead: {steps * k * noisy_pixel_s / 60:7.1f} min "
          f"({steps * k * noisy_pixel_s / scoring:.2f}x the LRM's; x0 prediction, decode, ViT-H per child)")


if __name__ == "__main__":
    main()
