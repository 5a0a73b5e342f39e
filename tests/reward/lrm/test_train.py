"""`lpo reward train | eval | score` on the tiny SD1.5- and SDXL-style backbones."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lpo.cli import app
from lpo.core.errors import InputError
from lpo.curate import ingest
from lpo.reward import checkpoints
from lpo.reward.lrm import train
from lpo.reward.lrm.config import RewardTrainConfig
from lpo.reward.lrm.model import LatentRewardModel
from lpo.reward.toy.world import write_pickapic_parquet

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A curation directory's pairs.parquet (its images beside it): 8 prompts, 48 pairs, clean labels."""
    base = tmp_path_factory.mktemp("pairs")
    source = write_pickapic_parquet(base / "src.parquet", num_prompts=8, flip_rate=0.0, seed=21)
    ingest.run(ingest.IngestConfig(source=str(source), out=base / "cur"))
    return base / "cur" / "pairs.parquet"


def _config(manifest: Path, base: Path, out: Path, **kw) -> RewardTrainConfig:
    defaults = dict(manifest=manifest, base=str(base), out=out, batch_size=4, max_steps=4, warmup_steps=1, lr=1e-3,
                    eval_every=2, save_every=2, text_projection_init="", val_fraction=0.25, device="cpu")
    return RewardTrainConfig(**(defaults | kw))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_training_updates_the_model_and_exports_best_and_last(family, manifest, tiny_models_dir, tmp_path):
    out = tmp_path / "run"
    summary = train.run(_config(manifest, tiny_models_dir / family, out))
    assert summary["steps"] == 4 and summary["effective_batch_size"] == 4
    assert summary["validation_pairs"] > 0 and len(summary["history"]) == 2
    for accuracy in summary["history"][-1]["accuracy"].values():
        assert 0.0 <= accuracy <= 1.0
    trained = load_file(out / "last" / "diffusion_pytorch_model.safetensors")
    from diffusers import UNet2DConditionModel

    stock = UNet2DConditionModel.from_pretrained(str(tiny_models_dir / family), subfolder="unet").state_dict()
    changed = [k for k, v in stock.items()
               if f"backbone.unet.{k}" in trained and not torch.equal(v, trained[f"backbone.unet.{k}"])]
    assert len(changed) > len(stock) // 4  # the UNet is trained, not frozen
    assert all(torch.isfinite(v).all() for v in trained.values())
    for export in ("best", "last"):
        model = LatentRewardModel.from_pretrained(out / export)
        assert (out / export / "vae" / "config.json").exists() and (out / export / "scheduler").is_dir()
        assert model.config.family == family
    state = json.loads((out / "train_summary.json").read_text())
    assert state["best_step"] in (2, 4)
    cache = list((out / "latent_cache").rglob("part-*.safetensors"))
    assert cache  # latents were cached once, on disk


def test_best_is_the_argmax_at_the_selection_level_and_holds_that_checkpoints_weights(manifest, tiny_models_dir,
                                                                                      tmp_path, monkeypatch):
    """Validation accuracies scripted per update: at the selection level (t=501 here) the best is update 3, at
    t=1 update 6 (the last). best_step is 3 and best/ holds the weights the model had at update 3, not the last."""

    scripted = {501: [0.5, 0.6, 0.8, 0.7, 0.75, 0.6], 1: [0.5, 0.55, 0.6, 0.7, 0.8, 0.9]}
    weights = []

    def validation(model, cache, pairs, noise, timesteps, **kwargs):
        weights.append({k: v.detach().clone() for k, v in getattr(model, "module", model).state_dict().items()})
        return {t: scripted[int(t)][len(weights) - 1] for t in timesteps}

    monkeypatch.setattr(train, "accuracy_per_timestep", validation)
    out = tmp_path / "run"
    summary = train.run(_config(manifest, tiny_models_dir / "sd15", out, max_steps=6, eval_every=1, save_every=3,
                                eval_timesteps=[1, 501], select_timestep=501))
    assert [r["step"] for r in summary["history"]] == [1, 2, 3, 4, 5, 6]
    assert summary["best_step"] == 3 and summary["best_accuracy"] == 0.8
    best = LatentRewardModel.from_pretrained(out / "best").state_dict()
    last = LatentRewardModel.from_pretrained(out / "last").state_dict()
    assert set(best) == set(weights[2])
    assert all(torch.equal(best[k], weights[2][k]) for k in best)
    assert not all(torch.equal(best[k], last[k]) for k in best)  # the best is not simply the last


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_an_update_under_bf16_autocast_on_the_cpu(family, manifest, tiny_models_dir, tmp_path,
                                                 fresh_accelerator_state):
    """`--mixed-precision bf16` on a CPU: both updates run under autocast with finite losses and export."""
    out = tmp_path / "run"
    summary = train.run(_config(manifest, tiny_models_dir / family, out, max_steps=2, eval_every=2, save_every=2,
                                mixed_precision="bf16"))
    logged = checkpoints.read_metrics(out)
    assert summary["steps"] == 2 and [r["update"] for r in logged] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in logged)
    assert LatentRewardModel.from_pretrained(out / "last").config.family == family


