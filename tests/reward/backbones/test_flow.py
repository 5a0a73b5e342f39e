"""The flow-matching step as a Gaussian transition, checked against diffusers' scheduler, closed forms and
torch.distributions; the forward process; the threshold schedule on the step std."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lpo.reward.backbones import flow
from lpo.reward.lpo.step import gaussian_log_prob, threshold_schedule


def _sd3_scheduler(steps: int = 10):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(steps)
    return scheduler


def test_sd3_grid_is_the_shifted_linspace_with_the_shift_applied_twice() -> None:
    """flow.md 2.5: sigma_min = f(1/1000) at construction, then set_timesteps shifts linspace(1, sigma_min) again."""
    scheduler = _sd3_scheduler(10)
    f = lambda u: 3.0 * u / (1 + 2.0 * u)  # noqa: E731
    expected = [f(u) for u in np.linspace(1.0, f(1 / 1000), 10)] + [0.0]
    np.testing.assert_allclose(scheduler.sigmas.numpy(), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy().round(4),
                               [1.0, .9601, .9133, .8577, .7904, .7073, .6022, .4649, .2780, .0089], atol=1e-4)


@pytest.mark.parametrize("sampler", flow.SAMPLERS)
def test_noise_level_zero_is_exactly_the_schedulers_euler_step(sampler: str) -> None:
    scheduler = _sd3_scheduler(10)
    generator = torch.Generator().manual_seed(0)
    for i, t in enumerate(scheduler.timesteps.tolist()):
        x = torch.randn(2, 16, 8, 8, generator=generator)
        v = torch.randn(2, 16, 8, 8, generator=generator)
        stats = flow.step_stats(scheduler, v, torch.full((2,), t), x, 0.0, sampler)
        reference = _sd3_scheduler(10)
        reference.set_begin_index(i)  # the scheduler's own step i
        expected = reference.step(v, torch.tensor(t), x).prev_sample
        torch.testing.assert_close(stats.mean, expected, rtol=1e-6, atol=1e-6)
        assert torch.all(stats.std == 0)


def _sde_reference(x, v, sigma, sigma_next, sigma_one, a, final_euler=True):
    """The reverse SDE dx = [v + g^2/(2 sigma) (x + (1 - sigma) v)] dt + g dW, one Euler-Maruyama step, in numpy;
    the step to sigma 0 is the ODE's Euler step (unless `final_euler` is off: the SDE's own last step)."""
    dt = sigma_next - sigma
    if sigma_next == 0 and final_euler:
        return x + v * dt, 0.0
    g = a * math.sqrt(sigma / (1 - (sigma_one if sigma >= 1 else sigma)))
    drift = v + g**2 / (2 * sigma) * (x + (1 - sigma) * v)
    return x + drift * dt, g * math.sqrt(-dt)


def _assert_steps_follow_the_reverse_sde(scheduler, sigmas: np.ndarray, a: float, channels: int, seed: int) -> None:
    """Every step of the scheduler's grid: mean, std and the child's timestep equal `_sde_reference` on `sigmas`."""
    generator = torch.Generator().manual_seed(seed)
    for i, t in enumerate(scheduler.timesteps.tolist()):
        x = torch.randn(1, channels, 2, 2, generator=generator, dtype=torch.float64)
        v = torch.randn(1, channels, 2, 2, generator=generator, dtype=torch.float64)
        stats = flow.step_stats(scheduler, v, torch.tensor([t]), x, a)
        mean, std = _sde_reference(x.numpy(), v.numpy(), sigmas[i], sigmas[i + 1], sigmas[1], a)
        np.testing.assert_allclose(stats.mean.numpy(), mean, rtol=1e-5, atol=1e-6)
        assert stats.std.flatten()[0].item() == pytest.approx(std, rel=1e-6)
        assert stats.prev_timestep.item() == pytest.approx(sigmas[i + 1] * 1000, rel=1e-6)


def test_sde_step_mean_and_std_equal_the_reverse_sde_in_closed_form() -> None:
    scheduler = _sd3_scheduler(10)
    _assert_steps_follow_the_reverse_sde(scheduler, scheduler.sigmas.double().numpy(), 0.7, 4, seed=1)
    # the stds flow.md section 4.1 lists for SD3 at 10 steps, a = 0.7, but the last (.006), now deterministic
    stds = flow.step_std(scheduler, torch.arange(10), 0.7).numpy()
    np.testing.assert_allclose(stds.round(3), [.700, .743, .536, .446, .392, .353, .319, .282, .225, 0], atol=1e-3)


def test_sde_step_on_fluxs_grid_equals_the_closed_form() -> None:
    """FLUX.1's grid at 1024 px (4096 image tokens): sigmas linspace(1, 1/20, 20), shifted exponentially with mu
    1.15 (the pipeline's resolution rule at its max sequence length), then 0; the SDE step at a = 0.9 on it equals
    the reverse SDE written out, the first step's g taking the grid's second sigma (sigma = 1 there). The last step
    goes from sigma 0.1425 to 0 with std 0.1385 (flow.md section 9)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    timesteps = flow.set_grid(scheduler, 20, image_tokens=4096, linear_sigmas=True)
    mu = 1.15
    expected = [math.exp(mu) / (math.exp(mu) + (1 / u - 1)) for u in np.linspace(1.0, 1 / 20, 20)] + [0.0]
    np.testing.assert_allclose(scheduler.sigmas.double().numpy(), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(timesteps, [1000 * s for s in expected[:-1]], rtol=1e-5)
    # the step on the grid as the scheduler holds it (float32); the grid itself equals the formula above
    _assert_steps_follow_the_reverse_sde(scheduler, scheduler.sigmas.double().numpy(), 0.9, 16, seed=3)
    sigmas = np.asarray(expected)
    assert sigmas[-2] == pytest.approx(0.1425, abs=1e-4)
    # the noise the SDE's own last step would leave in the image; ours takes the deterministic Euler step there
    assert _sde_reference(0.0, 0.0, sigmas[-2], 0.0, sigmas[1], 0.9, final_euler=False)[1] == pytest.approx(0.1385,
                                                                                                          abs=1e-4)
    assert flow.step_std(scheduler, torch.tensor([19]), 0.9).item() == 0


def _cps_reference(x, v, sigma, sigma_next, a):
    """The coefficients-preserving step (arXiv 2509.05952) written out in numpy: predicted clean sample and noise,
    recombined at sigma' with the noise split between the predicted and a fresh one."""
    x0, x1 = x - sigma * v, x + (1 - sigma) * v
    std = sigma_next * math.sin(a * math.pi / 2)
    return (1 - sigma_next) * x0 + math.sqrt(sigma_next**2 - std**2) * x1, std


@pytest.mark.parametrize("grid", ["sd3", "flux"])
def test_cps_step_equals_the_coefficients_preserving_formula(grid: str) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    if grid == "sd3":
        scheduler, a = _sd3_scheduler(10), 0.7
    else:
        scheduler, a = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), 0.9
        flow.set_grid(scheduler, 20, image_tokens=4096, linear_sigmas=True)
    sigmas = scheduler.sigmas.double().numpy()
    generator = torch.Generator().manual_seed(4)
    for i, t in enumerate(scheduler.timesteps.tolist()):
        x = torch.randn(1, 16, 2, 2, generator=generator, dtype=torch.float64)
        v = torch.randn(1, 16, 2, 2, generator=generator, dtype=torch.float64)
        stats = flow.step_stats(scheduler, v, torch.tensor([t]), x, a, "cps")
        mean, std = _cps_reference(x.numpy(), v.numpy(), sigmas[i], sigmas[i + 1], a)
        np.testing.assert_allclose(stats.mean.numpy(), mean, rtol=1e-5, atol=1e-6)
        assert stats.std.flatten()[0].item() == pytest.approx(std, rel=1e-6, abs=1e-12)
    assert stats.std.item() == 0  # the last step, to sigma 0, is deterministic


@pytest.mark.parametrize("sampler", flow.SAMPLERS)
def test_a_child_carries_its_nominal_noise_only_under_cps(sampler: str) -> None:
    """With the exact velocity of a single data point x0 (v = eps - x0 at x = (1 - sigma) x0 + sigma eps), a child
    is (1 - sigma') x0 + c eps + std z: its noise variance is c^2 + std^2. The CPS step keeps it at sigma'^2 (the
    child sits where its timestep says); the SDE step leaves more (sigma'^2 + g^2 |dt| (1 - sigma'/sigma) +
    g^4 dt^2 / (4 sigma^2)), which the LRM would read as a less noisy latent than it is."""
    scheduler = _sd3_scheduler(10)
    sigmas = scheduler.sigmas.double()
    for i, t in enumerate(scheduler.timesteps.tolist()):
        sigma, following = sigmas[i].item(), sigmas[i + 1].item()
        eps = torch.ones(1, 1, 1, 1, dtype=torch.float64)
        x, v = sigma * eps, eps  # x0 = 0
        stats = flow.step_stats(scheduler, v, torch.tensor([t]), x, 0.7, sampler)
        variance = stats.mean.double().item() ** 2 + stats.std.double().item() ** 2
        if sampler == "cps" or following == 0:
            assert variance == pytest.approx(following**2, rel=1e-5, abs=1e-12)
        else:
            assert variance > following**2 * 1.01


@pytest.mark.parametrize("sampler", flow.SAMPLERS)
def test_log_density_is_the_normal_distributions(sampler: str) -> None:
    scheduler = _sd3_scheduler(20)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 16, 4, 4, generator=generator)
    v = torch.randn(3, 16, 4, 4, generator=generator)
    t = torch.tensor(scheduler.timesteps[[0, 7, 18]].tolist())
    stats = flow.step_stats(scheduler, v, t, x, 0.7, sampler)
    child = stats.mean + stats.std * torch.randn(x.shape, generator=generator)
    expected = torch.distributions.Normal(stats.mean.double(), stats.std.double()).log_prob(child.double())
    torch.testing.assert_close(gaussian_log_prob(child, stats.mean, stats.std).double(),
                               expected.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gaussian_log_prob(child, stats.mean, stats.std, "sum").double(),
                               expected.sum(dim=(1, 2, 3)), rtol=1e-5, atol=1e-3)


