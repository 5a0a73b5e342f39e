"""Pre-flight: the first round's rollout checked before any update, on every family's tiny pipeline; the
half-precision fault (latents stored in float16, so the ratio starts away from 1) stops the run with exit code 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lpo.cli import app
from lpo.core.errors import InputError
from lpo.reward.lpo import train as lpo_train
from lpo.reward.lpo.config import LPOConfig
from lpo.reward.lpo.preflight import RATIO_TOLERANCE


def _config(family, tiny, lrms, prompts, out, **kw) -> LPOConfig:
    settings = dict(family=family, base=str(tiny / family), lrm=lrms[family], prompts=prompts, out=out, epochs=1,
                    sample_batch_size=2, train_batch_size=4, candidates=2, steps=3, threshold=[0.0, 0.0],
                    lora_rank=4, lr=1e-3, device="cpu", validation_images=0)
    return LPOConfig(**(settings | kw))


def _values(summary: dict) -> dict[str, str]:
    return {check["name"]: check["value"] for check in summary["preflight"]}


@pytest.mark.parametrize(("family", "objective"), [("sd15", "lpo"), ("sdxl", "grpo"), ("sd3", "lpo"),
                                                   ("flux", "grpo")])
def test_preflight_passes_on_every_family_and_trains_nothing(family, objective, tiny_models_dir, lrms, prompt_file,
                                                             tmp_path) -> None:
    out = tmp_path / "run"
    summary = lpo_train.run(_config(family, tiny_models_dir, lrms, prompt_file, out, objective=objective,
                                    preflight=True))
    values = _values(summary)
    assert summary["rounds"] == 0 and not (out / "lora").exists() and not (out / "checkpoints").exists()
    ratio = float(values["on-policy ratio"].split("|log ratio| ")[1].split(" ")[0])
    assert ratio < RATIO_TOLERANCE  # the training forward reproduces the sampling step before any update
    stored = dict(part.split(" ") for part in values["stored dtypes"].split(", "))
    assert set(stored.values()) == {"float32"} and "x_t" in stored
    assert "%" in values["LoRA reach"] and "rounds: about" in values["time"]
    assert values["steps passing the threshold" if objective == "lpo" else "groups per step"].startswith("per step")


def _half_precision_rollout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fault: the rollout keeps its latents in float16 (as a run that stores them to save memory would)."""
    original = lpo_train.Run._rollout

    def rollout(self, *args, **kwargs):
        items, record = original(self, *args, **kwargs)
        return [item | {"x_t": item["x_t"].half()} for item in items], record

    monkeypatch.setattr(lpo_train.Run, "_rollout", rollout)


def test_latents_kept_in_half_precision_stop_the_run_before_any_update(tiny_models_dir, lrms, prompt_file, tmp_path,
                                                                       monkeypatch) -> None:
    _half_precision_rollout(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(InputError) as raised:
        lpo_train.run(_config("sd15", tiny_models_dir, lrms, prompt_file, out))
    message = str(raised.value)
    assert "pre-flight failed" in message and "x_t float16" in message and "Keep the rollout's latents" in message
    ratio = float(message.split("max |log ratio| ")[1].split(" ")[0])
    assert ratio > 100 * RATIO_TOLERANCE  # the ratio check sees the fault too
    assert not (out / "checkpoints").exists() and not (out / "lora").exists()
    # through the command line: exit code 2, and --no-preflight trains (the fault stays; the check was skipped)
    args = ["optimize", "sd15", "--base", str(tiny_models_dir / "sd15"), "--lrm", str(lrms["sd15"]), "--prompts",
            str(prompt_file), "--epochs", "1", "--candidates", "2", "--steps", "3", "--threshold", "0,0",
            "--device", "cpu", "--validation-images", "0"]
    refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "cli")])
    assert refused.exit_code == 2 and "pre-flight failed" in refused.output
    trained = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "skip"), "--no-preflight"])
    assert trained.exit_code == 0, trained.output
    assert json.loads((tmp_path / "skip" / "lpo_summary.json").read_text())["round"] == 1  # 3 prompts, 5 a round


def test_preflight_alone_prints_its_checks_and_the_real_run_follows(tiny_models_dir, lrms, prompt_file,
                                                                   tmp_path) -> None:
    args = ["optimize", "sd15", "--base", str(tiny_models_dir / "sd15"), "--lrm", str(lrms["sd15"]), "--prompts",
            str(prompt_file), "--epochs", "1", "--candidates", "2", "--steps", "3", "--threshold", "0,0",
            "--device", "cpu", "--validation-images", "0", "--out", str(tmp_path / "run")]
    checked = CliRunner().invoke(app, [*args, "--preflight"], env={"COLUMNS": "200"})
    assert checked.exit_code == 0, checked.output
    assert "pre-flight of LPO (sd15): passed, nothing trained" in checked.output
    assert "on-policy ratio" in checked.output
    trained = CliRunner().invoke(app, args)
    assert trained.exit_code == 0, trained.output


def test_a_threshold_no_pair_passes_fails_the_preflight(tiny_models_dir, lrms, prompt_file, tmp_path) -> None:
    with pytest.raises(InputError, match="no step of the first round produced an item to train on: lower --threshold"):
        lpo_train.run(_config("sd15", tiny_models_dir, lrms, prompt_file, tmp_path / "run", threshold=[0.999, 0.999]))


def test_the_ratio_check_compares_per_latent_element_under_either_reduction(tiny_models_dir, lrms, prompt_file,
                                                                           tmp_path) -> None:
    summary = lpo_train.run(_config("sd15", tiny_models_dir, lrms, prompt_file, tmp_path / "run", preflight=True,
                                    logprob_reduction="sum"))
    assert float(_values(summary)["on-policy ratio"].split("|log ratio| ")[1].split(" ")[0]) < RATIO_TOLERANCE
