"""LPO fine-tuning and LRM-guided sampling end to end on the tiny SD1.5-, SDXL- and SD3.5-style pipelines."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lpo.cli import app
from lpo.core.errors import InputError
from lpo.reward import checkpoints
from lpo.reward.backbones import FAMILIES, load_generator
from lpo.reward.lpo import objectives, sampler
from lpo.reward.lpo import train as lpo_train
from lpo.reward.lpo.config import LPOConfig
from lpo.reward.lrm.model import LatentRewardModel

REPO = Path(__file__).resolve().parents[3]
PROMPTS = ["a red circle on a blue background", "a green square on a white background", "a white triangle"]


def _config(family, tiny, lrms, prompts, out, **kw) -> LPOConfig:
    defaults = dict(family=family, base=str(tiny / family), lrm=lrms[family], prompts=prompts, out=out, epochs=1,
                    sample_batch_size=2, train_batch_size=4, candidates=2, steps=3, threshold=[0.0, 0.0],
                    lora_rank=4, lr=1e-3, device="cpu", validation_images=1)
    return LPOConfig(**(defaults | kw))


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_lpo_trains_a_lora_that_diffusers_loads_and_that_changes_images(family, tiny_models_dir, lrms, prompt_file,
                                                                       tmp_path):
    out = tmp_path / "run"
    summary = lpo_train.run(_config(family, tiny_models_dir, lrms, prompt_file, out))
    assert summary["rounds"] == 2  # 3 prompts, 2 per round
    assert summary["tuples_trained"] > 0
    first = summary["history"][0]
    model = load_generator(str(tiny_models_dir / family))
    model.timesteps(3)
    # SDXL's last step is deterministic; a flow sampler's last step (to sigma 0) forms no pairs
    stochastic = int((model.step_stds(1.0)[1] > 0).sum())
    assert stochastic == (3 if family == "sd15" else 2)
    assert first["valid_pairs"] == 2 * stochastic  # threshold 0: every stochastic step of both trajectories
    assert sum(first[f"valid_{band}"] for band in ("t>751", "501-751", "251-501", "1-251")) == first["valid_pairs"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in summary["history"] if "loss" in r)
    from PIL import Image

    grid = torch.tensor(list(Image.open(out / "validation" / "epoch-1.png").convert("L").getdata()), dtype=torch.float)
    assert grid.mean() > 5 and grid.std() > 1  # not black (the float16 SDXL VAE's overflow); the VAE runs in float32
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()

    cond = model.encode_prompts(PROMPTS[:1])
    before = sampler.sample(model, cond, [torch.Generator().manual_seed(3)], steps=3, eta=0.0)["latents"]
    model.pipeline.load_lora_weights(str(out / "lora"))  # diffusers' own loader
    after = sampler.sample(model, cond, [torch.Generator().manual_seed(3)], steps=3, eta=0.0)["latents"]
    assert not torch.allclose(before, after)
    # every saved layer was loaded, with its weights (a file in mixed naming loads only part of itself, silently):
    # what diffusers loaded, in the naming its own save functions use, is the file
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    saved = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    (adapter,) = model.denoiser.active_adapters()
    loaded = get_peft_model_state_dict(model.denoiser, adapter_name=adapter)
    if family in ("sd3", "flux"):  # diffusers' SD3 and FLUX scripts save PEFT naming
        named = {f"transformer.{k}": v for k, v in loaded.items()}
    else:  # its UNet scripts convert to the diffusers naming
        named = {f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(loaded).items()}
    assert named.keys() == saved.keys() and len(saved) > 0
    for key, value in saved.items():
        torch.testing.assert_close(named[key], value)
    # the run directory stands for its lora/
    from_run = load_generator(str(tiny_models_dir / family), lora=out)
    again = sampler.sample(from_run, cond, [torch.Generator().manual_seed(3)], steps=3, eta=0.0)["latents"]
    torch.testing.assert_close(again, after)


def test_one_policy_and_one_reference_forward_per_batch(tiny_models_dir, lrms):
    from peft import LoraConfig

    model = load_generator(str(tiny_models_dir / "sd15"))
    base = {k: v.clone() for k, v in model.unet.state_dict().items()}
    model.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                      target_modules=list(FAMILIES["sd15"].lora_targets)))
    with torch.no_grad():
        for name, param in model.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # make the adapter matter
    reference = lpo_train.Reference(model.unet, lora=True)
    calls = []
    hook = model.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    model.timesteps(3)
    config = LPOConfig(guidance=5.0, eta=1.0)
    generator = torch.Generator().manual_seed(0)
    shape = (3, *model.latent_shape)
    batch = {"x_t": torch.randn(shape, generator=generator), "t": torch.tensor([667, 334, 1]),
             "x_w": torch.randn(shape, generator=generator), "x_l": torch.randn(shape, generator=generator)}
    log_probs = objectives.step_log_probs(model, model.unet, reference, batch, model.encode_prompts(PROMPTS), config)
    hook.remove()
    assert calls == [6, 6]  # policy and reference, each one CFG forward (cond + uncond) for all 3 tuples
    assert not torch.allclose(log_probs["w"], log_probs["ref_w"])
    # the reference really is the base UNet: the same log-densities from a UNet without the adapter
    plain = load_generator(str(tiny_models_dir / "sd15"))
    plain.unet.load_state_dict(base)
    plain.timesteps(3)
    ref_again = objectives.step_log_probs(plain, plain.unet, lpo_train.Reference(plain.unet, lora=False), batch,
                                         plain.encode_prompts(PROMPTS), config)
    torch.testing.assert_close(log_probs["ref_w"], ref_again["ref_w"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(log_probs["ref_w"], ref_again["w"], rtol=1e-4, atol=1e-4)
    assert model.unet.active_adapters()  # the adapter is back on after the reference forward


@pytest.mark.parametrize("family, sampler_name", [("sd15", "ddim"), ("sd3", "sde"), ("sd3", "cps"), ("flux", "cps")])
def test_on_policy_the_ratio_is_exactly_one(family, sampler_name, tiny_models_dir, lrms):
    """Before any update the policy is the reference (LoRA B starts at 0): recomputed in training batches of another
    composition, every tuple's log-ratio is exactly 0 (the flow-RL community's sanity check that sampling and
    training take the same path), and the log-densities equal the sampler's own step."""
    from peft import LoraConfig

    from lpo.reward.lpo.step import gaussian_log_prob

    model = load_generator(str(tiny_models_dir / family))
    family_ = FAMILIES[family]
    model.denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                          target_modules=list(family_.lora_targets)))
    config = LPOConfig(family=family, sampler=sampler_name).resolved()
    model.use_sampler(config.sampler)
    lrm = LatentRewardModel.from_pretrained(lrms[family])
    model.timesteps(4)
    thresholds = {t: 0.0 for t in model.step_stds(config.eta)[0]}
    cond = model.encode_prompts(PROMPTS[:2])
    result = sampler.rollout(model, cond, PROMPTS[:2], lrm, [torch.Generator().manual_seed(s) for s in (1, 2)],
                             thresholds, steps=4, guidance=config.guidance, eta=config.eta, k=2,
                             denoiser=model.denoiser)
    tuples = result.tensors()
    assert len(result) == 2 * len(thresholds)
    reference = lpo_train.Reference(model.denoiser, lora=True)
    order = torch.randperm(len(result), generator=torch.Generator().manual_seed(0))
    for chunk in (order[:3], order[3:]):
        batch = {"x_t": tuples["x_t"][chunk], "t": tuples["t"][chunk], "x_w": tuples["x_w"][chunk],
                 "x_l": tuples["x_l"][chunk]}
        log_probs = objectives.step_log_probs(model, model.denoiser, reference, batch,
                                             cond.select(tuples["prompt"][chunk]), config)
        assert torch.equal(log_probs["w"], log_probs["ref_w"]) and torch.equal(log_probs["l"], log_probs["ref_l"])
        # the same step the sampler took from x_t, one tuple at a time
        for j in range(len(chunk)):
            t = batch["t"][j:j + 1]
            alone = model.step(model.predict(batch["x_t"][j:j + 1], t, cond.select(tuples["prompt"][chunk][j:j + 1]),
                                             config.guidance), t, batch["x_t"][j:j + 1], config.eta)
            torch.testing.assert_close(gaussian_log_prob(batch["x_w"][j:j + 1], alone.mean, alone.std),
                                       log_probs["w"][j:j + 1], rtol=1e-5, atol=1e-5)


