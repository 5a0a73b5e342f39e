"""The latent reward model's training loss and pairwise accuracy (method: soft-label Bradley-Terry)."""

from __future__ import annotations

import math

import torch


def pair_labels(winner: torch.Tensor, is_tie: torch.Tensor) -> torch.Tensor:
    """Soft labels [B, 2]: (1, 0) when image 0 won, (0, 1) when image 1 won, (0.5, 0.5) for a tie."""
    labels = torch.stack([(winner == 0).float(), (winner == 1).float()], dim=-1)
    return torch.where(is_tie[:, None], torch.full_like(labels, 0.5), labels)


def bradley_terry_loss(scores_0: torch.Tensor, scores_1: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                       weight_total: torch.Tensor | float | None = None) -> torch.Tensor:
    """Σ_i w_i ℓ_i / Σ_j w_j with ℓ_i = -Σ_k label_ik log softmax(s_i0, s_i1)_k + [tie_i] log 0.5.

    The log 0.5 term makes the minimum of a tie's loss zero, like a decided pair's. `weight_total` is Σ_j w_j over
    the global batch (all processes); it defaults to this batch's own sum.
    """
    logits = torch.stack([scores_0, scores_1], dim=-1).float()
    per_pair = -(labels * logits.log_softmax(-1)).sum(-1)
    ties = (labels[:, 0] == labels[:, 1]).float()
    per_pair = per_pair + ties * math.log(0.5)
    total = weights.sum() if weight_total is None else weight_total
    return (weights * per_pair).sum() / total


def pair_weights(num_example_per_prompt: torch.Tensor) -> torch.Tensor:
    """1 / num_example_per_prompt, with 1 where the count is missing (<= 0)."""
    counts = num_example_per_prompt.float()
    return torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.ones_like(counts))


def pairwise_correct(scores_0: torch.Tensor, scores_1: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per pair: label_0 when image 0 scores higher, label_1 when image 1 does, 0 on equal scores; so a tie
    earns 0.5 whichever image the model prefers."""
    return (scores_0 > scores_1).float() * labels[:, 0] + (scores_0 < scores_1).float() * labels[:, 1]
