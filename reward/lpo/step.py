"""A denoising step as LPO uses it, whatever the family's sampler: the Gaussian log-density of a child under a
step's mean and std, and the pair threshold that grows with the step's noise.

Every family's stochastic step is a Gaussian transition x' ~ N(mean, std^2 I) (DDIM with eta > 0 for the UNet
families); the family's `Generator.step` gives its mean and std, `Generator.step_stds` the std of every step of
the sampler's grid.
"""

from __future__ import annotations

import math

import torch


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


def threshold_schedule(timesteps: list, stds: torch.Tensor, low: float, high: float) -> dict:
    """Per sampler timestep: the softmax-gap threshold, linear in the step's std between `low` (least noisy step)
    and `high` (noisiest), from the family's own step count and noise schedule."""
    lo, hi = stds.min(), stds.max()
    span = (hi - lo) if hi > lo else torch.tensor(1.0, dtype=torch.float64)
    return {t: float(low + (s - lo) / span * (high - low)) for t, s in zip(timesteps, stds)}
