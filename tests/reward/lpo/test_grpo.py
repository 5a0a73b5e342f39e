"""Step-wise GRPO: advantages, the clipped surrogate, the exact KL and their gradients against independent
computations on hand-made inputs; one policy forward per parent; on-policy ratios of 1; the trainer end to end,
resumed, and on 2 processes against 1."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lpo.cli import app
from lpo.reward import checkpoints
from lpo.reward.backbones import FAMILIES, load_generator
from lpo.reward.lpo import grpo, sampler
from lpo.reward.lpo import train as lpo_train
from lpo.reward.lpo.config import LPOConfig
from lpo.reward.lrm.model import LatentRewardModel

REPO = Path(__file__).resolve().parents[3]
PROMPTS = ["a red circle on a blue background", "a green square on a white background", "a white triangle"]


def _config(family, tiny, lrms, prompts, out, **kw) -> LPOConfig:
    defaults = dict(family=family, base=str(tiny / family), lrm=lrms[family], prompts=prompts, out=out, epochs=1,
                    sample_batch_size=2, train_batch_size=4, candidates=3, steps=3, lora_rank=4, lr=1e-3,
                    device="cpu", validation_images=1, objective="grpo")
    return LPOConfig(**(defaults | kw))


# ---------------------------------------------------------------------------------------------------------------
# the objective on hand-made inputs


def test_advantages_are_clipped_group_z_scores_and_zero_for_equal_scores() -> None:
    scores = torch.tensor([[1.0, 2.0, 4.0, 9.0], [3.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 100.0]])
    got = grpo.advantages(scores)
    for row, want_row in zip(scores.numpy().astype(np.float64), got.numpy()):
        std = row.std()  # population std, as numpy's default
        want = np.zeros_like(row) if std == 0 else np.clip((row - row.mean()) / (std + 1e-4), -5, 5)
        np.testing.assert_allclose(want_row, want, rtol=1e-6, atol=1e-7)
    assert torch.equal(got[1], torch.zeros(4))  # exactly 0, not merely small
    assert got[2, 3] < 5 and got[2, :3].max() < 0  # one outlier: z = sqrt(3), within the clip
    many = grpo.advantages(torch.tensor([[0.0] * 99 + [1.0]]))
    assert many.max() == 5.0  # z = 9.95 for one of 100, clipped to 5


def _reference_loss(log_prob, old, adv, eps, kl, kl_weight) -> float:
    """The clipped surrogate written out element by element (plain Python)."""
    total = 0.0
    parents, k = len(log_prob), len(log_prob[0])
    for p in range(parents):
        for j in range(k):
            ratio = math.exp(log_prob[p][j] - old[p][j])
            clipped = min(max(ratio, 1 - eps), 1 + eps)
            total += min(ratio * adv[p][j], clipped * adv[p][j])
    return -total / (parents * k) + kl_weight * sum(kl) / parents


def test_grpo_loss_equals_the_written_out_surrogate_and_its_clip_fraction() -> None:
    log_prob = torch.tensor([[0.05, -0.3, 0.0], [0.2, 0.01, -0.02]], dtype=torch.float64)
    old = torch.zeros_like(log_prob)
    adv = torch.tensor([[1.0, -1.0, 0.5], [-2.0, 1.5, 0.0]], dtype=torch.float64)
    kl = torch.tensor([0.3, 0.1], dtype=torch.float64)
    out = grpo.grpo_loss(log_prob, old, adv, eps=0.1, kl=kl, kl_weight=0.1)
    want = _reference_loss(log_prob.tolist(), old.tolist(), adv.tolist(), 0.1, kl.tolist(), 0.1)
    assert out["loss"].item() == pytest.approx(want, rel=1e-12)
    ratios = np.exp(log_prob.numpy())
    assert out["clip_fraction"].item() == pytest.approx(np.mean(np.abs(ratios - 1) > 0.1))  # 0.3 and 0.2 leave
    assert out["kl"].item() == pytest.approx(0.2)
    no_kl = grpo.grpo_loss(log_prob, old, adv, eps=0.1)
    assert no_kl["loss"].item() == pytest.approx(want - 0.1 * 0.2, rel=1e-12)
    # |ratio - 1| of every child, summarised per round as where the clip would act
    np.testing.assert_allclose(out["ratio_deviation"].numpy(), np.abs(ratios - 1).flatten(), rtol=1e-12)
    summary = grpo.ratio_summary(out["ratio_deviation"])
    assert summary["ratio_deviation_max"] == pytest.approx(np.abs(ratios - 1).max())
    for q in (50, 90, 99):
        assert summary[f"ratio_deviation_p{q}"] == pytest.approx(np.quantile(np.abs(ratios - 1), q / 100))


def test_grpo_refuses_summed_log_densities(tiny_models_dir, lrms, prompt_file, tmp_path) -> None:
    """--clip-eps and --grpo-kl are per latent element: with a summed log-density a ratio leaves any clip at once
    (a summed log-ratio of 19 is a ratio of 1.8e8), so GRPO with `sum` is refused before any model loads."""
    from lpo.core.errors import InputError

    with pytest.raises(InputError, match="--logprob-reduction sum cannot train GRPO"):
        lpo_train.run(_config("sd15", tiny_models_dir, lrms, prompt_file, tmp_path / "run",
                              logprob_reduction="sum"))
    assert not (tmp_path / "run").exists()


def test_grpo_gradient_equals_the_analytic_gradient_on_the_step_mean() -> None:
    """Children x^k of a Gaussian step with a trainable mean: autograd through gaussian_log_prob, grpo_loss and the
    KL against the closed form dL/dmu = -1/(PK) sum_k A_k rho_k [k unclipped] (x^k - mu) / (std^2 D)
    + beta_KL / P (mu - mu_ref) / (std^2 D)."""
    from lpo.reward.lpo.step import gaussian_log_prob

    rng = np.random.default_rng(0)
    parents, k, d, std, eps, beta = 3, 4, 6, 0.7, 0.1, 0.3
    mu_old = rng.normal(size=(parents, d))
    mu_ref = mu_old + rng.normal(scale=0.05, size=(parents, d))
    x = mu_old[:, None] + std * rng.normal(size=(parents, k, d))
    mu = mu_old + rng.normal(scale=0.2, size=(parents, d))  # far enough from the sampling mean that some clip
    adv = rng.normal(size=(parents, k))

    mean = torch.tensor(mu, requires_grad=True)
    sigma = torch.full((parents * k, 1), std, dtype=torch.float64)
    children = torch.tensor(x).reshape(parents * k, d)
    log_prob = gaussian_log_prob(children, mean[:, None].expand(parents, k, d).reshape(parents * k, d),
                                 sigma).view(parents, k)
    old = gaussian_log_prob(children, torch.tensor(mu_old)[:, None].expand(parents, k, d).reshape(parents * k, d),
                            sigma).view(parents, k)
    kl = grpo.equal_variance_kl(mean, torch.tensor(mu_ref), torch.full((parents, 1), std, dtype=torch.float64))
    out = grpo.grpo_loss(log_prob, old, torch.tensor(adv), eps, kl, beta)
    out["loss"].backward()

    logp = lambda m: (-(x - m[:, None]) ** 2 / (2 * std**2)).mean(-1)  # noqa: E731  (constants cancel)
    ratio = np.exp(logp(mu) - logp(mu_old))
    active = np.where(adv > 0, ratio <= 1 + eps, ratio >= 1 - eps)  # the unclipped term is the minimum
    assert 0 < out["clip_fraction"].item() and not active.all()  # the test covers clipped children too
    d_logp = (x - mu[:, None]) / (std**2 * d)  # [P, K, D]
    grad = -(adv * ratio * active)[..., None] * d_logp
    want = grad.sum(1) / (parents * k) + beta / parents * (mu - mu_ref) / (std**2 * d)
    np.testing.assert_allclose(mean.grad.numpy(), want, rtol=1e-5, atol=1e-9)  # log-densities in float32
    # the KL itself: the closed form of two Gaussians with one std, per element, averaged
    np.testing.assert_allclose(kl.detach().numpy(), ((mu - mu_ref) ** 2 / (2 * std**2)).mean(-1), rtol=1e-6)


def test_equal_variance_kl_equals_torch_distributions() -> None:
    from torch.distributions import Normal, kl_divergence

    generator = torch.Generator().manual_seed(0)
    mean, ref = torch.randn(2, 3, 4, generator=generator), torch.randn(2, 3, 4, generator=generator)
    std = torch.tensor([0.3, 1.2]).view(2, 1, 1)
    want = kl_divergence(Normal(mean, std.expand_as(mean)), Normal(ref, std.expand_as(ref)))
    torch.testing.assert_close(grpo.equal_variance_kl(mean, ref, std), want.mean(dim=(1, 2)))
    torch.testing.assert_close(grpo.equal_variance_kl(mean, ref, std, "sum"), want.sum(dim=(1, 2)))


# ---------------------------------------------------------------------------------------------------------------
# on the tiny generators


def _lora_model(tiny: Path, family: str):
    from peft import LoraConfig

    model = load_generator(str(tiny / family))
    model.denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                          target_modules=list(FAMILIES[family].lora_targets)))
    return model


def _groups(model, lrm, config: LPOConfig, steps: int = 3):
    model.timesteps(steps)
    thresholds = {t: 0.0 for t in model.step_stds(config.eta)[0]}
    cond = model.encode_prompts(PROMPTS[:2])
    result = sampler.rollout(model, cond, PROMPTS[:2], lrm, [torch.Generator().manual_seed(s) for s in (1, 2)],
                             thresholds, steps=steps, guidance=config.guidance, eta=config.eta, k=3,
                             denoiser=model.denoiser, objective="grpo")
    return cond, result.tensors(), len(thresholds)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_on_policy_ratios_are_one_and_equal_scores_give_zero_gradient(family, tiny_models_dir, lrms):
    """Before any update the policy is the sampler (and the reference): recomputed in a training batch of another
    composition every child's ratio is 1 and nothing is clipped; with the K scores equal (advantages 0) the loss,
    KL term included, has exactly zero gradient."""
    model = _lora_model(tiny_models_dir, family)
    config = LPOConfig(family=family, objective="grpo").resolved()
    lrm = LatentRewardModel.from_pretrained(lrms[family])
    cond, groups, trained_steps = _groups(model, lrm, config)
    assert groups["children"].shape[:2] == (2 * trained_steps, 3) and groups["old_log_prob"].shape == (
        2 * trained_steps, 3)
    adv = groups["advantages"]  # z-scores within each group of K = 3 (none clipped: |z| <= sqrt(2) for K = 3)
    torch.testing.assert_close(adv.mean(1), torch.zeros(len(adv)), rtol=0, atol=1e-6)
    spread = adv.std(1, unbiased=False)  # s / (s + 1e-4): just below 1 for the random LRM's small score spreads
    assert ((spread > 0.9) & (spread < 1)).all()
    reference = lpo_train.Reference(model.denoiser, lora=True)
    chunk = torch.randperm(len(groups["t"]), generator=torch.Generator().manual_seed(0))[:3]
    batch = {"x_t": groups["x_t"][chunk], "t": groups["t"][chunk], "children": groups["children"][chunk]}
    chunk_cond = cond.select(groups["prompt"][chunk])
    out = grpo.group_log_probs(model, model.denoiser, reference, batch, chunk_cond, config.guidance, config.eta,
                               "mean", with_kl=True)
    torch.testing.assert_close(out["log_prob"], groups["old_log_prob"][chunk], rtol=1e-5, atol=1e-5)
    assert torch.equal(out["kl"], torch.zeros(3))
    losses = grpo.grpo_loss(out["log_prob"], groups["old_log_prob"][chunk], torch.zeros(3, 3), config.clip_eps,
                            out["kl"], kl_weight=0.1)
    assert losses["clip_fraction"].item() == 0.0
    losses["loss"].backward()
    grads = [p.grad for p in model.denoiser.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.count_nonzero(g) == 0 for g in grads)


def test_one_policy_forward_per_parent_and_one_reference_forward_only_with_kl(tiny_models_dir, lrms):
    model = _lora_model(tiny_models_dir, "sd15")
    config = LPOConfig(family="sd15", objective="grpo").resolved()
    lrm = LatentRewardModel.from_pretrained(lrms["sd15"])
    cond, groups, _ = _groups(model, lrm, config)
    reference = lpo_train.Reference(model.denoiser, lora=True)
    batch = {"x_t": groups["x_t"][:4], "t": groups["t"][:4], "children": groups["children"][:4]}
    calls = []
    hook = model.denoiser.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    for with_kl in (True, False):
        grpo.group_log_probs(model, model.denoiser, reference, batch, cond.select(groups["prompt"][:4]),
                             config.guidance, config.eta, "mean", with_kl=with_kl)
    hook.remove()
    assert calls == [8, 8, 8]  # 4 parents x (cond + uncond) for all 3 children each; the reference only with KL


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_grpo_trains_a_lora_and_logs_its_clip_fraction(family, tiny_models_dir, lrms, prompt_file, tmp_path):
    out = tmp_path / "run"
    summary = lpo_train.run(_config(family, tiny_models_dir, lrms, prompt_file, out))
    model = load_generator(str(tiny_models_dir / family))
    model.timesteps(3)
    stochastic = int((model.step_stds(1.0)[1] > 0).sum())
    first = summary["history"][0]
    assert first["groups"] == 2 * stochastic == first["groups_trained"]  # every trained step of both trajectories
    assert summary["groups_trained"] == sum(r["groups_trained"] for r in summary["history"])
    assert all(0 <= r["clip_fraction"] <= 1 and math.isfinite(r["loss"]) for r in summary["history"])
    # the round's |ratio - 1| quantiles, in order
    for r in summary["history"]:
        assert 0 <= r["ratio_deviation_p50"] <= r["ratio_deviation_p90"] <= r["ratio_deviation_p99"] \
            <= r["ratio_deviation_max"]
    logged = checkpoints.read_metrics(out)
    assert logged and all({"clip_fraction", "groups", "loss"} <= set(r) for r in logged)
    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert any(torch.count_nonzero(v) for k, v in lora.items() if "lora_B" in k or "lora.up" in k)


@pytest.mark.parametrize("family", ["sd15", "sd3"])  # the UNet's DDIM and the flow SDE sampler
def test_grpo_resume_continues_the_same_run(family, tiny_models_dir, lrms, prompt_file, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    lpo_train.run(_config(family, tiny_models_dir, lrms, prompt_file, straight, save_every_rounds=1))
    split = tmp_path / "split"
    real_save = checkpoints.save

    def killed_after_first_round(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(checkpoints, "save", killed_after_first_round)
    with pytest.raises(KeyboardInterrupt):
        lpo_train.run(_config(family, tiny_models_dir, lrms, prompt_file, split, save_every_rounds=1))
    monkeypatch.setattr(checkpoints, "save", real_save)
    lpo_train.run(_config(family, tiny_models_dir, lrms, prompt_file, split, save_every_rounds=1, resume=True))
    a = load_file(straight / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(split / "lora" / "pytorch_lora_weights.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    from lpo.core.errors import InputError

    with pytest.raises(InputError, match="objective"):
        lpo_train.run(_config(family, tiny_models_dir, lrms, prompt_file, split, objective="lpo", resume=True))


@pytest.mark.slow  # several processes (or a server) started: in the full run, not the quick loop
# one objective per sampler (the dealing of items is shared by both objectives, the noise by both samplers)
@pytest.mark.parametrize(("family", "objective"), [("sd15", "grpo"), ("sd3", "lpo")])
def test_two_processes_train_as_one_process_with_twice_the_batch(family, objective, tiny_models_dir, lrms,
                                                                 prompt_file, tmp_path):
    """The same trajectories (noise seeded per trajectory of the round), the same items in the same chunks (chunk j
    of both processes = chunk j of one process with twice the batch): the same LoRA, up to float summation order."""
    common = ["--base", str(tiny_models_dir / family), "--lrm", str(lrms[family]), "--prompts", str(prompt_file),
              "--epochs", "1", "--candidates", "2", "--steps", "3", "--threshold", "0,0", "--lr", "1e-3",
              "--objective", objective, "--device", "cpu", "--seed", "5"]
    held = tmp_path / "held.txt"  # the monitor checks on the main process while the other waits for its verdict
    held.write_text("a blue circle\na red square\n")
    common += ["--monitor-prompts", str(held), "--monitor-every", "1", "--monitor-metrics", "pickscore",
               "--monitor-models-dir", str(tiny_models_dir)]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lpo",
           "optimize", family, *common, "--out", str(tmp_path / "two"), "--sample-batch-size", "1",
           "--train-batch-size", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(two, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # the one-process reference runs in this process (no second interpreter to start); its batch of 2 is another
    # float reduction order than two batches of 1, which the tolerance below must absorb
    one = CliRunner().invoke(app, ["optimize", family, *common, "--out", str(tmp_path / "one"),
                                   "--sample-batch-size", "2", "--train-batch-size", "2"])
    assert one.exit_code == 0, one.output[-3000:]
    runs = {name: json.loads((tmp_path / name / "lpo_summary.json").read_text()) for name in ("one", "two")}
    assert runs["one"]["updates"] == runs["two"]["updates"] > 0
    unit = "groups_trained" if objective == "grpo" else "tuples_trained"
    assert runs["one"][unit] == runs["two"][unit] > 0
    a = load_file(tmp_path / "one" / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "two" / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    moved = [k for k in a if "lora_B" in k or "lora.up" in k]
    assert any(torch.count_nonzero(a[k]) for k in moved)
    # Adam moves a weight by about lr (1e-3) an update whatever its gradient's scale, so N updates move it by up to
    # about lr x N: rounding differences in the gradients may change how far it moves, but a wrong item, chunk or
    # reduction would move it by a share of lr per update. 5% of the largest movement tells the two apart.
    tolerance = 0.05 * 1e-3 * runs["one"]["updates"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=tolerance)
    one_log, two_log = checkpoints.read_metrics(tmp_path / "one"), checkpoints.read_metrics(tmp_path / "two")
    assert [r["loss"] for r in one_log] == pytest.approx([r["loss"] for r in two_log], rel=1e-3, abs=1e-5)
    # the items are gathered from both processes (3 prompts: 2 rounds of 1 prompt per process), and one metrics line
    # per optimizer update is written once, by the main process, with the global batch's numbers
    assert runs["two"]["round"] == 2
    if objective == "lpo":  # 2 trajectories x the 2 steps that form pairs (a flow sampler's last one forms none)
        assert runs["two"]["rounds"][0]["valid_pairs"] == 4
    assert [r["update"] for r in two_log] == list(range(1, runs["two"]["updates"] + 1))
    checks = {name: [json.loads(line) for line in (tmp_path / name / "monitor.jsonl").read_text().splitlines()]
              for name in ("one", "two")}
    assert [c["round"] for c in checks["one"]] == [c["round"] for c in checks["two"]] == [0, 1, 2]
    for key in ("lrm_reward", "pickscore"):  # the same held-out images from (up to float order) the same policy
        assert [c[key] for c in checks["two"]] == pytest.approx([c[key] for c in checks["one"]], rel=1e-3, abs=1e-4)
    assert runs["one"]["monitor"]["best_round"] == runs["two"]["monitor"]["best_round"]
    unit = "groups" if objective == "grpo" else "tuples"
    assert all(r["lr"] == 1e-3 and r[unit] == 2 and math.isfinite(r["loss"]) for r in two_log)
