"""DDIM step statistics, the step's Gaussian log-density, and LPO's noise-dependent pair threshold.

A DDIM step with eta > 0 is a Gaussian transition x_{t-1} ~ N(mu(x_t, eps_hat), sigma_t^2 I):
    x0_hat  = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t)
    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    mu      = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma_t^2) eps_hat
with a = the scheduler's alphas_cumprod and prev = t - num_train_timesteps / num_inference_steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class StepStats:
    mean: torch.Tensor
    std: torch.Tensor  # [B, 1, 1, 1]
    x0: torch.Tensor
    prev_timestep: torch.Tensor  # [B]


def _alphas(scheduler, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev = timesteps - step
    cumprod = scheduler.alphas_cumprod.to(torch.float64)
    a_t = cumprod[timesteps.cpu()]
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    a_prev = torch.where(prev.cpu() >= 0, cumprod[prev.clamp(min=0).cpu()], final)
    return a_t, a_prev, prev


def step_std(scheduler, timesteps: torch.Tensor, eta: float) -> torch.Tensor:
    """sigma_t of the DDIM step from each timestep (float64, shape [B])."""
    a_t, a_prev, _ = _alphas(scheduler, timesteps)
    return eta * torch.sqrt((1 - a_prev) / (1 - a_t)) * torch.sqrt(1 - a_t / a_prev)


def step_stats(scheduler, model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor,
               eta: float) -> StepStats:
    """Mean and std of the DDIM transition from `sample` at `timesteps` (one per batch element)."""
    a_t, a_prev, prev = _alphas(scheduler, timesteps)
    shape = (-1,) + (1,) * (sample.dim() - 1)
    a_t, a_prev = a_t.to(sample.device).view(shape), a_prev.to(sample.device).view(shape)
    prediction = scheduler.config.prediction_type
    out = model_output.to(torch.float64)
    x = sample.to(torch.float64)
    if prediction == "epsilon":
        x0, eps = (x - (1 - a_t).sqrt() * out) / a_t.sqrt(), out
    elif prediction == "v_prediction":
        x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
        eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
    else:
        raise ValueError(f"prediction_type {prediction!r} is not supported (epsilon or v_prediction)")
    std = eta * torch.sqrt((1 - a_prev) / (1 - a_t)) * torch.sqrt(1 - a_t / a_prev)
    mean = a_prev.sqrt() * x0 + torch.sqrt((1 - a_prev - std**2).clamp(min=0)) * eps
    dtype = sample.dtype
    return StepStats(mean.to(dtype), std.to(dtype), x0.to(dtype), prev)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """log N(x; mean, std^2 I) per sample, averaged (reference) or summed over the non-batch dimensions.
    The sample `x` is treated as data: gradients flow through `mean` only."""
    x = x.detach().float()
    mean, std = mean.float(), std.float()
    elementwise = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    dims = tuple(range(1, x.dim()))
    if reduce == "mean":
        return elementwise.mean(dim=dims)
    if reduce == "sum":
        return elementwise.sum(dim=dims)
    raise ValueError(f"reduce must be 'mean' or 'sum', not {reduce!r}")


def threshold_schedule(scheduler, eta: float, low: float, high: float) -> dict[int, float]:
    """Per sampler timestep: the softmax-gap threshold, linear in the step's sigma_t between `low` (least noisy
    step) and `high` (noisiest), computed from the scheduler for its own step count and noise schedule."""
    timesteps = scheduler.timesteps.to(torch.long)
    sigmas = step_std(scheduler, timesteps, eta)
    lo, hi = sigmas.min(), sigmas.max()
    span = (hi - lo) if hi > lo else torch.tensor(1.0, dtype=torch.float64)
    return {int(t): float(low + (s - lo) / span * (high - low)) for t, s in zip(timesteps.tolist(), sigmas)}
