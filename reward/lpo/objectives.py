"""What the LPO trainer optimises, as records: everything that differs between LPO and step-wise GRPO (the rollout
items a round trains on, the loss, what is logged, how many denoiser forwards an item costs) is a method here, so
the trainer (`lpo.reward.lpo.train`) has no branch on the objective and a new objective is one class plus its tests.

- `LPO`: preference tuples (x_t, x_w, x_l) whose softmax gap passes the step's threshold, the DPO-style loss on the
  step's log-densities (`lpo.reward.lpo.loss`), one policy and one reference forward per tuple.
- `GRPO`: whole groups of K children with their sampling log-densities and group-normalised advantages, the clipped
  policy-gradient loss plus the exact KL to the reference (`lpo.reward.lpo.grpo`); the reference forward only when
  the KL weight is above 0.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lpo.core.errors import InputError
from lpo.reward.lpo.config import LPOConfig
from lpo.reward.lpo.grpo import group_log_probs, grpo_loss, ratio_summary
from lpo.reward.lpo.loss import lpo_loss
from lpo.reward.lpo.step import gaussian_log_prob


def step_log_probs(model: Any, policy: Any, reference: Any, batch: dict[str, Any], cond: Any,
                   config: LPOConfig) -> dict[str, torch.Tensor]:
    """log p_theta and log p_ref of x_w and x_l: one policy forward and one reference forward for the batch."""
    x_t, t = batch["x_t"], batch["t"]
    policy = model.step(model.predict(x_t, t, cond, config.guidance, denoiser=policy,
                                      detach_uncond=config.detach_uncond), t, x_t, config.eta)
    ref = model.step(model.predict(x_t, t, cond, config.guidance, denoiser=reference), t, x_t, config.eta)
    reduce = config.logprob_reduction
    return {
        "w": gaussian_log_prob(batch["x_w"], policy.mean, policy.std, reduce),
        "l": gaussian_log_prob(batch["x_l"], policy.mean, policy.std, reduce),
        "ref_w": gaussian_log_prob(batch["x_w"], ref.mean, ref.std, reduce),
        "ref_l": gaussian_log_prob(batch["x_l"], ref.mean, ref.std, reduce),
    }


def stack_items(items: list[dict[str, Any]], fields: tuple[str, ...], device: Any) -> dict[str, torch.Tensor]:
    """A training batch of rollout items: x_t, t and the objective's `fields` stacked, the tensors moved to `device`
    in the dtype they were stored in (the step maths runs in float32; the denoiser casts its own input)."""
    return {"x_t": torch.stack([item["x_t"] for item in items]).to(device),
            "t": torch.tensor([item["t"] for item in items]),
            **{name: torch.stack([item[name] for item in items]).to(device) for name in fields}}


def per_step(values: dict, timesteps: torch.Tensor) -> torch.Tensor:
    """The value of each timestep's nearest key (timesteps come back from tensors in float32) [B], float32."""
    keys = torch.tensor(list(values), dtype=torch.float64)
    index = (timesteps.to(torch.float64).reshape(-1, 1) - keys).abs().argmin(dim=1)
    return torch.tensor(list(values.values()), dtype=torch.float32)[index]


def effective_beta(config: LPOConfig, elements: int) -> float:
    """beta per latent element: a summed log-density is `elements` times the mean, so beta is divided by it and one
    --beta means one temperature under both reductions."""
    return config.beta / elements if config.logprob_reduction == "sum" else config.beta