def test_guided_sampling_continues_from_the_best_candidate(tiny_models_dir, lrms, monkeypatch):
    model = load_generator(str(tiny_models_dir / "sd15"))
    lrm = LatentRewardModel.from_pretrained(lrms["sd15"])
    cond = model.encode_prompts(PROMPTS[:2])
    scored, inputs = [], []
    real_score, real_predict = sampler.score_candidates, model.predict

    def record_scores(lrm_, children, t, prompts, text):
        scores = real_score(lrm_, children, t, prompts, text)
        scored.append((children.clone(), scores))
        return scores

    def record_inputs(latents, *args, **kwargs):
        inputs.append(latents.clone())
        return real_predict(latents, *args, **kwargs)

    monkeypatch.setattr(sampler, "score_candidates", record_scores)
    monkeypatch.setattr(model, "predict", record_inputs)
    result = sampler.sample(model, cond, [torch.Generator().manual_seed(s) for s in (1, 2)], steps=4, eta=1.0,
                            lrm=lrm, prompts=PROMPTS[:2], candidates=3)
    assert len(scored) == 4
    for step, (children, scores) in enumerate(scored):
        best = scores.argmax(0)
        assert torch.equal(result["chosen"][step], best)
        chosen = children[best, torch.arange(2)]
        following = inputs[step + 1] if step + 1 < len(inputs) else result["latents"]
        torch.testing.assert_close(following, chosen)


