"""Bad input stops with exit code 2 and a message naming the option and the fix, before any model loads: values
that would train wrongly without an error, a YAML `--config` with a wrong value, a config file that gives the
required options, and the rejected pairs passed as training data."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lpo.cli import app
from lpo.reward.lrm import train as lrm_train
from lpo.reward.lrm.config import RewardTrainConfig

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "manifests" / "sample" / "pickapic_sample.parquet"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})


@pytest.fixture(scope="module")
def curated(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bad_input") / "sample"
    result = invoke("curate", "filter", SAMPLE, "--out", out, "--models-dir", tiny_models_dir, "--metrics",
                    "pickscore,clip", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize(("extra", "message"), [
    (["--lr", "-1e-5"], "--lr -1e-05 must be > 0"),
    (["--warmup-steps", "-3"], "--warmup-steps -3 must be >= 0"),
    (["--eval-every", "0"], "--eval-every 0 must be >= 1"),
    (["--mixed-precision", "fp8"], "--mixed-precision fp8 is not one of auto, no, fp16, bf16"),
])
def test_lrm_training_refuses_values_that_would_train_wrongly(curated: Path, tiny_models_dir: Path, tmp_path: Path,
                                                              extra: list[str], message: str) -> None:
    result = invoke("reward", "train", "--manifest", curated / "filtered.parquet", "--base", tiny_models_dir / "sd15",
                    "--out", tmp_path / "lrm", *extra)
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "lrm").exists()


def test_the_rejected_pairs_are_not_training_data(curated: Path, tiny_models_dir: Path, tmp_path: Path) -> None:
    result = invoke("reward", "train", "--manifest", curated / "rejected.parquet", "--base", tiny_models_dir / "sd15",
                    "--out", tmp_path / "lrm")
    assert result.exit_code == 2 and "filtered.parquet beside it" in " ".join(result.output.split())


def test_a_warmup_longer_than_the_run_is_said(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        lrm_train._check_ranges(RewardTrainConfig(max_steps=5, warmup_steps=500, lr=1e-5))
    assert "--warmup-steps 500 exceeds --max-steps 5: the run ends at lr 1e-07" in caplog.text


@pytest.mark.parametrize(("extra", "message"), [
    (["--lr", "-1"], "--lr -1.0 must be > 0"), (["--mixed-precision", "bf17"], "--mixed-precision bf17"),
])
def test_lpo_refuses_values_that_would_train_wrongly(tiny_models_dir: Path, tmp_path: Path, extra: list[str],
                                                     message: str) -> None:
    from lpo.reward.lrm.model import LatentRewardModel, export_components

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    lrm = tmp_path / "lrm"
    LatentRewardModel.from_base(str(tiny_models_dir / "sd15"), text_projection_init=None).save_pretrained(lrm)
    export_components(lrm, str(tiny_models_dir / "sd15"))
    result = invoke("optimize", "sd15", "--base", tiny_models_dir / "sd15", "--lrm", lrm, "--prompts", prompts,
                    "--out", tmp_path / "run", *extra)
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "run").exists()


def test_a_config_file_gives_the_required_options_and_names_a_wrong_value(curated: Path, tiny_models_dir: Path,
                                                                          tmp_path: Path) -> None:
    config = tmp_path / "lrm.yaml"
    config.write_text(f"manifest: {curated / 'filtered.parquet'}\nbase: {tiny_models_dir / 'sd15'}\n"
                      f"out: {tmp_path / 'lrm'}\nmax-steps: 5\nwarmup-steps: 1\ndry-run: true\n"
                      "text-projection-init: ''\n")
    planned = invoke("reward", "train", "--config", config)
    assert planned.exit_code == 0, planned.output  # the plan, from the file's options alone
    config.write_text(config.read_text().replace("max-steps: 5", "max-steps: five"))
    wrong = invoke("reward", "train", "--config", config)
    assert wrong.exit_code == 2 and "max-steps: 'five' is not an integer" in " ".join(wrong.output.split())
    missing = invoke("reward", "train", "--base", tiny_models_dir / "sd15")
    assert missing.exit_code == 2 and "missing --manifest, --out" in " ".join(missing.output.split())


@pytest.mark.slow  # two commands in processes of their own, as a batch job runs them
def test_a_batch_log_keeps_the_progress(tiny_models_dir: Path, tmp_path: Path) -> None:
    """With stdout and stderr going to a file (a cluster job's log) scoring, latent encoding and LRM training each
    leave plain progress lines: items done of the total, the rate and the time left."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "job.log"
    with open(log, "w") as out:
        for args in (["curate", "filter", str(SAMPLE), "--out", str(tmp_path / "cur"), "--models-dir",
                      str(tiny_models_dir), "--metrics", "pickscore,clip", "--device", "cpu"],
                     ["reward", "train", "--manifest", str(tmp_path / "cur" / "filtered.parquet"), "--base",
                      str(tiny_models_dir / "sd15"), "--out", str(tmp_path / "lrm"), "--max-steps", "3",
                      "--warmup-steps", "1", "--batch-size", "2", "--eval-every", "3", "--save-every", "3",
                      "--text-projection-init", "", "--device", "cpu"]):
            done = subprocess.run([sys.executable, "-m", "lpo", *args], stdout=out, stderr=subprocess.STDOUT, env=env,
                                  timeout=600)
            assert done.returncode == 0, log.read_text()[-3000:]
    text = log.read_text()
    for line in ("pickscore (rank 0): 0/", "VAE latents (process 0): 0/", "LRM: 0/3 updates", "LRM: 3/3 updates"):
        assert line in text, (line, text[-3000:])
    assert "/s, " in text and " left)" in text
