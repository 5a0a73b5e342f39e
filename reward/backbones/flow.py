"""The flow-matching step of the transformer families (SD3, FLUX.1) as a Gaussian transition, and their forward
process.

Forward process: x_sigma = (1 - sigma) x0 + sigma eps, at the model timestep sigma * 1000; the denoiser predicts the
velocity v ~ eps - x0, and the sampler's Euler step is x' = x + (sigma' - sigma) v.

LPO needs a stochastic step with a likelihood. The Euler ODE step is deterministic, so a step from sigma to sigma'
(dt = sigma' - sigma < 0) is taken in one of two stochastic forms, each a Gaussian N(mean, std^2 I) with noise
level a (`--eta`):

- `sde` (Flow-GRPO, arXiv 2505.05470): the reverse SDE dx = [v + g^2 / (2 sigma) (x + (1 - sigma) v)] dt + g dW,
  which keeps the ODE's marginals:

      g    = a * sqrt(sigma / (1 - sigma))     (at sigma = 1 the denominator uses 1 - sigma of the next grid point)
      mean = x (1 + g^2 dt / (2 sigma)) + v (1 + g^2 (1 - sigma) / (2 sigma)) dt
      std  = g * sqrt(-dt)

  The noise a step adds is only partly removed by the steps after it: a child at nominal sigma' carries more noise
  than sigma', and the last steps' noise stays in the image.
- `cps` (the coefficients-preserving step, arXiv 2509.05952; the DDIM-like flow step): with the predictions
  x0 = x - sigma v and x1 = x + (1 - sigma) v,

      std  = sigma' * sin(a * pi / 2)
      mean = (1 - sigma') x0 + sqrt(sigma'^2 - std^2) x1

  so a child is (1 - sigma') x0 + sigma' times unit noise: it sits at its nominal noise level, as the reward model
  reads it. Its log-density is the Gaussian's own (not the scaled squared error some implementations call one), so
  LPO's and GRPO's ratios are likelihood ratios.

With a = 0 both are exactly the Euler step of diffusers' `FlowMatchEulerDiscreteScheduler`. The step to sigma = 0
(the last one) is the deterministic Euler step under both: it forms no preference pairs (`trained_steps`), and noise
added there would stay in the image. Everything is computed in float64 and returned in float32, whatever the
model's dtype.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from lpo.core.errors import InputError
from lpo.core.refs import load_args
from lpo.reward.backbones.base import StepStats

SAMPLERS = ("sde", "cps")  # the stochastic steps of the flow families; the first is the default

NUM_TRAIN_TIMESTEPS = 1000  # the model timestep is sigma * 1000 (diffusers' convention for SD3 and FLUX)


LRM_GRID_STEPS = 20  # the LRM trains on the timesteps of the 20-step sampler (LPO's default step count)
EVAL_SIGMAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # evaluated at the grid points nearest these, as the UNets at t = 1..951


def dynamic_shift(scheduler_config: Any, image_tokens: int) -> float:
    """mu of a resolution-dependent schedule: linear in the image's token count between the scheduler's base and
    max sequence lengths (diffusers' pipelines compute it the same way)."""
    base_len = scheduler_config.get("base_image_seq_len", 256)
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    base_shift = scheduler_config.get("base_shift", 0.5)
    max_shift = scheduler_config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_tokens * slope + base_shift - slope * base_len


def set_grid(scheduler: Any, steps: int, image_tokens: int, linear_sigmas: bool = False) -> list[float]:
    """Set the scheduler's grid for `steps` steps as the family's pipeline does and return its timesteps, noisiest
    first: the scheduler's own grid (SD3) or sigmas linspace(1, 1/N, N) (FLUX), shifted by the resolution where
    the scheduler asks for it."""
    kwargs: dict[str, Any] = {}
    if scheduler.config.get("use_dynamic_shifting", False):
        kwargs["mu"] = dynamic_shift(scheduler.config, image_tokens)
    if linear_sigmas:
        kwargs["sigmas"] = torch.linspace(1.0, 1 / steps, steps, dtype=torch.float64).numpy()
    scheduler.set_timesteps(steps if not linear_sigmas else None, **kwargs)
    return scheduler.timesteps.tolist()


def lrm_timesteps(scheduler: Any, image_tokens: int, linear_sigmas: bool = False) -> tuple[list[float], list[float]]:
    """(training, evaluation) timesteps of an LRM: every timestep of the 20-step grid, and the grid points nearest
    sigma = 0, 0.25, 0.5, 0.75 and 1 (rounded to 1e-3: sigma to 1e-6)."""
    grid = sorted(round(t, 3) for t in set_grid(scheduler, LRM_GRID_STEPS, image_tokens, linear_sigmas))
    picks = sorted({min(grid, key=lambda t: abs(t - target * NUM_TRAIN_TIMESTEPS)) for target in EVAL_SIGMAS})
    return grid, picks


def check_timesteps(values: list[float]) -> list[float]:
    bad = [t for t in values if not 0 < t <= NUM_TRAIN_TIMESTEPS]
    if bad or not values:
        raise InputError(f"flow-matching timesteps are sigma x {NUM_TRAIN_TIMESTEPS}, in (0, {NUM_TRAIN_TIMESTEPS}]; "
                         f"got {bad or values}.")
    return [float(t) for t in values]


def grid_index(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """Index in the scheduler's current grid of each timestep ([B] long): the nearest grid point, so the timesteps
    the grid handed out (float32 values) map back exactly."""
    grid = scheduler.timesteps.to(torch.float64).cpu()
    t = torch.as_tensor(timesteps, dtype=torch.float64).cpu().reshape(-1)
    return (t[:, None] - grid[None, :]).abs().argmin(dim=1)


def _sigmas(scheduler: Any, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigma, sigma', the sigma standing in for 1 in g's denominator) of the steps at `index`, float64."""
    sigmas = scheduler.sigmas.to(torch.float64).cpu()
    sigma, sigma_next = sigmas[index], sigmas[index + 1]
    # g = a sqrt(sigma / (1 - sigma)) is infinite at sigma = 1; the grid's second point stands in (Flow-GRPO's choice)
    denominator = torch.where(sigma >= 1, 1 - sigmas[1].expand_as(sigma), 1 - sigma)
    return sigma, sigma_next, denominator


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"flow sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")


def step_std(scheduler: Any, index: torch.Tensor, noise_level: float, sampler: str = "sde") -> torch.Tensor:
    """std of the stochastic step at each grid index (float64, [B]); 0 for the step to sigma = 0."""
    _check_sampler(sampler)
    sigma, sigma_next, denominator = _sigmas(scheduler, index)
    if sampler == "cps":
        return sigma_next * math.sin(noise_level * math.pi / 2)
    g = noise_level * torch.sqrt(sigma / denominator)
    return torch.where(sigma_next > 0, g * torch.sqrt(sigma - sigma_next), torch.zeros_like(sigma))


def step_stats(scheduler: Any, velocity: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor,
               noise_level: float, sampler: str = "sde") -> StepStats:
    """Mean and std of the stochastic step (`sde` or `cps`) from `sample` at `timesteps` (one per batch element)
    given the velocity; the step to sigma = 0 is the deterministic Euler step."""
    _check_sampler(sampler)
    index = grid_index(scheduler, timesteps)
    sigma, sigma_next, denominator = _sigmas(scheduler, index)
    shape = (-1,) + (1,) * (sample.dim() - 1)
    device = sample.device
    sigma_, next_ = sigma.to(device).view(shape), sigma_next.to(device).view(shape)
    x, v = sample.to(torch.float64), velocity.to(torch.float64)
    x0 = x - sigma_ * v
    std = step_std(scheduler, index, noise_level, sampler).to(device).view(shape)
    if sampler == "cps":
        x1 = x + (1 - sigma_) * v
        mean = (1 - next_) * x0 + torch.sqrt((next_**2 - std**2).clamp(min=0)) * x1
    else:
        g2 = (noise_level**2) * (sigma / denominator).to(device).view(shape)
        dt = next_ - sigma_
        mean = x * (1 + g2 * dt / (2 * sigma_)) + v * (1 + g2 * (1 - sigma_) / (2 * sigma_)) * dt
    # the last step, to sigma = 0: Euler, x + (0 - sigma) v = x0, whatever the sampler
    mean = torch.where(next_ > 0, mean, x0)
    prev = sigma_next * NUM_TRAIN_TIMESTEPS
    return StepStats(mean.float(), std.float(), x0.float(), prev.float())


def trained_steps(scheduler: Any) -> torch.Tensor:
    """Grid indices that form preference pairs: every step but the last (to sigma = 0)."""
    return torch.arange(len(scheduler.timesteps) - 1)


class FlowNoise:
    """The forward process of a flow-matching family, `add_noise(clean, noise, timesteps)` as diffusers' DDPM
    schedulers offer it: x = (1 - sigma) x0 + sigma eps with sigma = timestep / 1000 (timesteps are floats).
    Saved as the pipeline's own scheduler config."""

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    @classmethod
    def from_pretrained(cls, source: str | Path, subfolder: str | None = "scheduler") -> FlowNoise:
        source, where = load_args(source, subfolder)
        return cls(FlowMatchEulerDiscreteScheduler.from_pretrained(source, **where))

    @property
    def config(self) -> Any:
        return self.scheduler.config

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(timesteps, dtype=torch.float64).to(clean.device) / self.num_train_timesteps
        sigma = sigma.view((-1,) + (1,) * (clean.dim() - 1))
        return ((1 - sigma) * clean.to(torch.float64) + sigma * noise.to(torch.float64)).to(clean.dtype)

    def save_pretrained(self, directory: str | Path) -> None:
        self.scheduler.save_pretrained(directory)