@pytest.mark.parametrize("sampler_name", ["sde", "cps"])
def test_flow_sampling_ends_with_the_deterministic_euler_step(sampler_name, tiny_models_dir, lrms, monkeypatch):
    """On FLUX (where the SDE's own last step would leave noise of std 0.14 at 1024 px), plain and LRM-guided
    sampling, as `lpo sample --lrm` and `lpo eval` run it: the final latent is its parent's Euler step to sigma 0,
    x - sigma v, with the velocity the model gave there; the candidates of that step are not scored (there is one)."""
    model = load_generator(str(tiny_models_dir / "flux"))
    model.use_sampler(sampler_name)
    lrm = LatentRewardModel.from_pretrained(lrms["flux"])
    calls, scored = [], []
    real_predict, real_score = model.predict, sampler.score_candidates

    def record(latents, timesteps, *args, **kwargs):
        velocity = real_predict(latents, timesteps, *args, **kwargs)
        calls.append((latents.clone(), timesteps.clone(), velocity.clone()))
        return velocity

    def record_scores(lrm_, children, *args):
        scored.append(children.shape[0])
        return real_score(lrm_, children, *args)

    monkeypatch.setattr(model, "predict", record)
    monkeypatch.setattr(sampler, "score_candidates", record_scores)
    cond = model.encode_prompts(PROMPTS[:2])
    for guided in (False, True):
        calls.clear()
        scored.clear()
        result = sampler.sample(model, cond, [torch.Generator().manual_seed(s) for s in (1, 2)], steps=4,
                                eta=0.9, lrm=lrm if guided else None, prompts=PROMPTS[:2],
                                candidates=3 if guided else 1)
        parent, t, velocity = calls[-1]
        sigma_last = model.scheduler.sigmas[-2].double().item()
        assert t[0].item() == pytest.approx(sigma_last * 1000, rel=1e-6) and model.scheduler.sigmas[-1] == 0
        expected = parent.double() - sigma_last * velocity.double()
        torch.testing.assert_close(result["latents"].double(), expected, rtol=1e-5, atol=1e-5)
        assert scored == ([3, 3, 3] if guided else [])