class Objective:
    """One training objective of `lpo optimize`. Class attributes name what a round logs; the methods give the
    loss and the accounting."""

    name: ClassVar[str]
    unit: ClassVar[str]  # what is trained on, counted in the summary as `<unit>_trained`
    noun: ClassVar[str]  # the items trained on, as a report names them
    found: ClassVar[str]  # the round record's count of the items the rollout produced
    fields: ClassVar[tuple[str, ...]]  # the rollout's per-item fields the loss reads (besides x_t, t, prompt)
    logged: ClassVar[tuple[str, ...]]  # the loss's outputs averaged into the round record
    shared: ClassVar[str]  # the loss output reduced over processes into each update's metrics line
    sampled: ClassVar[str]  # the field holding the log-densities of the item's children as they were sampled

    def check(self, config: LPOConfig) -> None:
        """Refuse settings this objective cannot train (before any model loads)."""

    def losses(self, model: Any, denoiser: Any, reference: Any, batch: dict[str, torch.Tensor], cond: Any,
               config: LPOConfig, scales: dict | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forwards(self, config: LPOConfig) -> int:
        """Denoiser forwards per item trained on (a CFG forward, both halves in one batch, counts once)."""
        raise NotImplementedError

    def replayed_log_probs(self, model: Any, policy: Any, batch: dict[str, torch.Tensor], cond: Any,
                           config: LPOConfig) -> torch.Tensor:
        """log p_theta of the items' children by the training forward, the shape of `batch[self.sampled]`: before
        the first update it must equal the sampling-time log-densities (the on-policy ratio is 1)."""
        raise NotImplementedError

    def settings(self, config: LPOConfig, thresholds: dict) -> str:
        """The objective's settings for the run's first log line."""
        raise NotImplementedError

    def progress(self, record: dict[str, Any]) -> str:
        """A round's numbers for the progress bar."""
        raise NotImplementedError

    def summary(self, per_chunk: list[dict[str, torch.Tensor]], gather: Any) -> dict[str, float]:
        """Round-level numbers beyond the means of `logged`, from every chunk's loss outputs; `gather` collects a
        tensor from every process."""
        return {}


class LPO(Objective):
    name, unit, noun, found = "lpo", "tuples", "tuples", "valid_pairs"
    fields = ("x_w", "x_l", "sample_log_prob")
    logged = ("loss", "implicit_accuracy", "margin", "ratio_w", "ratio_l")
    shared = "implicit_accuracy"
    sampled = "sample_log_prob"

    def losses(self, model, denoiser, reference, batch, cond, config, scales):
        log_probs = step_log_probs(model, denoiser, reference, batch, cond, config)
        scale = None if scales is None else per_step(scales, batch["t"]).to(log_probs["w"].device)
        return lpo_loss(log_probs["w"], log_probs["l"], log_probs["ref_w"], log_probs["ref_l"],
                        effective_beta(config, batch["x_w"][0].numel()), config.clip_eps, scale)

    def forwards(self, config):
        return 2

    def replayed_log_probs(self, model, policy, batch, cond, config):
        step = model.step(model.predict(batch["x_t"], batch["t"], cond, config.guidance, denoiser=policy), batch["t"],
                          batch["x_t"], config.eta)
        reduce = config.logprob_reduction
        return torch.stack([gaussian_log_prob(batch[name], step.mean, step.std, reduce) for name in ("x_w", "x_l")],
                           dim=1)

    def settings(self, config, thresholds):
        return f"beta {config.beta:.0f}, thresholds {min(thresholds.values()):.3f}..{max(thresholds.values()):.3f}"

    def progress(self, record):
        return f"pairs {record['valid_pairs']} acc {record.get('implicit_accuracy', float('nan')):.2f}"


class GRPO(Objective):
    name, unit, noun, found = "grpo", "groups", "groups of K", "groups"
    fields = ("children", "old_log_prob", "advantages")
    logged = ("loss", "policy_loss", "kl", "clip_fraction", "ratio")
    shared = "clip_fraction"
    sampled = "old_log_prob"

    def check(self, config):
        if config.logprob_reduction == "sum":
            raise InputError("--logprob-reduction sum cannot train GRPO: its --clip-eps and --grpo-kl are per latent "
                             "element, so a summed log-ratio leaves the clip at once (a ratio of e^19 gives a "
                             "gradient of 1e8, beyond e^20 it is dropped). Use --logprob-reduction mean.")

    def losses(self, model, denoiser, reference, batch, cond, config, scales):
        out = group_log_probs(model, denoiser, reference, batch, cond, config.guidance, config.eta,
                              config.logprob_reduction, with_kl=config.grpo_kl > 0,
                              detach_uncond=config.detach_uncond)
        return grpo_loss(out["log_prob"], batch["old_log_prob"], batch["advantages"], config.clip_eps, out.get("kl"),
                         config.grpo_kl)

    def forwards(self, config):
        return 1 if config.grpo_kl == 0 else 2

    def replayed_log_probs(self, model, policy, batch, cond, config):
        return group_log_probs(model, policy, None, batch, cond, config.guidance, config.eta,
                               config.logprob_reduction, with_kl=False)["log_prob"]

    def settings(self, config, thresholds):
        return f"clip {config.clip_eps}, KL {config.grpo_kl}"

    def progress(self, record):
        return f"groups {record['groups']} clipped {record.get('clip_fraction', float('nan')):.3f}"

    def summary(self, per_chunk, gather):
        # every process trains the same number of groups of K, so the gather lines up
        deviations = torch.cat([losses["ratio_deviation"] for losses in per_chunk])
        return ratio_summary(gather(deviations).cpu())


OBJECTIVES: dict[str, Objective] = {objective.name: objective for objective in (LPO(), GRPO())}
