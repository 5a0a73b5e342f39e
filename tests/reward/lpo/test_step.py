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
    from lpo.reward.lpo.objectives import effective_beta

    assert effective_beta(LPOConfig(beta=500.0), 256) == 500.0
    assert effective_beta(LPOConfig(beta=500.0, logprob_reduction="sum"), 256) == pytest.approx(500.0 / 256)


def test_a_per_step_scale_multiplies_the_log_ratio_before_the_clamp() -> None:
    """`--beta-schedule kappa`: the tuple's log-ratios times s, then the clamp, then beta; s = 1 is the plain loss."""
    beta, eps = 500.0, 0.1
    log_w, log_l = torch.tensor([1e-4, 0.05, -3e-4]), torch.tensor([-2e-4, 0.0, 1e-4])
    zero = torch.zeros(3)
    scale = torch.tensor([1.0, 4.0, 20.0])
    out = lpo_loss(log_w, log_l, zero, zero, beta, eps, scale)
    low, high = math.log(1 - eps), math.log(1 + eps)
    expected = []
    for win, lose, s in zip(log_w.tolist(), log_l.tolist(), scale.tolist()):
        margin = beta * (min(max(s * win, low), high) - min(max(s * lose, low), high))
        expected.append(math.log1p(math.exp(-margin)))
    assert out["loss"].item() == pytest.approx(sum(expected) / 3, rel=1e-5)
    plain = lpo_loss(log_w, log_l, zero, zero, beta, eps)
    assert lpo_loss(log_w, log_l, zero, zero, beta, eps, torch.ones(3))["loss"].item() == plain["loss"].item()
    # 0.05 x 4 = 0.2 is beyond log 1.1: the second tuple's winner sits at the clamp
    assert out["ratio_w"].item() == pytest.approx((math.exp(1e-4) + 1.1 + math.exp(-6e-3)) / 3, rel=1e-5)


def test_kappa_is_the_closed_form_on_ddim_and_flow_grids(tiny_models_dir) -> None:
    """kappa = |d mean / d output| / std of every trained step, as `Generator.step_kappas` finds it from the step
    itself, against the closed forms: DDIM (eta 1, SD1.5's schedule) |sqrt(1 - a_prev - s^2) - sqrt(a_prev)
    sqrt(1 - a_t) / sqrt(a_t)| / s, 0.6-0.9 for t >= 151; the flow SDE (flow.md section 9) (1 + a^2 / 2) sqrt(-dt)
    sqrt((1 - sigma) / sigma) / a for sigma < 1 (0.026 at SD3-20's first step, 1.59 at its 19th); the CPS step
    |sqrt(sigma'^2 - s^2) (1 - sigma) - (1 - sigma') sigma| / s."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from lpo.reward.backbones import load_generator

    unet = load_generator(str(tiny_models_dir / "sd15"))
    unet.scheduler = sd_scheduler(20)
    timesteps, kappas = unet.step_kappas(1.0)
    cumprod = unet.scheduler.alphas_cumprod.double()
    for t, kappa in zip(timesteps, kappas.tolist()):
        a_t = cumprod[t].item()
        a_prev = cumprod[t - 50].item() if t >= 50 else cumprod[0].item()
        s = math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
        gain = abs(math.sqrt(max(1 - a_prev - s**2, 0)) - math.sqrt(a_prev) * math.sqrt(1 - a_t) / math.sqrt(a_t))
        assert kappa == pytest.approx(gain / s, rel=1e-4)
        if t >= 151:
            assert 0.6 < kappa < 0.9
    flow_model = load_generator(str(tiny_models_dir / "sd3"))
    flow_model.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    flow_model.scheduler.set_timesteps(20)
    sigmas = flow_model.scheduler.sigmas.double().tolist()
    flow_model.use_sampler("sde")
    timesteps, kappas = flow_model.step_kappas(0.7)
    assert len(timesteps) == 19  # the deterministic last step has no kappa
    for i, kappa in enumerate(kappas.tolist()):
        sigma, following = sigmas[i], sigmas[i + 1]
        g = 0.7 * math.sqrt(sigma / (1 - (sigmas[1] if sigma >= 1 else sigma)))
        dt = following - sigma
        expected = (1 + g**2 * (1 - sigma) / (2 * sigma)) * -dt / (g * math.sqrt(-dt))
        assert kappa == pytest.approx(expected, rel=1e-4)
        if sigma < 1:
            assert kappa == pytest.approx((1 + 0.7**2 / 2) * math.sqrt(-dt) * math.sqrt((1 - sigma) / sigma) / 0.7,
                                          rel=1e-4)
    assert kappas[0].item() == pytest.approx(0.026, abs=1e-3) and kappas[18].item() == pytest.approx(1.59, abs=0.01)
    flow_model.use_sampler("cps")
    _, cps = flow_model.step_kappas(0.7)
    for i, kappa in enumerate(cps.tolist()):
        sigma, following = sigmas[i], sigmas[i + 1]
        s = following * math.sin(0.7 * math.pi / 2)
        assert kappa == pytest.approx(abs(math.sqrt(following**2 - s**2) * (1 - sigma) - (1 - following) * sigma) / s,
                                      rel=1e-4)


def test_thresholds_on_sigma_are_linear_in_the_noise_share(tiny_models_dir) -> None:
    """`--threshold-scale sigma`: low at the least noisy trained step, high at the noisiest, linear in the forward
    process's noise share (sigma for flow; sqrt(1 - alphas_cumprod) for DDPM) instead of the step's std."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from lpo.reward.backbones import load_generator
    from lpo.reward.lpo.config import LPOConfig
    from lpo.reward.lpo.train import step_thresholds

    model = load_generator(str(tiny_models_dir / "sd3"))
    model.use_sampler("sde")  # the std of the SDE step; the CPS step's is proportional to sigma'
    model.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    model.timesteps(20)
    table = step_thresholds(model, LPOConfig(family="sd3", threshold=[0.35, 0.5], threshold_scale="sigma",
                                             eta=0.7).resolved())
    sigmas = [t / 1000 for t in table]
    lo, hi = min(sigmas), max(sigmas)
    for t, value in table.items():
        assert value == pytest.approx(0.35 + (t / 1000 - lo) / (hi - lo) * 0.15, rel=1e-6)
    # the std table puts 15 of the 19 steps below 0.415 (flow.md section 9); sigma puts 4 there
    on_std = step_thresholds(model, LPOConfig(family="sd3", threshold=[0.35, 0.5], eta=0.7).resolved())
    assert sum(v < 0.415 for v in on_std.values()) == 15
    assert sum(v < 0.415 for v in table.values()) == 4
    unet = load_generator(str(tiny_models_dir / "sd15"))
    unet.scheduler = sd_scheduler(20)
    ddpm = step_thresholds(unet, LPOConfig(threshold=[0.35, 0.5], threshold_scale="sigma", eta=1.0).resolved())
    cumprod = unet.scheduler.alphas_cumprod.double()
    shares = {t: math.sqrt(1 - cumprod[t].item()) for t in ddpm}
    lo, hi = min(shares.values()), max(shares.values())
    assert ddpm == pytest.approx({t: 0.35 + (s - lo) / (hi - lo) * 0.15 for t, s in shares.items()}, rel=1e-6)
