"""The UNet families' DDIM step as a Gaussian transition, against diffusers' own `DDIMScheduler.step`."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from lpo.reward.backbones.ddim import step_stats


def sd_scheduler(steps: int = 20, prediction_type: str = "epsilon") -> DDIMScheduler:
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_step_matches_diffusers_ddim_with_eta_one(prediction_type: str) -> None:
    scheduler = sd_scheduler(prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    model_output = torch.randn(1, 4, 8, 8, generator=generator)
    noise = torch.randn(1, 4, 8, 8, generator=generator)
    for t in (951, 501, 51, 1):
        expected = scheduler.step(model_output, t, sample, eta=1.0, variance_noise=noise).prev_sample
        stats = step_stats(scheduler, model_output, torch.tensor([t]), sample, eta=1.0)
        torch.testing.assert_close(stats.mean + stats.std * noise, expected, rtol=1e-5, atol=1e-5)


def test_step_statistics_stay_float32_under_a_half_precision_model() -> None:
    scheduler = sd_scheduler()
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    output = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([1, 1])
    half = step_stats(scheduler, output.half(), t, sample.half(), eta=1.0)
    exact = step_stats(scheduler, output.half().double(), t, sample.half().double(), eta=1.0)
    assert half.mean.dtype == half.std.dtype == torch.float32
    # the std of the last step (0.02) is not rounded to float16 (0.0206 would become 0.02063)
    torch.testing.assert_close(half.std, exact.std, rtol=1e-6, atol=0)
    torch.testing.assert_close(half.mean, exact.mean, rtol=1e-6, atol=1e-6)
