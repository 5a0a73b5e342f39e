"""`lpo demo` on a reduced configuration: the paper's claims in miniature, with margins beyond seed noise (marked
`slow`: the demo runs once, about 7 minutes on 2 CPU cores), and its input checks (fast)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from lpo.curate.errors import InputError
from lpo.reward.toy.config import DemoConfig

SHIPPED = Path(__file__).resolve().parents[3] / "manifests" / "toy-models"
# The demo's own budget (smaller budgets leave the LPO and backbone effects within seed noise), with a smaller
# held-out pair set: about 7 minutes on 2 CPU cores.
REDUCED = {"val_prompts": 100, "grpo": False}  # GRPO is reported, not asserted: the sd3 demo test runs it


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


@pytest.mark.slow
def test_mpcf_raises_label_agreement_and_keeps_enough_pairs(demo_run) -> None:
    _, summary = demo_run
    raw, kept = summary["curate"]["raw"], summary["curate"]["kept"]
    assert 0.6 <= raw["agreement"] <= 0.8  # 30% flips
    assert kept["agreement"] >= 0.9
    assert summary["curate"]["kept_share"] >= 0.25


@pytest.mark.slow
def test_lrm_claims(demo_run) -> None:
    _, summary = demo_run
    mpcf, raw, fresh = (summary[name]["accuracy"] for name in ("lrm-mpcf", "lrm-raw", "lrm-mpcf-fresh"))
    # seeds 0 and 1 of the full demo: 0.892 / 0.892 at t=1; +14.5 / +11.3 over raw; +3.6 / +4.9 over fresh
    assert mpcf["1"] >= 0.85
    assert mpcf["1"] >= raw["1"] + 0.05
    assert mpcf["1"] >= fresh["1"] + 0.02
    assert mpcf["1"] >= mpcf["951"] + 0.1


@pytest.mark.slow
def test_guided_sampling_and_lpo_improve_the_generator(demo_run) -> None:
    _, summary = demo_run
    samples = summary["samples"]
    # seeds 0 and 1 of the full demo: reward +0.94 / +0.87 and oracle +8.5 / +8.0 points guided; LPO +9.1 / +4.3
    assert samples["guided"]["lrm_reward"] >= samples["base"]["lrm_reward"] + 0.4
    assert samples["guided"]["oracle"] >= samples["base"]["oracle"] + 0.03
    assert samples["lpo"]["oracle"] >= samples["base"]["oracle"] + 0.02


@pytest.mark.slow
def test_report_files_and_claims(demo_run) -> None:
    config, summary = demo_run
    out = Path(config.out)
    assert {"demo.md", "demo.png", "demo_summary.json"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "demo_summary.json").read_text())
    assert [c["holds"] for c in saved["claims"]] == [c["holds"] for c in summary["claims"]]
    assert len(summary["claims"]) == 7
    assert "| LRM (held-out pairs, accuracy) |" in (out / "demo.md").read_text()


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


def test_cli_rejects_a_models_folder_without_the_toy_models(tmp_path: Path) -> None:
    from lpo.cli import app

    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "run"), "--models", str(tmp_path)])
    assert result.exit_code == 2
    assert "lacks sd15/model_index.json" in " ".join(result.output.split())  # rich wraps long lines
    assert not (tmp_path / "run").exists()
