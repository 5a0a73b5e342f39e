"""LPO's numerics against independent computations: a step's log-density, the threshold schedule (on SD1.5's DDIM
steps) and the loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from lpo.reward.backbones.ddim import step_std
from lpo.reward.lpo.loss import lpo_loss
from lpo.reward.lpo.step import gaussian_log_prob, threshold_schedule


def sd_scheduler(steps: int = 20) -> DDIMScheduler:
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(steps)
    return scheduler


def ddim_thresholds(scheduler: DDIMScheduler, eta: float, low: float, high: float) -> dict[int, float]:
    """The schedule as an SD1.x/SDXL generator gives it (`UNetGenerator.step_stds`)."""
    timesteps = scheduler.timesteps.to(torch.long)
    return threshold_schedule(timesteps.tolist(), step_std(scheduler, timesteps, eta), low, high)


def test_log_density_is_the_gaussian_log_density() -> None:
    generator = torch.Generator().manual_seed(1)
    mean = torch.randn(3, 4, 8, 8, generator=generator)
    std = torch.tensor([0.1, 0.3, 0.6]).view(3, 1, 1, 1)
    x = mean + std * torch.randn(3, 4, 8, 8, generator=generator)
    reference = torch.distributions.Normal(mean.double(), std.double().expand_as(mean)).log_prob(x.double())
    torch.testing.assert_close(gaussian_log_prob(x, mean, std, "mean").double(), reference.mean(dim=(1, 2, 3)),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std, "sum").double(), reference.sum(dim=(1, 2, 3)),
                               rtol=1e-5, atol=1e-3)
    mean.requires_grad_(True)
    x.requires_grad_(True)
    gaussian_log_prob(x, mean, std).sum().backward()
    assert x.grad is None and mean.grad is not None  # the sample is data; the gradient flows through the mean


def test_threshold_schedule_equals_its_closed_form() -> None:
    scheduler = sd_scheduler(20)
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    alphas = np.cumprod(1 - betas)
    expected_sigma = {}
    for t in range(951, 0, -50):
        prev = t - 50
        a_t, a_prev = alphas[t], alphas[prev] if prev >= 0 else alphas[0]
        expected_sigma[t] = math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    assert min(expected_sigma.values()) == pytest.approx(0.0206, abs=1e-4)  # the reference's hard-coded table
    assert max(expected_sigma.values()) == pytest.approx(0.6444, abs=1e-4)
    sigma = step_std(scheduler, scheduler.timesteps, 1.0)
    # the scheduler keeps alphas_cumprod in float32: agreement to float32 precision
    assert dict(zip(scheduler.timesteps.tolist(), sigma.tolist())) == pytest.approx(expected_sigma, rel=1e-5)
    lo, hi = min(expected_sigma.values()), max(expected_sigma.values())
    schedule = ddim_thresholds(scheduler, 1.0, 0.35, 0.5)
    for t, s in expected_sigma.items():
        assert schedule[t] == pytest.approx(0.35 + (s - lo) / (hi - lo) * 0.15, abs=1e-6)
    assert schedule[1] == pytest.approx(0.35) and schedule[951] == pytest.approx(0.5)
    assert schedule[501] == pytest.approx(0.448, abs=1e-3)
    # computed for any step count, not a fixed 20-step table
    ten = sd_scheduler(10)
    schedule_10 = ddim_thresholds(ten, 1.0, 0.45, 0.6)
    assert sorted(schedule_10) == sorted(ten.timesteps.tolist()) and len(schedule_10) == 10
    assert min(schedule_10.values()) == pytest.approx(0.45) and max(schedule_10.values()) == pytest.approx(0.6)


def test_loss_value_and_gradients_follow_the_formula() -> None:
    beta, eps = 500.0, 0.1
    f64 = torch.float64  # the ratios are close to 1: compare at double precision
    ref_w, ref_l = torch.tensor([-1.0, -1.0], dtype=f64), torch.tensor([-1.0, -1.0], dtype=f64)
    log_w = torch.tensor([-1.0 + 1e-4, -1.0 + 0.5], dtype=f64, requires_grad=True)  # 2nd: e^0.5, beyond the clip
    log_l = torch.tensor([-1.0 - 2e-4, -1.0], dtype=f64, requires_grad=True)
    out = lpo_loss(log_w, log_l, ref_w, ref_l, beta, eps)
    r_w = [math.exp(1e-4), 1 + eps]
    r_l = [math.exp(-2e-4), 1.0]
    expected = [math.log(1 + math.exp(-beta * (math.log(win) - math.log(lose)))) for win, lose in zip(r_w, r_l)]
    assert out["loss"].item() == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert out["implicit_accuracy"].item() == 1.0
    out["loss"].backward()
    assert log_w.grad[0] < 0  # raising the winner's likelihood lowers the loss
    assert log_l.grad[0] > 0  # raising the loser's raises it
    assert log_w.grad[1] == 0  # outside the clamp the gradient is zero
    # raising the winner's log-likelihood inside the clip really does lower the loss value
    higher = lpo_loss(torch.tensor([-1.0 + 2e-4]), torch.tensor([-1.0]), ref_w[:1], ref_l[:1], beta, eps)["loss"]
    lower = lpo_loss(torch.tensor([-1.0 + 1e-4]), torch.tensor([-1.0]), ref_w[:1], ref_l[:1], beta, eps)["loss"]
    assert higher < lower


def test_loss_at_equal_policies_is_log_two() -> None:
    same = torch.tensor([-0.7, -1.3])
    out = lpo_loss(same, same - 0.2, same, same - 0.2)
    assert out["loss"].item() == pytest.approx(math.log(2))
    assert out["implicit_accuracy"].item() == 0.0


def test_a_summed_log_ratio_far_outside_the_clip_gives_finite_gradients() -> None:
    """With --logprob-reduction sum the log-density difference is large (here 100): exp() of it overflows, so the
    clip must act on the log-ratio itself."""
    log_w = torch.tensor([100.0, -100.0, 1e-3], requires_grad=True)
    log_l = torch.tensor([-100.0, 100.0, -1e-3], requires_grad=True)
    zero = torch.zeros(3)
    out = lpo_loss(log_w, log_l, zero, zero, beta=500.0, eps=0.1)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(log_w.grad).all() and torch.isfinite(log_l.grad).all()
    assert log_w.grad[0] == 0 and log_w.grad[1] == 0 and log_w.grad[2] < 0  # clipped ones do not move
    margins = 500.0 * torch.tensor([math.log(1.1) - math.log(0.9), math.log(0.9) - math.log(1.1), 2e-3])
    assert out["loss"].item() == pytest.approx(torch.nn.functional.softplus(-margins).mean().item(), rel=1e-5)


def test_beta_is_per_element_under_both_reductions() -> None:
    from lpo.reward.lpo.config import LPOConfig
    from lpo.reward.lpo.train import effective_beta

    assert effective_beta(LPOConfig(beta=500.0), 256) == 500.0
    assert effective_beta(LPOConfig(beta=500.0, logprob_reduction="sum"), 256) == pytest.approx(500.0 / 256)