def test_resume_continues_the_same_run(manifest, tiny_models_dir, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train.run(_config(manifest, tiny_models_dir / "sd15", straight, max_steps=4))
    split = tmp_path / "split"
    real_save = checkpoints.save

    def killed_after_first_checkpoint(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(checkpoints, "save", killed_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train.run(_config(manifest, tiny_models_dir / "sd15", split, max_steps=4))
    monkeypatch.setattr(checkpoints, "save", real_save)
    assert train.latest_checkpoint(split).name == "step-2" and not (split / "last").exists()
    encoded_before = sorted(p.name for p in (split / "latent_cache").rglob("part-*"))
    train.run(_config(manifest, tiny_models_dir / "sd15", split, max_steps=4, resume=True))
    assert sorted(p.name for p in (split / "latent_cache").rglob("part-*")) == encoded_before  # no re-encoding
    weights = "diffusion_pytorch_model.safetensors"
    a, b = load_file(straight / "last" / weights), load_file(split / "last" / weights)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # the metrics log continues across the resume: one line per update, as the uninterrupted run's
    logged, expected = checkpoints.read_metrics(split), checkpoints.read_metrics(straight)
    assert [r["update"] for r in logged] == [1, 2, 3, 4]
    assert [r["lr"] for r in logged] == [r["lr"] for r in expected]
    assert [r["loss"] for r in logged] == pytest.approx([r["loss"] for r in expected], rel=1e-5)


def test_nan_loss_stops_with_the_last_checkpoint_intact(manifest, tiny_models_dir, tmp_path, monkeypatch):
    from lpo.reward.lrm import loss as lrm_loss

    real = lrm_loss.bradley_terry_loss
    calls = {"n": 0}

    def explodes_on_third_update(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(train, "bradley_terry_loss", explodes_on_third_update)
    out = tmp_path / "nan"
    with pytest.raises(train.TrainingDiverged, match="intact"):
        train.run(_config(manifest, tiny_models_dir / "sd15", out, max_steps=5, save_every=1, eval_every=100))
    checkpoint = train.latest_checkpoint(out)
    assert checkpoint.name == "step-2"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 2
    weights = load_file(next(checkpoint.glob("*.safetensors")))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_bad_inputs_are_input_errors(manifest, tiny_models_dir, tmp_path):
    unlabelled = tmp_path / "cur" / "pairs.parquet"
    unlabelled.parent.mkdir()
    (tmp_path / "cur" / "images").mkdir()
    pl.read_parquet(manifest).with_columns(pl.lit(None, pl.Int8).alias("winner"), pl.lit(False).alias("is_tie")) \
        .write_parquet(unlabelled)
    with pytest.raises(InputError, match="no kept pairs"):
        train.run(_config(unlabelled, tiny_models_dir / "sd15", tmp_path / "a"))
    with pytest.raises(InputError, match="not a readable parquet file"):
        train.run(_config(tiny_models_dir / "sd15" / "model_index.json", tiny_models_dir / "sd15", tmp_path / "b"))
    with pytest.raises(InputError, match="unet/config.json"):
        train.run(_config(manifest, tiny_models_dir / "pickscore", tmp_path / "c"))
    with pytest.raises(InputError, match="--init 'scratch' is not diffusion or random"):
        train.run(_config(manifest, tiny_models_dir / "sd15", tmp_path / "e", init="scratch"))
    # offline, the default CLIP that initialises the SD1.x text projection is unreachable: say which flag to use,
    # before any image is encoded
    with pytest.raises(InputError, match="--text-projection-init ''"):
        train.run(_config(manifest, tiny_models_dir / "sd15", tmp_path / "f",
                          text_projection_init="openai/clip-vit-large-patch14"))
    assert not (tmp_path / "f").exists()
    with pytest.MonkeyPatch.context() as patch:  # as `accelerate launch --gradient_accumulation_steps 4` sets it
        patch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
        with pytest.raises(InputError, match="gradient accumulation to 4, but this run's is 1"):
            train.run(_config(manifest, tiny_models_dir / "sd15", tmp_path / "g"))
    assert not (tmp_path / "g" / "latent_cache").exists()  # refused before anything was encoded
    out = tmp_path / "d"
    train.run(_config(manifest, tiny_models_dir / "sd15", out, max_steps=2))
    with pytest.raises(InputError, match="already holds checkpoints"):
        train.run(_config(manifest, tiny_models_dir / "sd15", out, max_steps=2))
    with pytest.raises(InputError, match=r"different \['batch_size'\]"):
        train.run(_config(manifest, tiny_models_dir / "sd15", out, max_steps=3, batch_size=2, resume=True))


@pytest.mark.slow  # several processes (or a server) started: in the full run, not the quick loop
def test_two_process_training_follows_the_one_process_schedule(manifest, tiny_models_dir, tmp_path):
    """The learning rate of update k is the same with 1 or 2 processes and with gradient accumulation (accelerate
    would step a prepared schedule once per process: twice per update here)."""
    settings = {"batch_size": 2, "max_steps": 4, "warmup_steps": 2, "eval_every": 4, "save_every": 4, "lr": 1e-3}
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lpo", "reward", "train", "--manifest", str(manifest), "--base", str(tiny_models_dir / "sd15"),
           "--out", str(out), "--text-projection-init", "", "--device", "cpu"]
    cmd += [arg for key, value in settings.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "effective batch 4 pairs" in result.stderr  # 2 pairs x 1 accumulation x 2 processes
    assert LatentRewardModel.from_pretrained(out / "last").config.family == "sd15"
    assert (out / "checkpoints" / "step-4").is_dir()
    one = tmp_path / "one"
    train.run(_config(manifest, tiny_models_dir / "sd15", one, **(settings | {"grad_accum": 2})))
    two_processes, accumulated = checkpoints.read_metrics(out), checkpoints.read_metrics(one)
    expected = [1e-3 * f for f in (0.5, 1.0, 1.0, 0.5)]  # warmup 2, then linear decay to 0 at update 4
    assert [r["lr"] for r in two_processes] == pytest.approx(expected, rel=1e-12)
    assert [r["lr"] for r in accumulated] == pytest.approx(expected, rel=1e-12)
    assert [r["update"] for r in two_processes] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and 0 <= r["train_accuracy"] <= 1 for r in two_processes)


def test_eval_and_score_commands(manifest, tiny_models_dir, tmp_path):
    out = tmp_path / "run"
    train.run(_config(manifest, tiny_models_dir / "sd15", out, max_steps=2))
    runner = CliRunner()
    # the run directory stands for its best/ model
    result = runner.invoke(app, ["reward", "eval", "--lrm", str(out), "--manifest", str(manifest),
                                 "--out", str(tmp_path / "eval"), "--timesteps", "1,501,951"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "accuracy.json").read_text())
    assert list(report["accuracy"]) == ["1", "501", "951"] and report["pairs"] == pl.read_parquet(manifest).filter(
        pl.col("winner").is_not_null() | pl.col("is_tie")).height
    again = runner.invoke(app, ["reward", "eval", "--lrm", str(out / "best"), "--manifest", str(manifest),
                                "--out", str(tmp_path / "eval2"), "--timesteps", "1,501,951"])
    assert again.exit_code == 0
    assert json.loads((tmp_path / "eval2" / "accuracy.json").read_text())["accuracy"] == report["accuracy"]  # seeded
    assert (tmp_path / "eval" / "accuracy.png").stat().st_size > 0

    images = pl.concat([pl.read_parquet(p) for p in ingest.image_parts(manifest.parent)]).head(2)
    paths = []
    for i, data in enumerate(images["image"]):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(data)
    args = ["reward", "score", "--lrm", str(out / "best"), "--prompt", images["caption"][0], "--t", "1"]
    for path in paths:
        args += ["--images", str(path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    # recomputed with diffusers' own pieces: the exported VAE's posterior sample (seed 0), its scaling factor, the
    # exported scheduler's add_noise at t=1 with the same generator's next draw, then the LRM on those latents
    from diffusers import AutoencoderKL, DDPMScheduler
    from PIL import Image
    from torchvision.transforms import functional as TF

    model = LatentRewardModel.from_pretrained(out / "best")
    vae = AutoencoderKL.from_pretrained(out / "best" / "vae").eval()  # not subfolder=: the root holds weights too
    scheduler = DDPMScheduler.from_pretrained(out / "best" / "scheduler")
    side = model.config.resolution
    pixels = torch.stack([TF.to_tensor(Image.open(p).convert("RGB").resize((side, side), Image.BILINEAR)) * 2 - 1
                          for p in paths])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(generator=generator) * vae.config.scaling_factor
        steps = torch.tensor([1, 1])
        noisy = scheduler.add_noise(latents, torch.randn(latents.shape, generator=generator), steps)
        expected = model.score(noisy, steps, [images["caption"][0]] * 2)
    assert [line["score"] for line in lines] == pytest.approx(expected.tolist(), abs=1e-5)
    assert len({round(line["score"], 4) for line in lines}) == 2  # two images, two scores
    bad = runner.invoke(app, ["reward", "score", "--lrm", str(out / "best"), "--images", str(paths[0]),
                              "--images", str(paths[1]), "--prompt", "a", "--prompt", "b", "--prompt", "c"])
    assert bad.exit_code == 2 and "2 images but 3 prompts" in bad.output


def test_val_manifest_from_another_curation_dir_is_encoded_from_there(manifest, tiny_models_dir, tmp_path, caplog):
    """Each manifest's images come from its own curation directory; none is reported missing."""
    source = write_pickapic_parquet(tmp_path / "val.parquet", num_prompts=2, flip_rate=0.0, seed=99)
    ingest.run(ingest.IngestConfig(source=str(source), out=tmp_path / "val"))
    with caplog.at_level("WARNING", logger="lpo.reward.lrm.latents"):
        summary = train.run(_config(manifest, tiny_models_dir / "sd15", tmp_path / "run", max_steps=2,
                                    val_manifest=tmp_path / "val" / "pairs.parquet"))
    assert "could not be encoded" not in caplog.text
    assert summary["validation_pairs"] == 12 and summary["skipped_images"] == 0


def test_runs_sharing_a_latent_cache_encode_each_image_once(manifest, tiny_models_dir, tmp_path, caplog):
    shared = tmp_path / "latents"
    with caplog.at_level("INFO", logger="lpo.reward.lrm.latents"):
        train.run(_config(manifest, tiny_models_dir / "sd15", tmp_path / "a", max_steps=1, latent_cache=shared))
        assert "encoding" in caplog.text
        parts = sorted(p.name for p in shared.rglob("part-*"))
        caplog.clear()
        train.run(_config(manifest, tiny_models_dir / "sd15", tmp_path / "b", max_steps=1, latent_cache=shared,
                          init="random"))
    assert "encoding" not in caplog.text  # the second run (another init, same VAE) reads what the first encoded
    assert sorted(p.name for p in shared.rglob("part-*")) == parts
    assert not (tmp_path / "b" / "latent_cache").exists()


@pytest.mark.slow  # train + eval + score commands per flow family: in the full run, not the quick loop
@pytest.mark.parametrize(("family", "least_noisy", "not_built"), [
    ("sd3", 8.9, "transformer_blocks.3."),  # the default depth: 3 of the tiny SD3's 4 joint blocks
    ("flux", 76.9, "single_transformer_blocks."),  # FLUX: the double-stream blocks only; sigma 1/20, shifted
])
def test_flow_lrm_trains_on_the_sampler_grid_and_reports_accuracy_against_sigma(family, least_noisy, not_built,
                                                                                 manifest, tiny_models_dir, tmp_path):
    """On a flow-matching base the LRM trains on the timesteps (sigma x 1000) of the 20-step sampler grid (FLUX's:
    linear sigmas shifted by the token count); `lpo reward eval` and `lpo reward score` use that grid by default and
    report sigma."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    from lpo.reward.backbones.flow import lrm_timesteps

    base = tiny_models_dir / family
    out = tmp_path / "run"
    summary = train.run(_config(manifest, base, out, max_steps=2))
    saved = json.loads((out / "train_config.json").read_text())
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
    grid, evaluation = lrm_timesteps(scheduler, 16, linear_sigmas=family == "flux")
    assert [float(t) for t in summary["history"][-1]["accuracy"]] == evaluation
    assert evaluation[0] == pytest.approx(least_noisy, abs=0.1) and evaluation[-1] == 1000.0
    assert saved["timesteps"] == grid and saved["select_timestep"] == evaluation[0]
    trained = load_file(out / "last" / "diffusion_pytorch_model.safetensors")
    class_name = json.loads((base / "transformer" / "config.json").read_text())["_class_name"]
    transformer_class = getattr(diffusers, class_name)
    stock = transformer_class.from_pretrained(str(base), subfolder="transformer").state_dict()
    changed = [k for k, v in stock.items() if f"backbone.transformer.{k}" in trained
               and not torch.equal(v, trained[f"backbone.transformer.{k}"])]
    assert len(changed) > len(stock) // 4
    assert not any(k.startswith(f"backbone.transformer.{not_built}") for k in trained)
    runner = CliRunner()
    result = runner.invoke(app, ["reward", "eval", "--lrm", str(out), "--manifest", str(manifest), "--out",
                                 str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "accuracy.json").read_text())
    assert [float(t) for t in report["accuracy"]] == evaluation
    assert [float(s) for s in report["accuracy_by_sigma"]] == pytest.approx([t / 1000 for t in evaluation])
    images = pl.concat([pl.read_parquet(p) for p in ingest.image_parts(manifest.parent)]).head(1)
    (tmp_path / "0.png").write_bytes(images["image"][0])
    scored = runner.invoke(app, ["reward", "score", "--lrm", str(out), "--images", str(tmp_path / "0.png"),
                                 "--prompt", images["caption"][0]])
    assert scored.exit_code == 0, scored.output
    line = scored.output.strip().splitlines()[-1]  # stdout's JSON line, after stderr's progress bars
    assert json.loads(line[line.index("{"):])["t"] == evaluation[0]
    bad = runner.invoke(app, ["reward", "train", "--manifest", str(manifest), "--base", str(base), "--out",
                              str(tmp_path / "bad"), "--timesteps", "0,500", "--text-projection-init", ""])
    assert bad.exit_code == 2 and "in (0, 1000]" in bad.output
    deep = runner.invoke(app, ["reward", "train", "--manifest", str(manifest), "--base", str(base), "--out",
                               str(tmp_path / "bad3"), "--depth", "9", "--text-projection-init", ""])
    assert deep.exit_code == 2 and "--depth 9" in deep.output and not (tmp_path / "bad3").exists()
    unet = runner.invoke(app, ["reward", "train", "--manifest", str(manifest), "--base",
                               str(tiny_models_dir / "sd15"), "--out", str(tmp_path / "bad2"), "--depth", "3"])
    assert unet.exit_code == 2 and "--depth" in unet.output


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_an_lrm_trained_at_another_resolution_reads_and_scores_at_it(family, manifest, tiny_models_dir, tmp_path):
    """`--resolution 96` on pipelines of 64 px: the latent cache is made at 96 px (12x12 latents), the saved LRM
    reads that side (SDXL's size conditioning says 96; FLUX's grid is shifted for its 36 tokens, as the pipeline's
    rule gives), scores images at it, and a side the pipeline cannot take is refused before anything loads."""
    from lpo.reward.backbones import load_generator

    out = tmp_path / "run"
    train.run(_config(manifest, tiny_models_dir / family, out, resolution=96, max_steps=2, eval_every=2,
                      save_every=2))
    caches = [json.loads(p.read_text()) for p in (out / "latent_cache").glob("vae-*/cache.json")]
    assert [c["resolution"] for c in caches] == [96]
    model = LatentRewardModel.from_pretrained(out / "last")
    assert model.config.resolution == 96 and list(model.config.latent_shape)[1:] == [12, 12]
    assert model.backbone.resolution == 96
    from PIL import Image

    scores = model.score_images([Image.new("RGB", (50, 70), (200, 30, 30))] * 2, ["a red circle"] * 2)
    assert torch.isfinite(torch.as_tensor(scores)).all()
    if family == "flux":  # the LRM's training grid is the 20-step sampler's at 96 px, not at 64
        generator = load_generator(str(tiny_models_dir / "flux"))
        native = sorted(generator.timesteps(20))[-2]
        generator.use_resolution(96)
        at_96 = sorted(generator.timesteps(20))[-2]
        trained = sorted(json.loads((out / train.CONFIG_FILE).read_text())["timesteps"])[-2]
        assert trained == pytest.approx(at_96, abs=1e-3) and abs(trained - native) > 0.05  # 16 vs 36 tokens
    with pytest.raises(InputError, match="multiples of"):
        train.run(_config(manifest, tiny_models_dir / family, tmp_path / "bad", resolution=100))
    assert not (tmp_path / "bad").exists()