def test_guided_sampling_with_one_candidate_is_plain_sampling(tiny_models_dir, lrms):
    model = load_generator(str(tiny_models_dir / "sd15"))
    lrm = LatentRewardModel.from_pretrained(lrms["sd15"])
    cond = model.encode_prompts(PROMPTS[:2])
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    plain = sampler.sample(model, cond, gens(), steps=4, eta=1.0)["latents"]
    guided = sampler.sample(model, cond, gens(), steps=4, eta=1.0, lrm=lrm, prompts=PROMPTS[:2], candidates=1)
    assert torch.equal(plain, guided["latents"])
    # and each image's seed fixes it whatever the batch: image 2 alone equals image 2 in the batch
    alone = sampler.sample(model, model.encode_prompts(PROMPTS[1:2]), [torch.Generator().manual_seed(6)], steps=4,
                           eta=1.0)["latents"]
    torch.testing.assert_close(alone[0], plain[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["sd15", "sd3"])  # the UNet's DDIM and the flow SDE sampler
def test_resume_continues_the_same_run(family, tiny_models_dir, lrms, prompt_file, tmp_path, monkeypatch):
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
    assert lpo_train.latest_checkpoint(split).name == "round-1"
    lpo_train.run(_config(family, tiny_models_dir, lrms, prompt_file, split, save_every_rounds=1, resume=True))
    a = load_file(straight / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(split / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    logged, expected = checkpoints.read_metrics(split), checkpoints.read_metrics(straight)
    assert [r["update"] for r in logged] == [r["update"] for r in expected] == list(range(1, len(expected) + 1))
    assert [r["loss"] for r in logged] == pytest.approx([r["loss"] for r in expected], rel=1e-5)


def test_bad_inputs_exit_before_sampling(tiny_models_dir, lrms, prompt_file, tmp_path):
    with pytest.raises(InputError, match="latent spaces differ"):
        lpo_train.run(_config("sdxl", tiny_models_dir, {"sdxl": lrms["sd15"]}, prompt_file, tmp_path / "a"))
    with pytest.raises(InputError, match="run `lpo optimize sd15`"):
        lpo_train.run(_config("sdxl", tiny_models_dir, lrms, prompt_file, tmp_path / "b",
                              base=str(tiny_models_dir / "sd15")))
    with pytest.raises(InputError, match="not a latent reward model directory"):
        lpo_train.run(_config("sd15", tiny_models_dir, {"sd15": tmp_path}, prompt_file, tmp_path / "c"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(InputError, match="holds no prompts"):
        lpo_train.run(_config("sd15", tiny_models_dir, lrms, empty, tmp_path / "d"))
    out = tmp_path / "e"
    lpo_train.run(_config("sd15", tiny_models_dir, lrms, prompt_file, out))
    with pytest.raises(InputError, match=r"different \['beta'\]"):
        lpo_train.run(_config("sd15", tiny_models_dir, lrms, prompt_file, out, beta=100.0, resume=True))
    with pytest.raises(InputError, match="already holds checkpoints"):
        lpo_train.run(_config("sd15", tiny_models_dir, lrms, prompt_file, out))


@pytest.mark.slow  # two more LPO runs and a merge: in the full run, not the quick loop
def test_full_finetune_and_merge(tiny_models_dir, lrms, prompt_file, tmp_path):
    full = lpo_train.run(_config("sd15", tiny_models_dir, lrms, prompt_file, tmp_path / "full", lora_rank=0))
    assert (tmp_path / "full" / "unet" / "config.json").exists() and "unet" in full
    merged = lpo_train.run(_config("sd15", tiny_models_dir, lrms, prompt_file, tmp_path / "merged", merge=True))
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(merged["merged_unet"])
    stock = UNet2DConditionModel.from_pretrained(str(tiny_models_dir / "sd15"), subfolder="unet")
    name = next(k for k in stock.state_dict() if k.endswith("attn1.to_q.weight"))
    assert not torch.equal(unet.state_dict()[name], stock.state_dict()[name])


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_one_round_under_bf16_autocast_on_the_cpu(family, tiny_models_dir, lrms, prompt_file, tmp_path,
                                                  fresh_accelerator_state):
    """The half-precision path (frozen weights and LRM in bf16, autocast forwards, float32 step maths and LoRA)
    runs on a CPU: finite losses, and at the first update, where the LoRA's B is still zero so the policy is the
    reference, the loss is log 2 (log-ratio difference 0) to bf16 rounding of the two identical forwards: 1e-3."""
    out = tmp_path / "run"
    lpo_train.run(_config(family, tiny_models_dir, lrms, prompt_file, out, mixed_precision="bf16", epochs=1,
                          sample_batch_size=3, validation_images=0))
    logged = checkpoints.read_metrics(out)
    assert logged and all(math.isfinite(r["loss"]) for r in logged)
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sample_command_on_the_flow_families(family, tiny_models_dir, lrms, tmp_path):
    """`lpo sample` from the command line on SD3 and FLUX: plain and LRM-guided images of the pipeline's size, one
    record each, guided images other than the plain ones from the same seeds."""
    from PIL import Image

    out = tmp_path / "samples"
    result = CliRunner().invoke(app, ["sample", "--base", str(tiny_models_dir / family), "--prompt", PROMPTS[0],
                                      "--out", str(out), "--lrm", str(lrms[family]), "--candidates", "3",
                                      "--steps", "4", "--images-per-prompt", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "samples.json").read_text())
    by_kind = {kind: [r for r in summary["images"] if r["kind"] == kind] for kind in ("plain", "guided")}
    assert [len(records) for records in by_kind.values()] == [2, 2]
    pipeline = json.loads((tiny_models_dir / family / "model_index.json").read_text())
    assert pipeline["_class_name"].startswith("StableDiffusion3" if family == "sd3" else "Flux")
    sizes = {Image.open(r["path"]).size for r in summary["images"]}
    assert len(sizes) == 1
    for plain, guided in zip(by_kind["plain"], by_kind["guided"]):
        assert plain["seed"] == guided["seed"]
        assert not np.array_equal(np.asarray(Image.open(plain["path"])), np.asarray(Image.open(guided["path"])))
    assert set(summary["mean_lrm_score"]) == {"plain", "guided"}


def test_sample_command_reports_the_guided_gain(tiny_models_dir, lrms, tmp_path):
    out = tmp_path / "samples"
    result = CliRunner().invoke(app, ["sample", "--base", str(tiny_models_dir / "sd15"), "--prompt", PROMPTS[0],
                                      "--prompt", PROMPTS[1], "--out", str(out), "--lrm", str(lrms["sd15"]),
                                      "--candidates", "4", "--steps", "4", "--images-per-prompt", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "samples.json").read_text())
    assert len(summary["images"]) == 8 and all(Path(r["path"]).exists() for r in summary["images"])
    seeds = {(r["prompt_index"], r["image_index"]): r["seed"] for r in summary["images"] if r["kind"] == "plain"}
    assert seeds == {(p, i): 42 + p * 1000 + i for p in range(2) for i in range(2)}  # the default seed, as lpo eval
    mean = summary["mean_lrm_score"]
    assert summary["lrm_score_gain"] == pytest.approx(mean["guided"] - mean["plain"])
    assert "gain" in result.output
    bad = CliRunner().invoke(app, ["sample", "--base", str(tiny_models_dir / "sdxl"), "--prompt", "x", "--out",
                                   str(tmp_path / "bad"), "--lrm", str(lrms["sd15"]), "--candidates", "2"])
    assert bad.exit_code == 2 and "latent spaces differ" in bad.output


def test_flow_calibration_options_train_end_to_end(tiny_models_dir, lrms, prompt_file, tmp_path):
    """The CPS step with `--beta-schedule kappa`, `--threshold-scale sigma` and `--detach-uncond` trains on SD3:
    each tuple's log-ratio scale is median(kappa) / kappa of its own step (looked up from the float32 timesteps the
    batch carries)."""
    config = _config("sd3", tiny_models_dir, lrms, prompt_file, tmp_path / "run", sampler="cps",
                     beta_schedule="kappa", threshold_scale="sigma", threshold=[0.0, 0.2], steps=4,
                     detach_uncond=True)
    model = load_generator(str(tiny_models_dir / "sd3"))
    model.use_sampler("cps")
    model.timesteps(4)
    scales = lpo_train.log_ratio_scales(model, config.resolved())
    timesteps, kappas = model.step_kappas(config.resolved().eta)
    assert list(scales) == timesteps and len(scales) == 3
    for t, kappa in zip(timesteps, kappas.tolist()):
        assert scales[t] == pytest.approx(kappas.median().item() / kappa)
    carried = torch.tensor(timesteps, dtype=torch.float32).flip(0)
    assert objectives.per_step(scales, carried).tolist() == pytest.approx(list(scales.values())[::-1], rel=1e-6)
    assert lpo_train.log_ratio_scales(model, dataclasses.replace(config, beta_schedule="constant")) is None
    summary = lpo_train.run(config)
    assert summary["tuples_trained"] > 0 and all(math.isfinite(r["loss"]) for r in summary["history"])
    saved = json.loads((tmp_path / "run" / lpo_train.CONFIG_FILE).read_text())
    assert (saved["sampler"], saved["beta_schedule"], saved["threshold_scale"]) == ("cps", "kappa", "sigma")


def test_grpo_group_filter_keeps_only_groups_whose_gap_passes(tiny_models_dir, lrms):
    model = load_generator(str(tiny_models_dir / "sd3"))
    lrm = LatentRewardModel.from_pretrained(lrms["sd3"])
    model.timesteps(4)
    cond = model.encode_prompts(PROMPTS[:2])
    thresholds = {t: 0.02 for t in model.step_stds(0.7)[0]}
    runs = {}
    for group_filter in (False, True):
        runs[group_filter] = sampler.rollout(model, cond, PROMPTS[:2], lrm,
                                             [torch.Generator().manual_seed(s) for s in (1, 2)], thresholds, steps=4,
                                             guidance=4.5, eta=0.7, k=3, objective="grpo", group_filter=group_filter)
    unfiltered, filtered = runs[False], runs[True]
    assert len(unfiltered) == 2 * len(thresholds)
    lpo = sampler.rollout(model, cond, PROMPTS[:2], lrm, [torch.Generator().manual_seed(s) for s in (1, 2)],
                          thresholds, steps=4, guidance=4.5, eta=0.7, k=3, objective="lpo")
    # the same trajectories and scores: GRPO's filtered groups are exactly LPO's passing pairs
    assert [(i, b) for i, b in zip(filtered.step_index, filtered.prompt_index)] == \
        [(i, b) for i, b in zip(lpo.step_index, lpo.prompt_index)]
    assert len(filtered) <= len(unfiltered) and len(filtered) == len(lpo)


@pytest.mark.parametrize("family, pixels", [("sd15", 128), ("sd3", 96), ("flux", 96)])
def test_sampling_at_another_resolution(family, pixels, tiny_models_dir):
    """`--resolution`: latents of side pixels / 8 (the tiny pipelines' VAEs downscale 8x; native 64 px), images of
    that side, and FLUX's grid shifted for its token count (the pipeline's own rule at that size)."""
    model = load_generator(str(tiny_models_dir / family))
    assert model.resolution == model.native_resolution == 64
    native_grid = model.timesteps(4)
    model.use_resolution(pixels)
    assert model.resolution == pixels and model.latent_shape[1:] == (pixels // 8, pixels // 8)
    latents = sampler.sample(model, model.encode_prompts(PROMPTS[:1]), [torch.Generator().manual_seed(0)], steps=2,
                             eta=0.0)["latents"]
    assert latents.shape[2:] == (pixels // 8, pixels // 8)
    assert model.decode(latents)[0].size == (pixels, pixels)
    grid = model.timesteps(4)
    if family == "flux":  # the dynamic shift grows with the image's tokens
        assert grid[1] > native_grid[1]
        from diffusers import FluxPipeline

        pipeline = FluxPipeline.from_pretrained(str(tiny_models_dir / "flux"))
        pipeline.set_progress_bar_config(disable=True)
        pipeline(PROMPTS[0], num_inference_steps=4, height=pixels, width=pixels, output_type="latent",
                 generator=torch.Generator().manual_seed(0))
        assert grid == pipeline.scheduler.timesteps.tolist()
    else:
        assert grid == native_grid


def test_resolutions_a_pipeline_cannot_sample_are_refused_before_loading(tiny_models_dir, lrms, prompt_file,
                                                                         tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["sample", "--base", str(tiny_models_dir / "sd3"), "--prompt", PROMPTS[0],
                                 "--out", str(tmp_path / "a"), "--resolution", "100"])
    assert result.exit_code == 2 and "multiples of 16" in result.output and not (tmp_path / "a").exists()
    result = runner.invoke(app, ["optimize", "sd3", "--base", str(tiny_models_dir / "sd3"), "--lrm",
                                 str(lrms["sd3"]), "--prompts", str(prompt_file), "--out", str(tmp_path / "b"),
                                 "--resolution", "272"])
    assert result.exit_code == 2 and "at most 256" in result.output and not (tmp_path / "b").exists()
    with pytest.raises(InputError, match="multiples of"):
        load_generator(str(tiny_models_dir / "sd15")).use_resolution(100)


def test_flow_thresholds_follow_the_resolution() -> None:
    """sd3 and flux default to SD1.5's thresholds at 512 px and SDXL's at 1024 (the nearest side's on a log scale);
    the UNet families keep their one range."""
    assert FAMILIES["sd3"].threshold_at(512) == [0.35, 0.5] and FAMILIES["flux"].threshold_at(1024) == [0.45, 0.6]
    assert FAMILIES["sd3"].threshold_at(768) == [0.45, 0.6] and FAMILIES["sd3"].threshold_at(64) == [0.35, 0.5]
    assert FAMILIES["sd15"].threshold_at(1024) == [0.35, 0.5] and FAMILIES["sdxl"].threshold_at(512) == [0.45, 0.6]
    assert LPOConfig(family="sd3").resolved().threshold is None  # chosen once the side is known


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_lora_alpha_is_saved_and_applied_by_diffusers_loader(family, tiny_models_dir, lrms, prompt_file, tmp_path):
    """With alpha = 2 x rank the LoRA's update is scaled by 2: the saved file carries the adapter's config, so
    `load_lora_weights` applies alpha 8 (without it, a loader would take alpha = rank and halve the update)."""
    out = tmp_path / "run"
    lpo_train.run(_config(family, tiny_models_dir, lrms, prompt_file, out, lora_alpha=8.0, validation_images=0))
    model = load_generator(str(tiny_models_dir / family))
    model.pipeline.load_lora_weights(str(out / "lora"))
    (adapter,) = model.denoiser.active_adapters()
    assert model.denoiser.peft_config[adapter].lora_alpha == 8 and model.denoiser.peft_config[adapter].r == 4
    scalings = [m.scaling[adapter] for m in model.denoiser.modules() if hasattr(m, "scaling") and adapter in m.scaling]
    assert scalings and all(s == pytest.approx(2.0) for s in scalings)


def test_flux_single_stream_lora_reaches_the_mlp_projections_not_the_output_head(tiny_models_dir, lrms,
                                                                                  prompt_file, tmp_path):
    out = tmp_path / "run"
    lpo_train.run(_config("flux", tiny_models_dir, lrms, prompt_file, out, lora_single_stream=True,
                          validation_images=0))
    saved = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    single = {k for k in saved if ".single_transformer_blocks." in k}
    assert any(".proj_mlp." in k for k in single) and any(".proj_out." in k for k in single)
    assert not any(k.startswith("transformer.proj_out.") for k in saved)  # the model's output head is not adapted
    model = load_generator(str(tiny_models_dir / "flux"))
    model.pipeline.load_lora_weights(str(out / "lora"))
    names = {name for name, _ in model.denoiser.named_modules()}
    assert any(n.startswith("single_transformer_blocks.") and n.endswith("proj_mlp.lora_A.default_0") for n in names)
    with pytest.raises(InputError, match="single-stream"):
        lpo_train.run(_config("sd3", tiny_models_dir, lrms, prompt_file, tmp_path / "x", lora_single_stream=True))


def test_detaching_the_unconditional_half_keeps_the_value_and_stops_its_gradient() -> None:
    from lpo.reward.backbones.base import classifier_free

    out = torch.randn(4, 3, requires_grad=True)
    for detach in (False, True):
        out.grad = None
        guided = classifier_free(out, 4.5, detach)
        torch.testing.assert_close(guided, out[:2] + 4.5 * (out[2:] - out[:2]))
        guided.sum().backward()
        assert torch.all(out.grad[:2] == (0.0 if detach else -3.5)) and torch.all(out.grad[2:] == 4.5)
