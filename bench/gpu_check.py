"""The prepared GPU check: the toolkit's costs at real size on one GPU, written to one JSON.

    python bench/gpu_check.py --out bench/results/gpu_check.json            # one CUDA GPU, about 5 minutes
    python bench/gpu_check.py --tiny --device cpu --out /tmp/gpu_check.json  # the tiny models (what the tests run)

Random weights from the published SD1.5 and SDXL configs (`lpo.reward.backbones.published`; nothing is
downloaded; the CLIP tokenizer is a byte-level stand-in of the same 77-token length), so the numbers are costs,
not quality:

1. `scoring`: the LRM's score of a batch of noisy latents (bf16, VFE 7.5) at batch 1, 8 and 32, against the pixel
   route on the same batch: VAE decode to 512 px and an open_clip ViT-H-14 image forward at 224 px. SD1.5.
2. `lrm_training`: one LRM training step (bf16 autocast, AdamW over every parameter) with and without gradient
   checkpointing, SD1.5 (4 pairs) and SDXL (1 pair), with the peak memory of each: the step's own peak (above what
   the process held before the LRM was built) beside what `--dry-run` plans for it, and their ratio.
3. `lpo`: the LPO loss step (float16 base, float32 LoRA rank 4, 4 tuples: one policy and one reference forward;
   its peak above what the process held before the generator was built, beside the plan),
   and one SD1.5 LPO round (20 DDIM steps, K = 4, 5 prompts, then training on every tuple) split into sampling,
   LRM scoring and training time, with its peak memory.
4. `flow`: Stable Diffusion 3.5-Medium at 512 px (its published config; the pipeline without T5, which feeds the
   transformer 256 zero tokens in its place, so the transformer's cost is the real one): the LRM (18 of 24 joint
   blocks, VFE 7.5, bf16) against the pixel route (SD3 VAE decode and ViT-H-14) at batch 1 and 4; one LRM training
   step (1 pair) with and without gradient checkpointing, and 2 pairs without; the LPO and GRPO loss steps
   (float16 base, float32 LoRA rank 32, checkpointing: 2 tuples, or 2 parents of K = 4 children); one round of 2
   prompts (20 flow SDE steps, K = 4) split into sampling, scoring and training with LPO, then GRPO's training on
   the same round's groups.

Times are the fastest of `--repeats` after a warm-up, synchronised on the device; ratios are printed as the
benchmarks in bench/ print them. `--tiny` runs every part on the tiny models of `lpo dev tiny-models`.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Clock:
    """Wall time of a call, the device synchronised before and after; peak memory of a section on CUDA."""

    def __init__(self, device: str, repeats: int):
        self.device = device
        self.repeats = repeats

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def fastest(self, fn: Callable[[], Any]) -> float:
        fn()  # warm-up: kernels, allocator, optimizer state
        times = []
        for _ in range(self.repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return min(times)

    def reset_peak(self) -> None:
        if self.device.startswith("cuda"):
            gc.collect()  # models dropped in a reference cycle are freed now, not inside the next section
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 1e9 if self.device.startswith("cuda") else None

    def allocated_gb(self) -> float | None:
        if not self.device.startswith("cuda"):
            return None
        gc.collect()  # what is held, not what waits for the cycle collector
        return torch.cuda.memory_allocated() / 1e9


def plan_memory() -> Any:
    """bench/plan_memory.py as a module: its planners of one training step."""
    spec = importlib.util.spec_from_file_location("plan_memory", Path(__file__).with_name("plan_memory.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def planned_lrm_gb(base: Path, family: str, pairs: int, checkpointing: bool, work: Path, device: str,
                   resolution: int | None = None) -> float:
    """What `lpo reward train --dry-run` plans for one process of the step `lrm_step` makes (bf16 autocast over float32
    weights, feature guidance 7.5, AdamW), in GB."""
    memory = plan_memory()
    case = memory.Case("lrm", family, family, "bf16", checkpointing, resolution, vfe_scale=7.5, device=device)
    return memory.plan_lrm(case, pairs, work, base)["planned_bytes"] / 1e9


def planned_lpo_gb(base: Path, family: str, items: int, work: Path, device: str, objective: str = "lpo",
                   checkpointing: bool = False, resolution: int | None = None) -> float:
    """What `lpo optimize --dry-run` plans for one process of a loss step (fp16 frozen weights and compute, CFG 5,
    the family's LoRA rank), an LRM of the base held, in GB."""
    memory = plan_memory()
    case = memory.Case(objective, family, family, "fp16", checkpointing, resolution, device=device)
    return memory.plan_step(case, items, work, base)["planned_bytes"] / 1e9


def timed(clock: Clock, timers: dict[str, float], name: str, fn: Callable) -> Callable:
    """`fn`, its synchronised wall time added to timers[name] on every call."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        clock.sync()
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock.sync()
            timers[name] += time.perf_counter() - start
    return wrapper


def timed_round(model: Any, clock: Clock, sample: Callable[[], Any],
                train: Callable[[Any], None]) -> tuple[Any, dict[str, float]]:
    """`sample()` (a rollout) with the generator's forwards and the LRM's scoring timed apart, then `train(result)`;
    returns the rollout and the split of the round's wall time."""
    from lpo.reward.lpo import sampler

    timers = {"sampling": 0.0, "scoring": 0.0}
    real_predict, real_score = model.predict, sampler.score_candidates
    model.predict = timed(clock, timers, "sampling", real_predict)
    sampler.score_candidates = timed(clock, timers, "scoring", real_score)
    clock.reset_peak()
    start = time.perf_counter()
    try:
        result = sample()
        clock.sync()
        rollout_s = time.perf_counter() - start
    finally:
        model.predict, sampler.score_candidates = real_predict, real_score
    start = time.perf_counter()
    train(result)
    clock.sync()
    training_s = time.perf_counter() - start
    return result, {"total_s": rollout_s + training_s, "sampling_s": timers["sampling"],
                    "scoring_s": timers["scoring"], "step_maths_s": rollout_s - timers["sampling"] - timers["scoring"],
                    "training_s": training_s}


def generator(family: str, tiny: Path | None, device: str, dtype: torch.dtype) -> Any:
    """A Generator of `family`: the tiny pipeline, or one built from the published configs with random weights."""
    from lpo.reward.backbones import get_family, load_generator

    if tiny is not None:
        return load_generator(str(tiny / family), dtype=dtype, device=device)
    if family == "sd3":
        return sd35_medium(device, dtype)
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lpo.reward.backbones.published import PIPELINES, SCHEDULER
    from lpo.reward.toy.random_models import clip_tokenizer

    configs, adapter = PIPELINES[family], get_family(family)
    with torch.device(device):  # random init where the model runs: seconds on a GPU, not minutes on the CPU
        parts = {"unet": diffusers.UNet2DConditionModel.from_config(configs["unet"]),
                 "vae": diffusers.AutoencoderKL.from_config(configs["vae"]),
                 "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])),
                 "tokenizer": clip_tokenizer(), "scheduler": diffusers.DDIMScheduler.from_config(SCHEDULER)}
        if "text_encoder_2" in configs:
            parts |= {"tokenizer_2": clip_tokenizer(), "text_encoder_2": CLIPTextModelWithProjection(
                CLIPTextConfig.from_dict(configs["text_encoder_2"]))}
        else:
            parts |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipeline = getattr(diffusers, adapter.pipeline)(**parts).to(device, dtype)
    pipeline.vae.to(torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    for module in (pipeline.vae, pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)
    return adapter.generator(pipeline, f"random {family} (published config)")


def sd35_medium(device: str, dtype: torch.dtype) -> Any:
    """An SD3.5-Medium Generator from the published configs with random weights, without T5 (4.7B parameters that
    run once per prompt; the pipeline then feeds 256 zero tokens in T5's place, so the transformer's cost is the
    real one)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from lpo.reward.backbones import get_family
    from lpo.reward.backbones.published import FLOW_SCHEDULER, PIPELINES
    from lpo.reward.toy.random_models import clip_tokenizer

    configs = PIPELINES["sd35m"]
    with torch.device(device):
        # sample_size 64: 512 px, where LPO and Flow-GRPO train SD3.5-Medium (the parameters do not depend on it)
        transformer = diffusers.SD3Transformer2DModel.from_config({**configs["transformer"], "sample_size": 64})
        parts = {"transformer": transformer,
                 "vae": diffusers.AutoencoderKL.from_config(configs["vae"]),
                 "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder"])),
                 "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"])),
                 "tokenizer": clip_tokenizer(), "tokenizer_2": clip_tokenizer(), "text_encoder_3": None,
                 "tokenizer_3": None,
                 "scheduler": diffusers.FlowMatchEulerDiscreteScheduler.from_config(FLOW_SCHEDULER)}
    pipeline = diffusers.StableDiffusion3Pipeline(**parts).to(device, dtype)
    pipeline.vae.to(torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    for module in (pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2):
        module.requires_grad_(False)
    return get_family("sd3").generator(pipeline, "random sd3.5-medium (published config)")


def reward_model(model: Any, vfe_scale: float = 7.5) -> Any:
    """An LRM on a copy of the generator's denoiser and its text encoders (random weights, as the generator's)."""
    import copy

    from lpo.reward.lrm.model import LatentRewardModel

    family = model.family
    pipeline = model.pipeline
    if family.flow_matching:
        names = [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(pipeline, n, None)]
        backbone = family.lrm_backbone(
            copy.deepcopy(pipeline.transformer), model.resolution,
            family.lrm_backbone.default_depth(pipeline.transformer.config), "",
            {name: getattr(pipeline, name).config.to_dict() for name in names},
            [getattr(pipeline, name.replace("text_encoder", "tokenizer")) for name in names],
            {name: copy.deepcopy(getattr(pipeline, name)) for name in names})
        lrm = LatentRewardModel(family=family.name, base=model.base, taps=backbone.default_taps(),
                                projection_dim=backbone.projection_dim, resolution=model.resolution,
                                components=backbone.components, vfe_scale=vfe_scale,
                                latent_shape=list(model.latent_shape), depth=backbone.depth, backbone=backbone)
        lrm = lrm.to(model.device, torch.float32).requires_grad_(True)
        for encoder in backbone._encoders.values():  # the frozen encoders in half precision, as the trainer holds
            encoder.to(torch.bfloat16)
        return lrm
    encoders = [copy.deepcopy(getattr(pipeline, name)) for name in family.lrm_backbone.text_encoders]
    tokenizers = [pipeline.tokenizer] + ([pipeline.tokenizer_2] if len(encoders) > 1 else [])
    backbone = family.lrm_backbone(copy.deepcopy(pipeline.unet), encoders, model.resolution, tokenizers)
    lrm = LatentRewardModel(family=family.name, base=model.base, taps=backbone.default_taps(),
                            projection_dim=backbone.text_width, resolution=model.resolution,
                            components=backbone.components, vfe_scale=vfe_scale,
                            latent_shape=list(backbone.latent_shape), backbone=backbone)
    return lrm.to(model.device, torch.float32).requires_grad_(True)


def clip_tower(tiny: Path | None, device: str) -> tuple[Any, int]:
    """open_clip's ViT-H-14 image tower with random weights (the tiny open_clip model with --tiny)."""
    import open_clip

    with torch.device(device):
        name = f"local-dir:{tiny / 'clip'}" if tiny is not None else "ViT-H-14"
        model = open_clip.create_model(name, pretrained=None, device=device)
    size = model.visual.image_size
    return model.to(device).eval(), size[0] if isinstance(size, (tuple, list)) else size


def scoring(model: Any, clock: Clock, tiny: Path | None, batches: list[int]) -> dict[str, Any]:
    import copy

    import torch.nn.functional as F

    dtype = torch.bfloat16  # every contender in bf16
    lrm = reward_model(model).eval().to(dtype)
    clip, side = clip_tower(tiny, model.device.type)
    clip = clip.to(dtype)
    vae = copy.deepcopy(model.vae).to(dtype)
    out: dict[str, Any] = {"model": "SD1.5-sized LRM, VFE 7.5; VAE decode and CLIP ViT-H-14; all bf16", "batches": {}}
    for batch in batches:
        latents = torch.randn(batch, *model.latent_shape, device=model.device, dtype=dtype)
        steps = torch.full((batch,), 501, device=model.device)
        prompts = ["a photo of a red fox sitting in fresh snow, golden hour"] * batch
        pixels = torch.rand(batch, 3, model.resolution, model.resolution, device=model.device, dtype=dtype)
        with torch.inference_mode():
            lrm_s = clock.fastest(lambda x=latents, t=steps, c=prompts: lrm.score(x, t, c))
            decode_s = clock.fastest(lambda x=latents: vae.decode(x / vae.config.scaling_factor).sample)
            clip_s = clock.fastest(lambda x=pixels: clip.encode_image(F.interpolate(x, size=side, mode="bicubic")))
        out["batches"][str(batch)] = {"lrm_s": lrm_s, "decode_s": decode_s, "clip_s": clip_s,
                                      "pixel_route_over_lrm": (decode_s + clip_s) / lrm_s,
                                      "lrm_latents_per_s": batch / lrm_s}
        print(f"scoring, batch {batch:3d}: LRM {lrm_s:8.4f} s, decode + CLIP {decode_s + clip_s:8.4f} s: "
              f"{(decode_s + clip_s) / lrm_s:6.1f}x", flush=True)
    return out


def lrm_step(model: Any, clock: Clock, pairs: int, checkpointing: bool,
             planned_gb: float | None = None) -> dict[str, Any]:
    """One LRM update, timed; its peak memory above what the process held before the LRM was built (the step's own:
    the LRM's weights, gradients and moments and the activations), beside the plan's `planned_gb`."""
    from lpo.reward.lrm.loss import bradley_terry_loss, pair_labels, pair_weights

    before = clock.allocated_gb()
    lrm = reward_model(model).train()
    if checkpointing:
        lrm.backbone.enable_gradient_checkpointing()
    params = [p for p in lrm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    latents = torch.randn(2 * pairs, *model.latent_shape, device=model.device)
    steps = torch.full((2 * pairs,), 501, device=model.device)
    captions = [f"caption {i}" for i in range(pairs)] * 2
    labels = pair_labels(torch.zeros(pairs, dtype=torch.long), torch.zeros(pairs, dtype=torch.bool)).to(model.device)
    weights = pair_weights(torch.ones(pairs)).to(model.device)
    autocast = torch.autocast(model.device.type, dtype=torch.bfloat16)

    def step() -> None:
        with autocast:
            scores = lrm(latents, steps, captions)
        bradley_terry_loss(scores[:pairs], scores[pairs:], labels, weights).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    clock.reset_peak()
    seconds = clock.fastest(step)
    peak = clock.peak_gb()
    result = {"pairs": pairs, "gradient_checkpointing": checkpointing, "step_s": seconds, "peak_memory_gb": peak,
              "step_peak_gb": None if peak is None else peak - before, "planned_gb": planned_gb,
              "parameters_trained": sum(p.numel() for p in params)}
    if peak is not None and planned_gb is not None:
        result["measured_over_planned"] = (peak - before) / planned_gb
    return result


def lrm_training(sd15: Any, sdxl: Any, clock: Clock, bases: dict[str, Path],
                 work: Path) -> dict[str, Any]:
    out = {}
    for name, model, pairs in (("sd15", sd15, 4), ("sdxl", sdxl, 1)):
        runs = [lrm_step(model, clock, pairs, checkpointing,
                         planned_lrm_gb(bases[name], name, pairs, checkpointing, work, clock.device))
                for checkpointing in (False, True)]
        out[name] = {"plain": runs[0], "checkpointed": runs[1],
                     "checkpointing_time_cost": runs[1]["step_s"] / runs[0]["step_s"]}
        peaks = [r["peak_memory_gb"] for r in runs]
        if peaks[0] is not None:
            out[name]["checkpointing_memory_saving"] = peaks[0] / peaks[1]
        print(f"LRM step {name} ({pairs} pair(s)): {runs[0]['step_s']:.3f} s plain, {runs[1]['step_s']:.3f} s "
              f"checkpointed; peak memory {peaks}", flush=True)
        for run in runs:
            print(f"  planned vs measured ({'checkpointed' if run['gradient_checkpointing'] else 'plain'}): "
                  + planned_against(run["planned_gb"], run["step_peak_gb"]), flush=True)
    return out


def plan_inputs(tiny: Path | None, work: Path) -> tuple[dict[str, Path], Path]:
    """The pipelines the plans read (the tiny ones, or the published configs) and the plans' folder."""
    from lpo.reward.backbones.published import write_pipeline_configs

    bases = {family: tiny / family if tiny is not None else write_pipeline_configs(family, work / "plans" / family)
             for family in ("sd15", "sdxl")}
    return bases, work / "plans"


def planned_against(planned_gb: float, measured_gb: float | None) -> str:
    measured = "not measured (CPU)" if measured_gb is None else \
        f"{measured_gb:.2f} GB measured, ratio {measured_gb / planned_gb:.2f}"
    return f"{planned_gb:.2f} GB planned, {measured}"


def lpo(model: Any, clock: Clock, steps: int, prompts: int, k: int, before_gb: float | None = None,
        planned_gb: float | None = None) -> dict[str, Any]:
    """The LPO loss step and one round; `before_gb`: what the process held before `model` was built, so the loss
    step's peak above it (the generator, the LRM, the LoRA and the step's activations) stands beside `planned_gb`."""
    from peft import LoraConfig

    from lpo.reward.lpo import sampler
    from lpo.reward.lpo.config import LPOConfig
    from lpo.reward.lpo.loss import lpo_loss
    from lpo.reward.lpo.objectives import step_log_probs
    from lpo.reward.lpo.train import Reference

    lrm = reward_model(model).eval().requires_grad_(False).to(model.dtype)
    unet = model.unet
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=list(model.family.lora_targets)))
    params = [p for p in unet.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()
    optimizer = torch.optim.AdamW(params, lr=6e-5)
    reference = Reference(unet, lora=True)
    config = LPOConfig(guidance=5.0, eta=1.0)
    model.timesteps(steps)
    texts = ["a photo of a red fox in the snow", "a castle on a hill at dawn", "two cats on a sofa",
             "a bowl of ramen, studio light", "an astronaut riding a horse"][:prompts]

    def train_on(batch: dict[str, torch.Tensor], cond: Any) -> None:
        with torch.autocast(model.device.type, dtype=model.dtype, enabled=model.device.type == "cuda"):
            log_probs = step_log_probs(model, unet, reference, batch, cond, config)
            loss = lpo_loss(log_probs["w"], log_probs["l"], log_probs["ref_w"], log_probs["ref_l"])["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    shape = (4, *model.latent_shape)
    batch = {"x_t": torch.randn(shape, device=model.device), "t": torch.tensor([501] * 4),
             "x_w": torch.randn(shape, device=model.device), "x_l": torch.randn(shape, device=model.device)}
    cond = model.encode_prompts([texts[0]] * 4)
    clock.reset_peak()
    loss_s = clock.fastest(lambda: train_on(batch, cond))
    loss_peak = clock.peak_gb()
    print(f"LPO loss step (4 tuples, fp16 base, fp32 LoRA): {loss_s:.3f} s, peak {loss_peak}", flush=True)
    own = None if loss_peak is None or before_gb is None else loss_peak - before_gb
    if planned_gb is not None:
        print("  planned vs measured: " + planned_against(planned_gb, own), flush=True)

    def train_round(result: Any) -> None:
        tuples = result.tensors()
        for first in range(0, len(result), 4):
            rows = slice(first, first + 4)
            chunk = {"x_t": tuples["x_t"][rows].to(model.device), "t": tuples["t"][rows],
                     "x_w": tuples["x_w"][rows].to(model.device), "x_l": tuples["x_l"][rows].to(model.device)}
            train_on(chunk, model.encode_prompts([texts[i] for i in tuples["prompt"][rows].tolist()]))

    generators = [torch.Generator().manual_seed(i) for i in range(len(texts))]
    keep_all = {t: -1.0 for t in model.timesteps(steps)}
    result, split = timed_round(model, clock, lambda: sampler.rollout(
        model, model.encode_prompts(texts), texts, lrm, generators, keep_all, steps=steps, k=k, denoiser=unet),
        train_round)
    total = split.pop("total_s")
    print(f"LPO round ({len(texts)} prompts, {steps} steps, K={k}, {len(result)} tuples): {total:.2f} s = "
          + ", ".join(f"{name.removesuffix('_s')} {100 * s / total:.0f}%" for name, s in split.items()), flush=True)
    return {"loss_step": {"tuples": 4, "step_s": loss_s, "peak_memory_gb": loss_peak, "step_peak_gb": own,
                          "planned_gb": planned_gb,
                          "measured_over_planned": None if own is None or not planned_gb else own / planned_gb},
            "round": {"prompts": len(texts), "steps": steps, "candidates": k, "tuples": len(result),
                      "total_s": total, **split, "peak_memory_gb": clock.peak_gb()}}


def flow(model: Any, clock: Clock, tiny: Path | None, work: Path, before_gb: float | None = None,
         steps: int = 20, prompts: int = 2, k: int = 4) -> dict[str, Any]:
    """Section 4 on an SD3 generator (SD3.5-Medium at 512 px without T5, or the tiny sd3 pipeline with --tiny);
    `before_gb`: what the process held before `model` was built, so the loss steps' peaks above it stand beside
    their plans, planned on the same pipeline (in `work`)."""
    import copy

    import torch.nn.functional as F
    from peft import LoraConfig

    from lpo.reward.backbones.published import write_pipeline_configs
    from lpo.reward.lpo import sampler
    from lpo.reward.lpo.config import LPOConfig
    from lpo.reward.lpo.objectives import GRPO, LPO
    from lpo.reward.lpo.train import Reference

    out: dict[str, Any] = {"model": f"{model.base}, {model.resolution} px, LRM depth "
                                    f"{model.family.lrm_backbone.default_depth(model.transformer.config)}"}
    grid = model.timesteps(steps)
    texts = ["a photo of a red fox in the snow", "a castle on a hill at dawn", "two cats on a sofa",
             "a bowl of ramen, studio light"]
    # 1. scoring: the LRM against decode + ViT-H, all bf16
    dtype = torch.bfloat16
    lrm = reward_model(model).eval().to(dtype)
    clip, side = clip_tower(tiny, model.device.type)
    clip, vae = clip.to(dtype), copy.deepcopy(model.vae).to(dtype)
    shift = vae.config.shift_factor or 0.0
    out["scoring"] = {}
    for batch in (1, 4):
        latents = torch.randn(batch, *model.latent_shape, device=model.device, dtype=dtype)
        timesteps = torch.full((batch,), grid[steps // 2], device=model.device)
        captions = texts[:1] * batch
        with torch.inference_mode():
            lrm_s = clock.fastest(lambda x=latents, t=timesteps, c=captions: lrm.score(x, t, c))
            decode_s = clock.fastest(lambda x=latents: vae.decode(x / vae.config.scaling_factor + shift).sample)
            pixels = torch.rand(batch, 3, model.resolution, model.resolution, device=model.device, dtype=dtype)
            clip_s = clock.fastest(lambda x=pixels: clip.encode_image(F.interpolate(x, size=side, mode="bicubic")))
        out["scoring"][str(batch)] = {"lrm_s": lrm_s, "decode_s": decode_s, "clip_s": clip_s,
                                      "pixel_route_over_lrm": (decode_s + clip_s) / lrm_s}
        print(f"flow scoring, batch {batch}: LRM {lrm_s:.4f} s, decode + CLIP {decode_s + clip_s:.4f} s: "
              f"{(decode_s + clip_s) / lrm_s:.1f}x", flush=True)
    lrm = clip = vae = None  # free them before the training sections
    # 2. an LRM training step, planned on the pipeline it runs: the published configs without T5, at 512 px
    base, resolution = ((tiny / "sd3", None) if tiny is not None else
                        (write_pipeline_configs("sd35m", work / "sd35m", ("text_encoder_3",)), model.resolution))
    # (2 pairs too, plain: what a pair adds, where the MMDiT's activations are most of the step)
    runs = [lrm_step(model, clock, pairs, checkpointing,
                     planned_lrm_gb(base, "sd3", pairs, checkpointing, work, clock.device, resolution))
            for pairs, checkpointing in ((1, False), (1, True), (2, False))]
    out["lrm_training"] = {"plain": runs[0], "checkpointed": runs[1], "plain_2_pairs": runs[2]}
    print(f"flow LRM step (1 pair): {runs[0]['step_s']:.3f} s plain, {runs[1]['step_s']:.3f} s checkpointed; peak "
          f"memory {[r['peak_memory_gb'] for r in runs]}", flush=True)
    for run in runs:
        print(f"  planned vs measured ({'checkpointed' if run['gradient_checkpointing'] else 'plain'}, "
              f"{run['pairs']} pair(s)): " + planned_against(run["planned_gb"], run["step_peak_gb"]), flush=True)
    # 3. LPO and GRPO: half-precision base, float32 LoRA rank 32 on both streams, checkpointing, an LRM held
    half = torch.float16 if model.device.type == "cuda" else torch.float32
    model.pipeline.to(dtype=half)
    model.vae.to(torch.float32)
    lrm = reward_model(model).eval().requires_grad_(False).to(half)
    denoiser = model.transformer
    denoiser.requires_grad_(False)
    denoiser.add_adapter(LoraConfig(r=32, lora_alpha=32, init_lora_weights="gaussian",
                                    target_modules=list(model.family.lora_targets)))
    params = [p for p in denoiser.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()
    denoiser.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    reference = Reference(denoiser, lora=True)
    configs = {name: LPOConfig(family="sd3", objective=name, steps=steps, candidates=k).resolved()
               for name in ("lpo", "grpo")}
    objectives = {"lpo": LPO(), "grpo": GRPO()}

    def train_on(objective: str, batch: dict[str, torch.Tensor], cond: Any) -> None:
        with torch.autocast(model.device.type, dtype=half, enabled=model.device.type == "cuda"):
            loss = objectives[objective].losses(model, denoiser, reference, batch, cond, configs[objective],
                                                None)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    x = torch.randn(2, *model.latent_shape, device=model.device)
    t = torch.tensor([grid[steps // 2]] * 2)
    batches = {"lpo": {"x_t": x, "t": t, "x_w": torch.randn_like(x), "x_l": torch.randn_like(x)},
               "grpo": {"x_t": x, "t": t, "children": torch.randn(2, k, *model.latent_shape, device=model.device),
                        "old_log_prob": torch.zeros(2, k, device=model.device),
                        "advantages": torch.randn(2, k, device=model.device)}}
    cond = model.encode_prompts(texts[:2])
    out["loss_steps"] = {}
    for objective in ("lpo", "grpo"):
        clock.reset_peak()
        seconds = clock.fastest(lambda o=objective: train_on(o, batches[o], cond))
        peak = clock.peak_gb()
        own = None if peak is None or before_gb is None else peak - before_gb
        planned = planned_lpo_gb(base, "sd3", 2, work, clock.device, objective, checkpointing=True,
                                 resolution=resolution)
        out["loss_steps"][objective] = {"items": 2, "step_s": seconds, "peak_memory_gb": peak, "step_peak_gb": own,
                                        "planned_gb": planned,
                                        "measured_over_planned": None if own is None else own / planned}
        print(f"flow {objective.upper()} loss step (2 {'parents of K' if objective == 'grpo' else 'tuples'}): "
              f"{seconds:.3f} s, peak {peak}", flush=True)
        print("  planned vs measured: " + planned_against(planned, own), flush=True)
    # 4. one round: sampling and scoring (timed inside the rollout), then training on every item
    keep_all = {step: -1.0 for step in model.step_stds(configs["lpo"].eta)[0]}
    out["round"] = {}
    for objective in ("lpo", "grpo"):
        config = configs[objective]
        round_texts = texts[:prompts]

        def train_round(result: Any, objective: str = objective, round_texts: list[str] = round_texts) -> None:
            items = result.tensors()
            for first in range(0, len(result), 2):
                rows = slice(first, first + 2)
                batch = {name: value[rows].to(model.device) for name, value in items.items() if name != "prompt"}
                batch["t"] = items["t"][rows]
                captions = [round_texts[i] for i in items["prompt"][rows].tolist()]
                train_on(objective, batch, model.encode_prompts(captions))

        result, split = timed_round(model, clock, lambda c=config, o=objective, p=round_texts: sampler.rollout(
            model, model.encode_prompts(p), p, lrm, [torch.Generator().manual_seed(i) for i in range(prompts)],
            keep_all, steps=steps, guidance=c.guidance, eta=c.eta, k=k, denoiser=denoiser, objective=o), train_round)
        total = split.pop("total_s")
        out["round"][objective] = {"prompts": prompts, "steps": steps, "candidates": k, "items": len(result),
                                   "total_s": total, **split, "peak_memory_gb": clock.peak_gb()}
        print(f"flow {objective.upper()} round ({prompts} prompts, {steps} steps, K={k}, {len(result)} items): "
              f"{total:.2f} s = " + ", ".join(f"{n.removesuffix('_s')} {100 * v / total:.0f}%" for n, v in
                                               split.items()), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (with --tiny, for the tests)")
    parser.add_argument("--tiny", action="store_true", help="the tiny models of `lpo dev tiny-models`")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement; the fastest is kept")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: --device cuda was asked for but CUDA is not available; use --tiny --device cpu.")
    import diffusers
    import transformers

    for library in (diffusers, transformers):  # progress bars and cast notices would bury the figures
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    clock = Clock(args.device, args.repeats)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "tiny": args.tiny, "torch": torch.__version__, "repeats": args.repeats,
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tiny = None
        if args.tiny:
            from lpo.reward.toy.random_models import build_tiny_models

            tiny = Path(tmp)
            build_tiny_models(tiny, ["sd15", "sdxl", "sd3", "clip"])
        sd15 = generator("sd15", tiny, args.device, torch.float32)
        report["scoring"] = scoring(sd15, clock, tiny, [1, 8, 32])
        sdxl = generator("sdxl", tiny, args.device, torch.float32)
        bases, plans = plan_inputs(tiny, Path(tmp))
        report["lrm_training"] = lrm_training(sd15, sdxl, clock, bases, plans)
        del sdxl
        half = torch.float16 if args.device.startswith("cuda") else torch.float32
        before = clock.allocated_gb()  # the fp32 SD1.5 of the scoring part is still held
        report["lpo"] = lpo(generator("sd15", tiny, args.device, half), clock, steps=20, prompts=5, k=4,
                            before_gb=before, planned_gb=planned_lpo_gb(bases["sd15"], "sd15", 4, plans, args.device))
        before = clock.allocated_gb()
        report["flow"] = flow(generator("sd3", tiny, args.device, torch.float32), clock, tiny, plans, before)
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {args.out} ({report['seconds']} s)")
    return report


if __name__ == "__main__":
    main()
