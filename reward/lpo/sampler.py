"""Sampling with K candidates per step, scored by a latent reward model, for any family's stochastic sampler
(DDIM with eta > 0 for the UNet families).

- `rollout` (training): at every step draw K children of the same x_t and score them with the LRM. For LPO, keep
  the best and worst as a pair when the softmax gap of their scores exceeds the step's threshold; for step-wise
  GRPO (`lpo.reward.lpo.grpo`), keep every trained step's whole group: the K children, their log-densities under
  the sampling step and their advantages. Steps without a threshold (such as a flow sampler's nearly deterministic
  last step) are not trained. The trajectory continues from a random child.
- `sample` (inference): plain DDIM sampling (K = 1), or LRM-guided sampling that continues from the best of K
  candidates at every step. With K = 1 it is plain sampling, draw for draw.

Noise is drawn on the CPU from one generator per image, so a seed gives the same image on any device and in any
batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lpo.reward.backbones.base import Conditioning, Generator, StepStats
from lpo.reward.lpo.grpo import advantages
from lpo.reward.lpo.step import gaussian_log_prob

NOISE_BANDS = ((751, 1000, "t>751"), (501, 751, "501-751"), (251, 501, "251-501"), (0, 251, "1-251"))


def band_of(t: float) -> str:
    return next(name for low, high, name in NOISE_BANDS if low < t <= high or (low == 0 and t <= high))


def _noise(generators: list[torch.Generator], k: int, shape: tuple[int, ...]) -> torch.Tensor:
    """[k, B, *shape] standard normal, image b's noise from generators[b]."""
    return torch.stack([torch.randn((k, *shape), generator=g) for g in generators], dim=1)


def score_candidates(lrm: Any, candidates: torch.Tensor, timestep: float, prompts: list[str],
                     text: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """LRM scores [K, B] of candidates [K, B, C, H, W], all K x B in one batch (timesteps as the family takes them:
    integers for DDPM schedules, sigma x 1000 for flow matching)."""
    k, b = candidates.shape[:2]
    flat = candidates.reshape(k * b, *candidates.shape[2:]).to(lrm.device, lrm.dtype)
    steps = torch.full((k * b,), timestep, device=lrm.device)
    repeated = None if text is None else {name: value.repeat(k, *([1] * (value.dim() - 1)))
                                          for name, value in text.items()}
    return lrm.score(flat, steps, prompts * k, text=repeated).float().view(k, b).cpu()


def branch(model: Generator, latents: torch.Tensor, t: float, cond: Conditioning, guidance: float, eta: float,
           generators: list[torch.Generator], k: int, denoiser: Any = None) -> tuple[StepStats, torch.Tensor]:
    """The step from x_t at `t` and k children drawn from it ([k, B, ...]); a deterministic step (eta 0, or a flow
    sampler's last step to sigma = 0) gives its mean alone ([1, B, ...]) and draws no noise."""
    timesteps = torch.full((latents.shape[0],), t)
    output = model.predict(latents, timesteps, cond, guidance, denoiser=denoiser)
    stats = model.step(output, timesteps, latents, eta)
    if eta == 0 or not bool((stats.std > 0).any()):
        return stats, stats.mean[None]
    return stats, stats.mean[None] + stats.std[None] * _noise(generators, k, model.latent_shape).to(stats.mean)


def scoring_timestep(t: float, stats: StepStats, score_timestep: str) -> float:
    """The timestep the LRM scores children at: the parent's (as the reference) or the child's own."""
    return t if score_timestep == "parent" else max(stats.prev_timestep[0].item(), 0)


@dataclass
class Rollout:
    """What one sampling round trains on: LPO's preference tuples (winner and loser share x_t, t and the prompt) or
    GRPO's groups (all K children of x_t, their sampling log-densities and advantages), with each item's step index
    and trajectory (which orders them the same way however many processes sampled them)."""

    x_t: list[torch.Tensor] = field(default_factory=list)
    timesteps: list[float] = field(default_factory=list)
    prompt_index: list[int] = field(default_factory=list)
    step_index: list[int] = field(default_factory=list)
    x_w: list[torch.Tensor] = field(default_factory=list)
    x_l: list[torch.Tensor] = field(default_factory=list)
    children: list[torch.Tensor] = field(default_factory=list)
    old_log_prob: list[torch.Tensor] = field(default_factory=list)
    sample_log_prob: list[torch.Tensor] = field(default_factory=list)  # LPO: log p of (x_w, x_l) as sampled [2]
    advantages: list[torch.Tensor] = field(default_factory=list)
    spreads: list[float] = field(default_factory=list)  # GRPO: each kept group's softmax gap, tanh((best - worst) / 2)
    valid_per_band: dict[str, int] = field(default_factory=lambda: {name: 0 for *_, name in NOISE_BANDS})
    final: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.timesteps)

    def tensors(self) -> dict[str, torch.Tensor]:
        if not self.timesteps:
            return {}
        out = {"x_t": torch.stack(self.x_t), "t": torch.tensor(self.timesteps),
               "prompt": torch.tensor(self.prompt_index)}
        for name in ("x_w", "x_l", "children", "old_log_prob", "sample_log_prob", "advantages"):
            if getattr(self, name):
                out[name] = torch.stack(getattr(self, name))
        return out


