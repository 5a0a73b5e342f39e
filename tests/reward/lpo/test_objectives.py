"""The objectives as records: the trainer has no branch on the objective, each record's fields are what the rollout
produces, its accounting is the method's, and a diverging loss of either objective stops the run with exit code 1
(a run failure, not bad input) and the last checkpoint intact."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lpo.cli import app
from lpo.core.errors import InputError, RunFailed, TrainingDiverged
from lpo.curate.prompts import read_prompts
from lpo.reward import checkpoints
from lpo.reward.lpo import objectives
from lpo.reward.lpo import train as lpo_train
from lpo.reward.lpo.config import LPOConfig
from lpo.reward.lpo.sampler import Rollout

REPO = Path(__file__).resolve().parents[3]


def test_the_trainer_never_asks_which_objective_it_trains() -> None:
    tree = ast.parse((REPO / "reward" / "lpo" / "train.py").read_text())
    compared = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Compare)
                for part in (node.left, *node.comparators)
                if isinstance(part, ast.Constant) and part.value in objectives.OBJECTIVES]
    assert not compared, f"train.py compares with an objective's name at lines {compared}"


def test_each_objective_reads_fields_the_rollout_produces_and_counts_its_forwards() -> None:
    rollout_fields = {field.name for field in dataclasses.fields(Rollout)}
    assert set(objectives.OBJECTIVES) == {"lpo", "grpo"}
    for objective in objectives.OBJECTIVES.values():
        assert set(objective.fields) <= rollout_fields, objective.name
        assert objective.shared in objective.logged and "loss" in objective.logged
    lpo, grpo = objectives.OBJECTIVES["lpo"], objectives.OBJECTIVES["grpo"]
    assert lpo.forwards(LPOConfig()) == 2  # the policy's and the reference's
    assert grpo.forwards(LPOConfig(objective="grpo")) == 2  # the reference only for the KL term
    assert grpo.forwards(LPOConfig(objective="grpo", grpo_kl=0.0)) == 1
    grpo.check(LPOConfig(objective="grpo"))
    with pytest.raises(InputError, match="--logprob-reduction sum cannot train GRPO"):
        grpo.check(LPOConfig(objective="grpo", logprob_reduction="sum"))
    lpo.check(LPOConfig(logprob_reduction="sum"))  # LPO rescales beta by the element count


def test_grpo_round_summary_gathers_every_chunk() -> None:
    chunks = [{"ratio_deviation": torch.tensor([0.0, 0.5])}, {"ratio_deviation": torch.tensor([1.0, 2.0])}]
    summary = objectives.OBJECTIVES["grpo"].summary(chunks, lambda tensor: torch.cat([tensor, tensor]))
    assert summary["ratio_deviation_max"] == 2.0
    assert summary["ratio_deviation_p50"] == pytest.approx(torch.tensor([0.0, 0.5, 1.0, 2.0] * 2).median().item(),
                                                           abs=0.5)
    assert objectives.OBJECTIVES["lpo"].summary(chunks, lambda tensor: tensor) == {}


@pytest.mark.parametrize("objective", ["lpo", "grpo"])
def test_a_diverging_loss_stops_with_code_1_and_the_checkpoint_intact(objective, tiny_models_dir, lrms, prompt_file,
                                                                      tmp_path, monkeypatch):
    record = objectives.OBJECTIVES[objective]
    real, real_save = type(record).losses, checkpoints.save
    saved = []

    def save(*args, **kwargs):
        saved.append(real_save(*args, **kwargs))

    def explodes_after_the_first_checkpoint(self, *args, **kwargs):
        losses = real(self, *args, **kwargs)
        return {**losses, "loss": losses["loss"] * float("nan")} if saved else losses

    monkeypatch.setattr(checkpoints, "save", save)
    monkeypatch.setattr(type(record), "losses", explodes_after_the_first_checkpoint)
    out = tmp_path / objective
    args = ["optimize", "sd15", "--base", str(tiny_models_dir / "sd15"), "--lrm", str(lrms["sd15"]), "--prompts",
            str(prompt_file), "--out", str(out), "--objective", objective, "--epochs", "2", "--sample-batch-size",
            "2", "--train-batch-size", "1", "--candidates", "2", "--steps", "3", "--threshold", "0,0",
            "--lora-rank", "4", "--device", "cpu", "--validation-images", "0"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 1, result.output
    assert "training stopped" in result.output and "loss became nan" in result.output
    assert issubclass(TrainingDiverged, RunFailed) and not issubclass(TrainingDiverged, InputError)
    # the epoch's checkpoint is the one written before the loss diverged, and the run can resume from it
    per_epoch = lpo_train.rounds_per_epoch(len(read_prompts(prompt_file)), 2, 1)
    assert len(saved) == 1 and lpo_train.latest_checkpoint(out).name == f"round-{per_epoch}"
    assert any(lpo_train.latest_checkpoint(out).iterdir())