def test_threshold_is_linear_in_the_std_of_the_trained_steps() -> None:
    """The last step (to sigma 0) forms no pairs; over the others the threshold is low at the least noisy step and
    high at the noisiest, linear in between."""
    scheduler = _sd3_scheduler(20)
    index = flow.trained_steps(scheduler)
    assert index.tolist() == list(range(19))
    timesteps, stds = scheduler.timesteps[index].tolist(), flow.step_std(scheduler, index, 0.7)
    table = threshold_schedule(timesteps, stds, 0.35, 0.5)
    assert scheduler.timesteps[-1].item() not in table
    lo, hi = stds.min().item(), stds.max().item()
    for t, s in zip(timesteps, stds.tolist()):
        assert table[t] == pytest.approx(0.35 + (s - lo) / (hi - lo) * 0.15)
    assert min(table.values()) == pytest.approx(0.35) and max(table.values()) == pytest.approx(0.5)
    # the noise level a scales every std alike: the table does not depend on it
    other = threshold_schedule(timesteps, flow.step_std(scheduler, index, 0.9), 0.35, 0.5)
    assert other == pytest.approx(table)


def test_forward_process_matches_the_schedulers_scale_noise() -> None:
    scheduler = _sd3_scheduler(20)
    noise_schedule = flow.FlowNoise(scheduler)
    generator = torch.Generator().manual_seed(3)
    clean, noise = torch.randn(2, 16, 4, 4, generator=generator), torch.randn(2, 16, 4, 4, generator=generator)
    for t in scheduler.timesteps[[0, 5, 19]].tolist():
        ours = noise_schedule.add_noise(clean, noise, torch.full((2,), t))
        reference = _sd3_scheduler(20)
        theirs = reference.scale_noise(clean, torch.full((2,), t), noise)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_lrm_timesteps_are_the_20_step_grid() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    train, evaluation = flow.lrm_timesteps(FlowMatchEulerDiscreteScheduler(shift=3.0), 1024)
    grid = _sd3_scheduler(20).timesteps.tolist()
    assert train == sorted(round(t, 3) for t in grid) and len(train) == 20
    assert evaluation[0] == train[0] and evaluation[-1] == 1000.0 and len(evaluation) == 5
    assert set(evaluation) <= set(train)
