"""The DDIM step of the UNet families as a Gaussian transition: its mean and std from the scheduler.

A DDIM step with eta > 0 is a Gaussian transition x_{t-1} ~ N(mu(x_t, eps_hat), sigma_t^2 I):
    x0_hat  = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t)
    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    mu      = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma_t^2) eps_hat
with a = the scheduler's alphas_cumprod and prev = t - num_train_timesteps / num_inference_steps.
"""

from __future__ import annotations

import torch

from lpo.reward.backbones.base import StepStats


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
    # float32 whatever the model's dtype: rounded to float16, the std of the last steps (0.02 at t=1) would make a
    # 1e-3 change of the noise prediction a 4x error in the log-density
    return StepStats(mean.float(), std.float(), x0.float(), prev)
