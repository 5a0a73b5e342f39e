"""LPO cost at Stable Diffusion 1.5's real size, on the CPU, with random weights (nothing is downloaded).

    python bench/bench_lpo.py [--tuples 1] [--candidates 4] [--steps 4] [--repeats 2] [--threads N] [--sections 1 2 3]

1. The loss step (forward + backward over a batch of preference tuples, LoRA rank 4): one policy and one reference
   CFG forward per batch, as `lpo.reward.lpo.objectives.step_log_probs` does, against the reference code's four
   (policy and reference each run again for the loser, on the same x_t, t and prompt).
2. LRM scoring of K candidates of a step in one batch (`lpo.reward.lpo.sampler.score_candidates`) against one at a
   time.
3. One LPO round for one prompt (`--steps` DDIM steps of the branching sampler, then training on its tuples), split
   into sampling (policy UNet), scoring (LRM) and training time, so the cost structure is visible. The real runs use
   20 steps; every part scales linearly with the step count.

Each contender gets a warm-up call; repeats alternate between contenders and the fastest of each is kept. The UNet
forward at 64x64 latents dominates everything: the default run takes several minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_lrm import SD15_SCHEDULER, SD15_UNET, SD15_VAE, build_lrm, fastest  # noqa: E402


def build_model():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lpo.reward.backbones.unet import UNetGenerator
    from lpo.reward.toy.random_models import clip_tokenizer

    scheduler = DDIMScheduler(**SD15_SCHEDULER, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, max_position_embeddings=77,
                                                vocab_size=49408, projection_dim=768))
    pipeline = StableDiffusionPipeline(vae=AutoencoderKL(**SD15_VAE), text_encoder=text_encoder,
                                       tokenizer=clip_tokenizer(), unet=UNet2DConditionModel(**SD15_UNET),
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.vae.requires_grad_(False)
    pipeline.text_encoder.requires_grad_(False)
    return UNetGenerator(pipeline, "random SD1.5-sized pipeline")


def add_lora(model, rank: int = 4):
    from peft import LoraConfig

    from lpo.reward.lpo.train import Reference

    model.unet.requires_grad_(False)
    model.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                      target_modules=list(model.family.lora_targets)))
    return Reference(model.unet, lora=True)


def four_pass_log_probs(model, reference, batch, cond, config):
    """The reference implementation's way: policy and reference each run once for the winner and once for the
    loser, although both share x_t, t and the prompt."""
    from lpo.reward.lpo.step import gaussian_log_prob

    x_t, t = batch["x_t"], batch["t"]
    out = {}
    for name, target in (("w", batch["x_w"]), ("l", batch["x_l"])):
        policy = model.step(model.predict(x_t, t, cond, config.guidance), t, x_t, config.eta)
        ref = model.step(model.predict(x_t, t, cond, config.guidance, denoiser=reference), t, x_t, config.eta)
        out[name] = gaussian_log_prob(target, policy.mean, policy.std)
        out[f"ref_{name}"] = gaussian_log_prob(target, ref.mean, ref.std)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tuples", type=int, default=1, help="preference tuples per loss step")
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps of the timed round (real runs: 20)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3], help="which parts to run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lpo.reward.lpo.config import LPOConfig
    from lpo.reward.lpo.loss import lpo_loss

    torch.manual_seed(0)
    model = build_model()
    reference = add_lora(model)
    lrm = build_lrm(vfe_scale=7.5, keep_full_unet=False)[0].eval().requires_grad_(False)
    config = LPOConfig(guidance=5.0, eta=1.0)
    model.timesteps(20)
    prompt = "a photo of a red fox in the snow"
    generator = torch.Generator().manual_seed(0)
    shape = (args.tuples, 4, 64, 64)
    batch = {"x_t": torch.randn(shape, generator=generator), "t": torch.tensor([501] * args.tuples),
             "x_w": torch.randn(shape, generator=generator), "x_l": torch.randn(shape, generator=generator)}
    cond = model.encode_prompts([prompt] * args.tuples)

    def loss_step(compute):
        def run():
            log_probs = compute()
            lpo_loss(log_probs["w"], log_probs["l"], log_probs["ref_w"], log_probs["ref_l"])["loss"].backward()
        return run

    print(f"LPO at SD1.5 size on the CPU ({torch.get_num_threads()} threads), random weights, 64x64 latents")
    if 1 in args.sections:
        loss_section(args, loss_step, model, reference, batch, cond, config)
    k = args.candidates
    if 2 in args.sections:
        scoring_section(args, lrm, prompt, generator, k)
    if 3 in args.sections:
        round_section(args, model, reference, lrm, prompt, config, k)


def loss_section(args, loss_step, model, reference, batch, cond, config) -> None:
    from lpo.reward.lpo.objectives import step_log_probs

    steps = fastest({
        "2 passes": loss_step(lambda: step_log_probs(model, model.unet, reference, batch, cond, config)),
        "4 passes": loss_step(lambda: four_pass_log_probs(model, reference, batch, cond, config)),
    }, args.repeats)
    print(f"1. loss step, {args.tuples} tuples (forward + backward, LoRA r4):")
    print(f"   one policy + one reference forward:  {steps['2 passes']:8.2f} s")
    print(f"   reference code's four forwards:      {steps['4 passes']:8.2f} s")
    print(f"   speed-up:                            {steps['4 passes'] / steps['2 passes']:8.2f}x")


def scoring_section(args, lrm, prompt, generator, k) -> None:
    from lpo.reward.lpo import sampler

    children = torch.randn(k, 1, 4, 64, 64, generator=generator)
    with torch.inference_mode():
        text = lrm.encode_text([prompt])

        def one_batch():
            sampler.score_candidates(lrm, children, 501, [prompt], text)

        def one_at_a_time():
            for i in range(k):
                sampler.score_candidates(lrm, children[i:i + 1], 501, [prompt], text)

        scoring = fastest({"batched": one_batch, "single": one_at_a_time}, args.repeats)
    print(f"2. LRM scoring of K={k} candidates (VFE 7.5):")
    print(f"   one batch of K:                      {scoring['batched']:8.2f} s")
    print(f"   one at a time:                       {scoring['single']:8.2f} s")
    print(f"   speed-up:                            {scoring['single'] / scoring['batched']:8.2f}x")


def round_section(args, model, reference, lrm, prompt, config, k) -> None:
    from lpo.reward.lpo import sampler
    from lpo.reward.lpo.loss import lpo_loss
    from lpo.reward.lpo.objectives import step_log_probs

    timers = {"sampling": 0.0, "scoring": 0.0}
    real_predict, real_score = model.predict, sampler.score_candidates

    def timed(name, func):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return func(*a, **kw)
            finally:
                timers[name] += time.perf_counter() - start
        return wrapper

    model.predict = timed("sampling", real_predict)
    sampler.score_candidates = timed("scoring", real_score)
    thresholds = {t: 0.0 for t in model.timesteps(args.steps)}  # keep every step's pair
    start = time.perf_counter()
    result = sampler.rollout(model, model.encode_prompts([prompt]), [prompt], lrm,
                             [torch.Generator().manual_seed(1)], thresholds, steps=args.steps, k=k)
    rollout_s = time.perf_counter() - start
    model.predict, sampler.score_candidates = real_predict, real_score
    tuples = result.tensors()
    start = time.perf_counter()
    for i in range(len(result)):
        one = {key: tuples[key][i:i + 1] for key in ("x_t", "t", "x_w", "x_l")}
        log_probs = step_log_probs(model, model.unet, reference, one, model.encode_prompts([prompt]), config)
        lpo_loss(log_probs["w"], log_probs["l"], log_probs["ref_w"], log_probs["ref_l"])["loss"].backward()
    training_s = time.perf_counter() - start
    other = rollout_s - timers["sampling"] - timers["scoring"]
    total = rollout_s + training_s
    print(f"3. one LPO round, 1 prompt, {args.steps} DDIM steps, K={k}, {len(result)} tuples trained one by one:")
    for name, seconds in (("sampling (policy UNet, CFG)", timers["sampling"]), ("scoring (LRM)", timers["scoring"]),
                          ("DDIM maths and bookkeeping", other), ("training", training_s)):
        print(f"   {name:36s} {seconds:8.2f} s  {100 * seconds / total:5.1f}%")
    print(f"   total                                {total:8.2f} s  (x{20 / args.steps:.0f} for 20 steps)")


if __name__ == "__main__":
    main()