@torch.no_grad()
def rollout(model: Generator, cond: Conditioning, prompts: list[str], lrm: Any, generators: list[torch.Generator],
            thresholds: dict[float, float], steps: int = 20, guidance: float = 5.0, eta: float = 1.0, k: int = 4,
            score_timestep: str = "parent", denoiser: Any = None, objective: str = "lpo",
            reduce: str = "mean", group_filter: bool = False) -> Rollout:
    """One sampling round for a batch of prompts (see the module docstring); `reduce` is how GRPO's sampling
    log-densities are reduced over latent elements; `group_filter` keeps only GRPO groups whose best and worst
    child pass LPO's threshold."""
    timesteps = model.timesteps(steps)
    latents = model.initial_latents(generators).to(model.device)  # float32: the step maths' dtype
    text = lrm.encode_text(prompts)
    result = Rollout()
    for i, t in enumerate(timesteps):
        stats, children = branch(model, latents, t, cond, guidance, eta, generators, k, denoiser)
        threshold = thresholds.get(t)
        # a deterministic step (a flow sampler's last, or sigma_t = 0 when alphas_cumprod ends at 1) has no
        # likelihood, and a step without a threshold is not trained: neither is scored
        if children.shape[0] > 1 and threshold is not None:
            scores = score_candidates(lrm, children, scoring_timestep(t, stats, score_timestep), prompts, text)
            _keep(result, i, t, latents, stats, children, scores, threshold, objective, reduce, group_filter)
        pick = torch.stack([torch.randint(k, (1,), generator=g) for g in generators]).flatten()
        latents = children[pick % children.shape[0], torch.arange(latents.shape[0])]
    result.final = latents
    return result


def _keep(result: Rollout, i: int, t: float, latents: torch.Tensor, stats: StepStats, children: torch.Tensor,
          scores: torch.Tensor, threshold: float, objective: str, reduce: str, group_filter: bool) -> None:
    """Add step i's items to the round: LPO's best/worst pair where their softmax gap passes the threshold, or
    GRPO's whole group (where the gap passes, with `group_filter`)."""

    k = children.shape[0]
    best, worst = scores.argmax(0), scores.argmin(0)
    gap = scores.gather(0, best[None])[0] - scores.gather(0, worst[None])[0]
    # softmax([s_w, s_l])[0] - softmax(...)[1] = tanh(gap / 2) must exceed the threshold
    passes = torch.tanh(gap / 2) > threshold
    valid = stats.std.flatten().cpu() > 0
    if objective == "lpo" or group_filter:
        valid = valid & passes
    for b in torch.nonzero(valid).flatten().tolist():
        result.x_t.append(latents[b].cpu())
        result.timesteps.append(t)
        result.prompt_index.append(b)
        result.step_index.append(i)
        if objective == "lpo":
            pair = torch.stack([children[best[b], b], children[worst[b], b]])
            result.x_w.append(pair[0].cpu())
            result.x_l.append(pair[1].cpu())
            # the pair's log-density under the step it was sampled from: what a training forward must reproduce
            result.sample_log_prob.append(gaussian_log_prob(pair, stats.mean[b:b + 1].expand(pair.shape),
                                                            stats.std[b:b + 1].expand(2, *stats.std.shape[1:]),
                                                            reduce).cpu())
        else:
            group = children[:, b]
            mean = stats.mean[b:b + 1].expand(group.shape)
            std = stats.std[b:b + 1].expand(k, *stats.std.shape[1:])
            result.children.append(group.cpu())
            result.old_log_prob.append(gaussian_log_prob(group, mean, std, reduce).cpu())
            result.advantages.append(advantages(scores[:, b]))
            result.spreads.append(torch.tanh(gap[b] / 2).item())
        result.valid_per_band[band_of(t)] += 1


@torch.no_grad()
def sample(model: Generator, cond: Conditioning, generators: list[torch.Generator], steps: int = 20,
           guidance: float = 5.0, eta: float = 1.0, lrm: Any = None, prompts: list[str] | None = None,
           candidates: int = 1, score_timestep: str = "parent", denoiser: Any = None) -> dict[str, Any]:
    """Sampling; with an LRM and K candidates, continue from the best-scored candidate at every step.
    Returns the final latents and, when guided, the index of the chosen candidate at each step."""
    timesteps = model.timesteps(steps)
    latents = model.initial_latents(generators).to(model.device)  # float32: the step maths' dtype
    guided = lrm is not None
    text = lrm.encode_text(prompts) if guided else None
    chosen = []
    for t in timesteps:
        stats, children = branch(model, latents, t, cond, guidance, eta, generators, candidates, denoiser)
        best = torch.zeros(latents.shape[0], dtype=torch.long)
        if guided and children.shape[0] > 1:  # a deterministic step has one candidate: nothing to choose
            best = score_candidates(lrm, children, scoring_timestep(t, stats, score_timestep), prompts, text).argmax(0)
        if guided:
            chosen.append(best)
        latents = children[best.to(children.device), torch.arange(latents.shape[0])]
    return {"latents": latents, "chosen": torch.stack(chosen) if chosen else None}

