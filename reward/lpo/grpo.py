"""Step-wise GRPO with a latent reward model: the second objective of `lpo optimize` (`--objective grpo`).

At every trained step of a sampled trajectory the policy drew K children of the same parent x_t, and the LRM scored
each one. Instead of LPO's single winner/loser pair, every child counts, through its advantage within the group:

    A_k    = clip((r_k - mean(r)) / (std(r) + 1e-4), -5, 5)          population std over the K children; 0 when all
                                                                     K scores are equal
    rho_k  = exp(log p_theta(x^k | x_t) - log p_old(x^k | x_t))      p_old: the sampling policy's step
    L      = -mean_k min(rho_k A_k, clip(rho_k, 1 - eps, 1 + eps) A_k) + beta_KL * KL(p_theta || p_ref)

with the KL of the step's two Gaussians, which share their std, computed exactly: per latent element
(mean_theta - mean_ref)^2 / (2 std^2), reduced over the elements as the log-densities are (mean or sum). The K
children share x_t, t and the prompt, so one policy forward per parent gives all K log-densities, and one reference
forward (only when beta_KL > 0) its KL. The paper's later version reports this objective on SD1.5 with K = 4, eps 0.1
and beta_KL 0.1 (slightly below LPO, at 8 times its cost).
"""

from __future__ import annotations

from typing import Any

import torch

from lpo.reward.lpo.step import gaussian_log_prob

ADVANTAGE_CLIP = 5.0
STD_EPS = 1e-4
MAX_LOG_RATIO = 20.0  # exp() of a summed log-density difference overflows; beyond e^20 the ratio is clipped anyway


def advantages(scores: torch.Tensor) -> torch.Tensor:
    """Group z-scores of scores [..., K] over the last dimension, clipped to +-5; exactly 0 for a group whose K
    scores are equal (a group that says nothing)."""
    scores = scores.double()
    centred = scores - scores.mean(dim=-1, keepdim=True)
    z = centred / (scores.std(dim=-1, unbiased=False, keepdim=True) + STD_EPS)
    spread = scores.amax(dim=-1, keepdim=True) - scores.amin(dim=-1, keepdim=True)
    return torch.where(spread > 0, z, torch.zeros_like(z)).clamp(-ADVANTAGE_CLIP, ADVANTAGE_CLIP).float()


def equal_variance_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor,
                      reduce: str = "mean") -> torch.Tensor:
    """KL(N(mean, std^2 I) || N(ref_mean, std^2 I)) per sample: per element (mean - ref_mean)^2 / (2 std^2),
    averaged or summed over the non-batch dimensions as the log-densities are."""
    elementwise = (mean.float() - ref_mean.detach().float()) ** 2 / (2 * std.float() ** 2)
    dims = tuple(range(1, elementwise.dim()))
    return elementwise.mean(dim=dims) if reduce == "mean" else elementwise.sum(dim=dims)


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantage: torch.Tensor, eps: float = 0.1,
              kl: torch.Tensor | None = None, kl_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Mean clipped-surrogate loss over the parents [P] and their children [P, K], plus the KL term, and what the
    trainer logs: the clip fraction (share of children whose ratio left [1 - eps, 1 + eps]), the mean ratio and KL."""
    log_ratio = (log_prob - old_log_prob.detach()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = log_ratio.exp()
    advantage = advantage.detach()
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - eps, 1 + eps) * advantage)
    policy_loss = -surrogate.mean()
    kl_mean = kl.mean() if kl is not None else torch.zeros((), device=log_prob.device)
    loss = policy_loss + kl_weight * kl_mean if kl is not None else policy_loss
    deviation = (ratio - 1).abs().detach()
    return {"loss": loss, "policy_loss": policy_loss.detach(), "kl": kl_mean.detach(),
            "clip_fraction": (deviation > eps).float().mean(), "ratio": ratio.mean().detach(),
            "ratio_deviation": deviation.flatten()}


RATIO_QUANTILES = (0.5, 0.9, 0.99)


def ratio_summary(deviations: torch.Tensor) -> dict[str, float]:
    """The max and the 50/90/99% quantiles of |ratio - 1| over a round's children: where the PPO clip would act."""
    deviations = deviations.double()
    out = {"ratio_deviation_max": deviations.max().item()}
    for q in RATIO_QUANTILES:
        out[f"ratio_deviation_p{round(q * 100)}"] = torch.quantile(deviations, q).item()
    return out


def group_log_probs(model: Any, policy: Any, reference: Any, batch: dict[str, torch.Tensor], cond: Any,
                    guidance: float, eta: float, reduce: str, with_kl: bool,
                    detach_uncond: bool = False) -> dict[str, torch.Tensor]:
    """log p_theta of every child [P, K] from one policy forward per parent, and (with_kl) the exact KL to the
    reference [P] from one reference forward per parent."""

    x_t, t, children = batch["x_t"], batch["t"], batch["children"]
    parents, k = children.shape[:2]
    step = model.step(model.predict(x_t, t, cond, guidance, denoiser=policy, detach_uncond=detach_uncond), t, x_t,
                      eta)
    mean = step.mean[:, None].expand(children.shape).reshape(parents * k, *children.shape[2:])
    std = step.std[:, None].expand(parents, k, *step.std.shape[1:]).reshape(parents * k, *step.std.shape[1:])
    out = {"log_prob": gaussian_log_prob(children.reshape(parents * k, *children.shape[2:]), mean, std,
                                         reduce).view(parents, k)}
    if with_kl:
        ref = model.step(model.predict(x_t, t, cond, guidance, denoiser=reference), t, x_t, eta)
        out["kl"] = equal_variance_kl(step.mean, ref.mean, step.std, reduce)
    return out
