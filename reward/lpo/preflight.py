"""Pre-flight checks of `lpo optimize`: what the first round's rollout says about the run, before any update.

The field's second most reported failure is an on-policy ratio that is not 1 (latents kept in half precision, a
training forward that differs from the sampling one), found after hours of training. The checks run on the first
round's own items (no extra sampling), in the run's precision and on its devices:

- dtypes: the stored latents and log-densities are float32 (the step maths' dtype);
- the on-policy ratio: the training forward's log-density of every sampled child equals its sampling-time one
  before any update (|log ratio| per latent element below RATIO_TOLERANCE in full precision, MIXED_TOLERANCE under
  fp16/bf16 autocast, whose forward may round otherwise than the half-precision sampling one);
- the LoRA's reach: the share of the denoiser's parameters, per block type, in the layers it adapts;
- the signal: the share of (step, trajectory) whose children pass LPO's threshold, per step (GRPO: the groups' gap);
- the time: this round's sampling, plus one training update timed, extrapolated to the run.

A failed check stops the run with exit code 2, naming the reason and the fix; `--preflight` runs the checks and
stops, `--no-preflight` skips them.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from lpo.core.errors import InputError
from lpo.reward.lpo.objectives import stack_items

RATIO_TOLERANCE = 1e-5  # per latent element, full precision: the same computation up to float summation order
# per latent element under fp16/bf16 autocast, where the training forward may round otherwise than the sampling one:
# an assumption until a GPU measures it (bf16 autocast on the CPU gives exactly 0, as full precision does), set
# below what float16-stored latents give on the tiny SD1.5 (4e-3)
MIXED_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Check:
    name: str
    value: str
    ok: bool = True
    fix: str = ""


def dtypes(items: list[dict[str, Any]], fields: tuple[str, ...]) -> Check:
    stored = {name: items[0][name].dtype for name in ("x_t", *fields) if torch.is_tensor(items[0][name])}
    half = {name: str(dtype).removeprefix("torch.") for name, dtype in stored.items() if dtype != torch.float32}
    shown = ", ".join(f"{name} {str(dtype).removeprefix('torch.')}" for name, dtype in stored.items())
    if half:
        return Check("stored dtypes", shown, False,
                     f"the rollout keeps {', '.join(half)} in {', '.join(sorted(set(half.values())))}: the step's "
                     "log-density was computed from float32 latents when sampled, so a training forward from rounded "
                     "ones gives another one (the ratio starts away from 1). Keep the rollout's latents and "
                     "log-densities in float32 (only the denoiser's weights are half precision).")
    return Check("stored dtypes", shown)


def on_policy_ratio(run: Any, items: list[dict[str, Any]], mixed: bool) -> tuple[Check, float]:
    """The largest |log p_train - log p_sampled| per latent element over every child of `items`, by the training
    forward (autocast, the prepared policy) before any update; also its seconds per training chunk."""
    config, objective, model = run.config, run.objective, run.model
    elements = items[0]["x_t"].numel()
    per_element = elements if config.logprob_reduction == "sum" else 1
    worst, seconds = 0.0, 0.0
    for start in range(0, len(items), config.train_batch_size):
        chunk = items[start:start + config.train_batch_size]
        batch = stack_items(chunk, objective.fields, run.accelerator.device)
        cond = model.encode_prompts([item["prompt"] for item in chunk])
        began = time.perf_counter()
        with torch.no_grad(), run.accelerator.autocast():
            replayed = objective.replayed_log_probs(model, run.denoiser, batch, cond, config)
        seconds = seconds or time.perf_counter() - began
        sampled = batch[objective.sampled].float()
        worst = max(worst, ((replayed.float() - sampled).abs() / per_element).max().item())
    tolerance = MIXED_TOLERANCE if mixed else RATIO_TOLERANCE
    value = f"max |log ratio| {worst:.2e} per latent element (tolerance {tolerance:.0e}" + \
            (", mixed precision)" if mixed else ")")
    if not math.isfinite(worst) or worst > tolerance:
        return Check("on-policy ratio", value, False,
                     "the training forward does not reproduce the sampling step: before any update every ratio "
                     "p_theta / p_sampled must be 1. Look for latents or log-densities stored in another dtype, a "
                     "denoiser that differs between sampling and training (dropout, another adapter state), or "
                     "another guidance or eta in the loss than in sampling."), seconds
    return Check("on-policy ratio", value), seconds


def lora_reach(denoiser: Any, lora: bool) -> Check:
    """Per block type (the first part of a parameter's name), the share of its parameters in adapted layers."""
    if not lora:
        return Check("LoRA reach", "full fine-tuning: every parameter trains")
    total, reached = Counter(), Counter()
    for name, module in denoiser.named_modules():
        if name and hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            reached[name.split(".")[0]] += sum(p.numel() for p in module.base_layer.parameters())
    for name, param in denoiser.named_parameters():
        if "lora_" not in name:
            total[name.split(".")[0]] += param.numel()
    shares = {block: reached[block] / total[block] for block in total if total[block]}
    shown = ", ".join(f"{block} {share:.0%}" for block, share in sorted(shares.items(), key=lambda kv: -kv[1]))
    if not any(reached.values()):
        return Check("LoRA reach", shown, False, "the LoRA adapts no layer of the denoiser: check the family's "
                                                 "LoRA targets against the denoiser's module names.")
    return Check("LoRA reach", shown)


def signal(run: Any, items: list[dict[str, Any]], record: dict[str, Any], spreads: list[float]) -> Check:
    """Where the round's items come from: per step, the share of trajectories with an item."""
    trajectories = run.config.sample_batch_size * run.world
    per_step = Counter(item["key"][0] for item in items)
    shown = "per step " + " ".join(f"{per_step.get(i, 0) / trajectories:.0%}" for i in range(run.config.steps))
    name = "steps passing the threshold" if run.objective.name == "lpo" else "groups per step"
    if spreads:
        spreads = sorted(spreads)
        shown += f"; the groups' gap tanh((best - worst) / 2): median {spreads[len(spreads) // 2]:.3f}"
    if not items:
        return Check(name, shown, False, "no step of the first round produced an item to train on: lower "
                                         "--threshold (LPO keeps a pair only when its softmax gap passes it).")
    return Check(name, shown)


def run_checks(run: Any, items: list[dict[str, Any]], record: dict[str, Any], spreads: list[float],
               total_rounds: int, mixed: bool) -> list[Check]:
    """Every check on the first round's `items` (gathered from every process); InputError when one fails."""
    checks = [signal(run, items, record, spreads)]
    if items:
        checks.append(dtypes(items, run.objective.fields))
        ratio, seconds = on_policy_ratio(run, items, mixed)
        checks.append(ratio)
    else:
        seconds = 0.0
    checks.append(lora_reach(run.accelerator.unwrap_model(run.denoiser), run.config.lora_rank > 0))
    # a training chunk costs the objective's forwards plus a backward (about two forwards): an estimate, which the
    # first round's record (`train_seconds`) replaces with a measurement
    chunks = math.ceil(len(items) / run.world / run.config.train_batch_size) if items else 0
    per_round = record["sample_seconds"] + (run.objective.forwards(run.config) + 2) * seconds * chunks
    checks.append(Check("time", f"{per_round:.1f} s per round (sampling {record['sample_seconds']:.1f} s), "
                                f"{total_rounds} rounds: about {per_round * total_rounds / 3600:.2f} h"))
    failed = [check for check in checks if not check.ok]
    if failed:
        raise InputError("pre-flight failed (nothing was trained; --no-preflight skips these checks):\n" + "\n".join(
            f"- {check.name}: {check.value}. {check.fix}" for check in failed))
    return checks
