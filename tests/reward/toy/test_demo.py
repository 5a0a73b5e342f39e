"""`lpo demo --hacking` on a reduced configuration: the paper's claims in miniature and the monitor's, each asserted by
the lower end of its 95% interval (marked `slow`: the demo runs once, about 7-10 minutes on 2 CPU cores); every stage
on a tiny budget from the command line, GRPO included, and the input checks (fast)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from lpo.core.errors import InputError
from lpo.reward.toy.config import DemoConfig

SHIPPED = Path(__file__).resolve().parents[3] / "manifests" / "toy-models"
# The demo's own budget (smaller budgets leave the LPO and backbone effects within seed noise), with a smaller
# held-out pair set, and the hacking stage at its own settings. GRPO is reported, not claimed: the tiny-budget test
# runs its stage.
REDUCED = {"val_prompts": 100, "grpo": False, "hacking": True}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoConfig, dict]:
    import torch

    from lpo.reward.toy import demo

    threads = torch.get_num_threads()
    # alone on the machine both cores help (conftest pins 1 for tiny models); beside another test worker, one each
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
    try:
        config = DemoConfig(out=tmp_path_factory.mktemp("demo"), models=SHIPPED, **REDUCED)
        return config, demo.run(config)
    finally:
        torch.set_num_threads(threads)


def test_label_agreement_counts_only_pairs_the_oracle_decides() -> None:
    from lpo.reward.toy.demo import label_agreement

    oracle = pl.DataFrame({"image_0_uid": ["a", "c", "e", "g"], "image_1_uid": ["b", "d", "f", "h"],
                           "oracle_0": [1.0, 0.5, 0.7, 0.8], "oracle_1": [0.5, 1.0, 0.7, 1.0]})
    pairs = pl.DataFrame({"image_0_uid": ["a", "c", "e", "g", "x"], "image_1_uid": ["b", "d", "f", "h", "y"],
                          "winner": [0, 0, 1, None, 0]}, schema_overrides={"winner": pl.Int8})
    # a-b agrees (0 wins), c-d disagrees, e-f is an oracle tie, g-h has no winner, x-y has no oracle
    assert label_agreement(pairs, oracle) == {"pairs": 5, "decided": 2, "agreement": 0.5}


def claim(summary: dict, start: str) -> dict:
    return next(c for c in summary["claims"] if c["claim"].startswith(start))


@pytest.mark.slow
def test_mpcf_raises_label_agreement_and_keeps_enough_pairs(demo_run) -> None:
    _, summary = demo_run
    raw, kept = summary["curate"]["raw"], summary["curate"]["kept"]
    assert 0.6 <= raw["agreement"] <= 0.8  # 30% flips
    assert kept["agreement"] >= 0.9
    assert summary["curate"]["kept_share"] >= 0.25
    # the 95% interval's lower end; seeds 0 and 1 of this configuration: +29.0 [+27.8, +30.3] / [+27.7, +30.3] points
    assert claim(summary, "MPCF raises")["interval"][0] > 0


@pytest.mark.slow
def test_lrm_claims(demo_run) -> None:
    """Clean labels (seeds 0 / 1: +11.6 [+7.9, +15.5] / +11.3 [+7.1, +15.3] points) and the diffusion backbone (+4.6
    [+1.7, +7.7] / +5.2 [+2.2, +8.3]) each beat their alternative with the 95% interval above zero; the accuracy falls
    with noise. The timestep-blind control is reported, not asserted: on both seeds the toy UNet LRM is as accurate
    told t=1 at every level as told the true one (-0.4 [-1.7, +1.1] / +0.9 [-0.5, +2.2]; docs/demo.md)."""
    _, summary = demo_run
    mpcf = summary["lrm-mpcf"]["accuracy"]
    assert mpcf["1"] >= 0.85
    assert claim(summary, "an LRM trained on MPCF-kept pairs")["interval"][0] > 0
    assert claim(summary, "a diffusion-initialised backbone")["interval"][0] > 0
    assert mpcf["1"] >= mpcf["501"] >= mpcf["951"] + 0.1  # pure noise says less than a clean latent
    noise = claim(summary, "the LRM is noise-aware")
    assert noise["verdict"] in ("yes", "no", "not shown") and noise["interval"][0] <= noise["effect"]


@pytest.mark.slow
def test_guided_sampling_and_lpo_improve_the_generator(demo_run) -> None:
    """Seeds 0 / 1, per caption: LPO +9.1 [+4.4, +14.7] / +4.2 [+0.3, +8.5] oracle points; guided sampling +0.94
    [+0.69, +1.24] / +0.87 [+0.69, +1.06] LRM reward and +8.5 [+2.8, +14.0] / +7.9 [+3.0, +14.2] oracle points."""
    _, summary = demo_run
    for start in ("LPO raises the oracle", "LRM-guided sampling raises the LRM reward",
                  "LRM-guided sampling raises the oracle"):
        assert claim(summary, start)["interval"][0] > 0, start


@pytest.mark.slow
def test_the_monitor_stops_the_hacking_run_and_keeps_a_better_checkpoint(demo_run) -> None:
    """The planted-bias LRM is exploited (its reward rises at the monitor's checks while the held-out metrics fall);
    the rule stops the run before its last round and keeps a checkpoint above the unmonitored run's last in oracle
    alignment. Seeds 0 / 1 (the stage alone, 6 epochs at 8e-3): stopped at round 9 / 15 of 18, kept round 0 / 0,
    kept - last +17.9 [+7.6, +28.8] / +27.3 [+20.3, +34.4] oracle points."""
    config, summary = demo_run
    hacked = summary["hacking"]
    assert hacked["stopped_round"] is not None and hacked["stopped_round"] < hacked["rounds"] == 3 * 6
    rows = [json.loads(line) for line in (Path(config.out) / "hacking" / "monitor.jsonl").read_text().splitlines()]
    stop = next(row for row in rows if row.get("stopped"))
    assert stop["round"] == hacked["stopped_round"] and stop["lrm_reward"] > rows[0]["lrm_reward"]
    assert stop["pickscore"] < rows[0]["pickscore"]  # the trained-on reward up, an independent metric down
    kept = claim(summary, "the held-out monitor stops a reward-hacking run")
    assert kept["verdict"] == "yes" and kept["interval"][0] > 0


@pytest.mark.slow
def test_report_files_and_claims(demo_run) -> None:
    config, summary = demo_run
    out = Path(config.out)
    assert {"demo.md", "demo.png", "demo_summary.json"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "demo_summary.json").read_text())
    assert [c["verdict"] for c in saved["claims"]] == [c["verdict"] for c in summary["claims"]]
    assert len(summary["claims"]) == 8  # the hacking stage's claim too
    text = (out / "demo.md").read_text()
    assert "| LRM (held-out pairs, accuracy) |" in text
    assert all(f"| {c['claim']} | {c['measured']} | {c['verdict']} |" in text for c in summary["claims"])


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_refuses_other_settings(demo_run) -> None:
    from lpo.reward.toy import demo

    config, summary = demo_run
    again = demo.run(config)
    assert again["claims"] == summary["claims"]
    assert all(again[name]["seconds"] == summary[name]["seconds"] for name in demo.LRM_RUNS)  # read, not rerun
    with pytest.raises(InputError, match="other settings"):
        demo.validate(dataclasses.replace(config, lrm_steps=401))  # sd15 runs 400 when it is left unset


@pytest.mark.parametrize(("change", "message"), [
    ({"flip_rate": 0.6}, "--flip-rate must be in"), ({"held_out_prompts": 90}, "--held-out-prompts must be between"),
    ({"lrm_steps": 0}, "--lrm-steps must be at least 1"), ({"candidates": 1}, "--candidates must be at least 2"),
    ({"lpo_threshold": [0.5, 0.3]}, "lpo_threshold"), ({"score_timestep": "now"}, "score_timestep"),
])
def test_bad_settings_stop_before_anything_is_written(tmp_path: Path, change: dict, message: str) -> None:
    from lpo.reward.toy import demo

    with pytest.raises(InputError, match=message):
        demo.run(DemoConfig(out=tmp_path / "run", models=SHIPPED, **change))
    assert not (tmp_path / "run").exists()


def test_every_stage_runs_from_the_command_line_grpo_included(tmp_path: Path) -> None:
    """`lpo demo` end to end on a tiny budget (about 40 s): every stage, GRPO and the monitored hacking run included,
    and a report whose claims each carry a verdict from their interval."""
    from lpo.cli import app

    out = tmp_path / "run"
    args = ["demo", "--out", str(out), "--models", str(SHIPPED), "--train-prompts", "60", "--val-prompts", "20",
            "--lrm-steps", "5", "--lpo-epochs", "1", "--images-per-prompt", "2", "--held-out-prompts", "6",
            "--steps", "4", "--grpo", "--hacking", "--hacking-epochs", "2", "--hacking-threshold", "0,0.05"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    stages = {p.stem for p in (out / "stages").glob("*.json")}
    assert stages == {"data", "curate", "lrm-raw", "lrm-mpcf", "lrm-mpcf-fresh", "lpo", "grpo", "hacking", "samples"}
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["grpo"]["groups_trained"] > 0 and summary["grpo"]["updates"] > 0
    assert {"base", "guided", "lpo", "grpo"} <= set(summary["samples"]) and set(summary["costs"]) == {"lpo", "grpo"}
    assert len(summary["samples"]["grpo"]["oracle_per_image"]) == 6 * 2
    assert summary["lrm-mpcf"]["accuracy_blind"] is not None and summary["lrm-raw"]["accuracy_blind"] is None
    hacked = summary["hacking"]
    assert hacked["planted"] == "square" and (out / "lrm-planted" / "last" / "config.json").is_file()
    assert hacked["checks"] >= 3 and (out / "hacking" / "monitor.png").is_file() and (out / "hacking-kept").is_dir()
    assert {len(v) for v in hacked["oracle_per_image"].values()} == {6 * 2}
    assert len(summary["claims"]) == 8
    for claim in summary["claims"]:
        assert claim["verdict"] in ("yes", "no", "not shown") and claim["verdict"] in result.output
        assert claim["interval"][0] <= claim["effect"] <= claim["interval"][1]
    text = (out / "demo.md").read_text()
    assert "| claim | measured; effect [95% interval] | holds |" in text and "| grpo |" in text


def test_cli_rejects_a_models_folder_without_the_toy_models(tmp_path: Path) -> None:
    from lpo.cli import app

    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "run"), "--models", str(tmp_path)])
    assert result.exit_code == 2
    assert "lacks sd15/model_index.json" in " ".join(result.output.split())  # rich wraps long lines
    assert not (tmp_path / "run").exists()


def test_demo_stages_resume_from_their_parts(tmp_path):
    """A stage that finished is one part file and is not run again; a stage that failed leaves no part, so the
    rerun starts there, with the earlier stages' results read back for the later ones."""
    from lpo.core.parts import run_stages

    calls = []

    def stage(name, value, fail=False):
        def run():
            calls.append(name)
            if fail:
                raise RuntimeError(f"{name} died")
            return {"value": value}
        return run

    results = {}
    with pytest.raises(RuntimeError, match="lpo died"):
        run_stages([("data", stage("data", 1)), ("lpo", stage("lpo", 2, fail=True))], tmp_path, results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]
    results = {}
    run_stages([("data", stage("data", 1)), ("lpo", stage("lpo", 2)),
                ("samples", lambda: {"value": results["lpo"]["value"] + results["data"]["value"]})], tmp_path, results)
    assert calls == ["data", "lpo", "lpo"]  # data ran once; lpo again after its failure
    assert results["samples"]["value"] == 3 and results["data"]["value"] == 1
