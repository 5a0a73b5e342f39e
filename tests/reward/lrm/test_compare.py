"""`lpo reward compare`: each LRM's accuracy per noise level equals `lpo reward eval` of that LRM alone; an image
metric's per-pair correctness equals a computation by hand (the same seeded noisy latents, diffusers' VAE decode,
the metric's score); a rerun scores only what is missing; bad input exits 2 before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from lpo.cli import app
from lpo.curate import ingest
from lpo.reward.lrm import accuracy, compare
from lpo.reward.lrm.config import RewardCompareConfig, RewardEvalConfig
from lpo.reward.toy.world import make_pickapic_table

SEED, LEVELS = 11, [1, 501, 951]


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("pairs")
    pq.write_table(make_pickapic_table(3, flip_rate=0.0, tie_rate=0.1, seed=9), base / "src.parquet")
    ingest.run(ingest.IngestConfig(source=str(base / "src.parquet"), out=base / "cur"))
    return base / "cur"


@pytest.fixture(scope="module")
def lrms(tiny_models_dir, tmp_path_factory) -> list[Path]:
    from lpo.reward.lrm.model import LatentRewardModel, export_components

    out = []
    for seed in (3, 4):
        directory = tmp_path_factory.mktemp(f"lrm{seed}")
        torch.manual_seed(seed)
        LatentRewardModel.from_base(str(tiny_models_dir / "sd15"), text_projection_init=None).save_pretrained(
            directory)
        export_components(directory, str(tiny_models_dir / "sd15"))
        out.append(directory)
    return out


def _compare(pairs_dir: Path, lrms: list[Path], out: Path, tiny_models_dir: Path, *extra: str):
    args = ["reward", "compare", "--manifest", str(pairs_dir / "pairs.parquet"), "--out", str(out),
            *(a for lrm in lrms for a in ("--lrm", str(lrm))), "--metrics", "clip", "--models-dir",
            str(tiny_models_dir), "--timesteps", ",".join(map(str, LEVELS)), "--seed", str(SEED), "--device", "cpu",
            "--batch-size", "5", *extra]
    return CliRunner().invoke(app, args)


def test_each_lrm_scores_as_reward_eval_alone_and_a_metric_as_by_hand(pairs_dir, lrms, tiny_models_dir,
                                                                      tmp_path) -> None:
    result = _compare(pairs_dir, lrms, tmp_path / "cmp", tiny_models_dir)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    names = list(summary["models"])
    assert names == [lrms[0].name, lrms[1].name, "clip"] and summary["pairs"] == 18
    for name, lrm in zip(names, lrms):
        alone = accuracy.run(RewardEvalConfig(lrm=lrm, manifest=pairs_dir / "pairs.parquet", out=tmp_path / name,
                                              timesteps=LEVELS, seed=SEED, batch_size=4, device="cpu"))
        got = {t: level["accuracy"] for t, level in summary["models"][name]["accuracy"].items()}
        assert got == alone["accuracy"]
        for level in summary["models"][name]["accuracy"].values():  # the interval holds the mean
            assert level["ci95"][0] <= level["accuracy"] <= level["ci95"][1] and level["captions"] == 3
    assert "0.5" in result.output or "0." in result.output  # the table is printed
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    per_pair = pl.read_parquet(tmp_path / "cmp" / "per_pair.parquet")
    assert per_pair.height == 3 * 3 * 18 and set(per_pair["model"]) == set(names)
    clip = per_pair.filter(pl.col("model") == "clip")
    assert clip["correct"].to_list() == _clip_by_hand(pairs_dir, lrms[0], tiny_models_dir,
                                                      tmp_path / "cmp" / "latent_cache")
    means = {str(t): float(np.mean(clip.filter(pl.col("timestep") == t)["correct"].to_numpy())) for t in LEVELS}
    assert {t: v["accuracy"] for t, v in summary["models"]["clip"]["accuracy"].items()} == pytest.approx(means)


def _clip_by_hand(pairs_dir: Path, lrm: Path, tiny_models_dir: Path, cache_root: Path) -> list[float]:
    """Per level, per pair: decode the pair's seeded noisy latents with diffusers' VAE and ask the clip scorer which
    image fits the caption better (a winner scored higher: 1; a tie: 0.5 whichever image scores higher)."""
    from diffusers import AutoencoderKL, DDPMScheduler

    from lpo.curate.scorers import load_scorer
    from lpo.reward.images import to_pil
    from lpo.reward.lrm.latents import LatentCache, cache_dir, vae_fingerprint

    config = json.loads((lrm / "config.json").read_text())
    vae = AutoencoderKL.from_pretrained(lrm / "vae").eval()
    scheduler = DDPMScheduler.from_pretrained(lrm / "scheduler")
    scorer = load_scorer("clip", str(tiny_models_dir / "clip"))
    cache = LatentCache(cache_dir(cache_root, vae_fingerprint(str(lrm), "vae"), config["resolution"]))
    pairs = accuracy.usable_pairs(pl.read_parquet(pairs_dir / "pairs.parquet"))
    scale = config["vae_scaling_factor"]
    out = []
    with torch.no_grad():
        for t in LEVELS:
            for index, row in enumerate(pairs.iter_rows(named=True)):
                mean, std = cache.get([row["image_0_uid"], row["image_1_uid"]])
                eps, noise = accuracy.pair_noise(SEED, t, index, tuple(mean.shape[1:]))
                noisy = scheduler.add_noise((mean + std * eps) * scale, noise, torch.tensor([t, t]))
                images = to_pil(vae.decode(noisy / scale).sample)
                s0, s1 = scorer.score(images, [row["caption"]] * 2)
                if row["is_tie"]:
                    out.append(0.5 if s0 != s1 else 0.0)
                else:
                    out.append(float((s0 > s1) if row["winner"] == 0 else (s1 > s0)))
    return out


def test_a_rerun_scores_only_the_missing_models_and_refuses_other_settings(pairs_dir, lrms, tiny_models_dir,
                                                                          tmp_path, monkeypatch) -> None:
    out = tmp_path / "cmp"
    assert _compare(pairs_dir, lrms[:1], out, tiny_models_dir).exit_code == 0
    scored = []
    real = compare._score_model
    monkeypatch.setattr(compare, "_score_model", lambda model, *a: scored.append(model["name"]) or real(model, *a))
    result = _compare(pairs_dir, lrms, out, tiny_models_dir)
    assert result.exit_code == 0, result.output
    assert scored == [lrms[1].name]  # the first LRM and clip were scored by the first run
    assert list(json.loads((out / "compare.json").read_text())["models"]) == [lrms[0].name, lrms[1].name, "clip"]
    other = _compare(pairs_dir, lrms, out, tiny_models_dir, "--seed", "12")
    assert other.exit_code == 2 and "other settings" in other.output
    assert scored == [lrms[1].name]


@pytest.mark.parametrize(("change", "needle"), [
    ({"metrics": ["geneval"]}, "benchmark record"),
    ({"lrms": []}, "at least one --lrm"),
    ({"family": "sd3"}, "another latent space"),
])
def test_bad_input_exits_2_before_any_model_loads(change, needle, pairs_dir, lrms, tiny_models_dir, tmp_path,
                                                  monkeypatch) -> None:
    from lpo.reward.lrm.model import LatentRewardModel

    monkeypatch.setattr(LatentRewardModel, "from_pretrained", lambda *a, **k: pytest.fail("a model loaded"))
    chosen = list(lrms)
    if change.get("family"):
        sd3 = tmp_path / "sd3-lrm"
        LatentRewardModel.from_base(str(tiny_models_dir / "sd3")).save_pretrained(sd3)
        chosen = [lrms[0], sd3]
    config = RewardCompareConfig(manifest=pairs_dir / "pairs.parquet", out=tmp_path / "out",
                                 lrms=change.get("lrms", chosen), metrics=change.get("metrics", ["clip"]),
                                 models_dir=tiny_models_dir)
    from lpo.core.errors import InputError

    with pytest.raises(InputError, match=needle):
        compare.run(config)
    assert not (tmp_path / "out").exists()


def test_a_flow_matching_lrm_compares_at_its_sigma_timesteps(pairs_dir, tiny_models_dir, tmp_path) -> None:
    from lpo.reward.lrm.model import LatentRewardModel, export_components

    lrm = tmp_path / "sd3-lrm"
    torch.manual_seed(0)
    LatentRewardModel.from_base(str(tiny_models_dir / "sd3")).save_pretrained(lrm)
    export_components(lrm, str(tiny_models_dir / "sd3"))
    result = compare.run(RewardCompareConfig(manifest=pairs_dir / "pairs.parquet", out=tmp_path / "cmp", lrms=[lrm],
                                             metrics=["clip"], models_dir=tiny_models_dir, seed=SEED, device="cpu"))
    alone = accuracy.run(RewardEvalConfig(lrm=lrm, manifest=pairs_dir / "pairs.parquet", out=tmp_path / "alone",
                                          seed=SEED, device="cpu"))
    assert {t: v["accuracy"] for t, v in result["models"][lrm.name]["accuracy"].items()} == alone["accuracy"]
    assert result["sigma"] == {t: round(float(t) / 1000, 6) for t in alone["accuracy"]}
    clip = pl.read_parquet(tmp_path / "cmp" / "per_pair.parquet").filter(pl.col("model") == "clip")
    assert clip.height == len(alone["accuracy"]) * 18 and set(clip["correct"]) <= {0.0, 0.5, 1.0}
