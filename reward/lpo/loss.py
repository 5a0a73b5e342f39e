"""The LPO loss: a DPO-style loss on one denoising step's log-probability ratio, with an SPO-style ratio clip.

    r(x)  = clamp(exp(log p_theta(x | x_t) - log p_ref(x | x_t)), 1 - eps, 1 + eps)
    loss  = -log sigmoid(beta * (log r(x_w) - log r(x_l)))

With `--beta-schedule kappa` each step's log-ratio is first multiplied by s_t = median(kappa) / kappa_t, kappa_t =
|d mean / d model output| / std of step t (`Generator.step_kappas`): the log-ratio a given change of the model's
output makes grows with kappa_t, which spans 0.02-1.6 over a flow trajectory (0.6-0.85 on DDIM), so the scaled
log-ratio is the same function of the output change at every step, and beta and the clamp act alike on all of them.

Outside the clamp the ratio is constant, so its gradient is zero: the policy stops moving a sample once it is
already eps more (or less) likely than under the reference. The clamp is applied to the log-ratio itself, between
log(1 - eps) and log(1 + eps): exp of a summed log-density difference overflows (d > 88 in float32), and the
clamp's backward would then be 0 * inf.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def clipped_log_ratio(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, eps: float,
                      scale: torch.Tensor | None = None) -> torch.Tensor:
    """log clamp(p / p_ref, 1 - eps, 1 + eps), computed in log space (finite, with finite gradients, for any d);
    with `scale` [B], the log-ratio is multiplied by it first (`--beta-schedule kappa`)."""
    log_ratio = log_prob - ref_log_prob.detach()
    if scale is not None:
        log_ratio = log_ratio * scale
    return torch.clamp(log_ratio, math.log(1 - eps), math.log(1 + eps))


def lpo_loss(log_prob_w: torch.Tensor, log_prob_l: torch.Tensor, ref_log_prob_w: torch.Tensor,
             ref_log_prob_l: torch.Tensor, beta: float = 500.0, eps: float = 0.1,
             scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Mean loss over the batch, plus what the trainer logs (implicit accuracy = share with r_w > r_l). `scale` [B]
    multiplies each tuple's log-ratios before the clamp (a per-step temperature and clamp; None: 1)."""
    log_r_w = clipped_log_ratio(log_prob_w, ref_log_prob_w, eps, scale)
    log_r_l = clipped_log_ratio(log_prob_l, ref_log_prob_l, eps, scale)
    margin = beta * (log_r_w - log_r_l)
    loss = -F.logsigmoid(margin).mean()
    return {"loss": loss, "implicit_accuracy": (log_r_w > log_r_l).float().mean().detach(),
            "margin": margin.mean().detach(), "ratio_w": log_r_w.exp().mean().detach(),
            "ratio_l": log_r_l.exp().mean().detach()}
