"""`lpo demo --family sd3`: the paper's claims in miniature on the flow-matching toy generator, with margins beyond
seed noise (marked `slow`: the demo runs once, without its GRPO stage, whose optimizer `tests/reward/lpo/test_grpo.py`
runs end to end on this family), and what only the flow family changes (fast)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lpo.curate.errors import InputError
from lpo.reward.toy.config import DemoConfig

SHIPPED = Path(__file__).resolve().parents[3] / "manifests" / "toy-models"


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoConfig, dict]:
    import torch

    from lpo.reward.toy import demo

    threads = torch.get_num_threads()
    # alone on the machine both cores help; beside another test worker, one each
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
    try:
        config = DemoConfig(out=tmp_path_factory.mktemp("demo_sd3"), family="sd3", models=SHIPPED, grpo=False)
        return config, demo.run(config)
    finally:
        torch.set_num_threads(threads)


def test_family_defaults_fill_only_what_is_left_unset() -> None:
    from lpo.reward.toy.demo import resolved

    assert resolved(DemoConfig()).guidance == 1.5 and resolved(DemoConfig(family="sd3")).guidance == 1.0
    assert resolved(DemoConfig(family="sd3", guidance=2.0)).guidance == 2.0
    assert resolved(DemoConfig()).lpo_threshold == [0.05, 0.3]


def test_noise_levels_are_named_as_each_sampler_names_them() -> None:
    from lpo.reward.toy.demo import noise_label

    assert noise_label("1", "sd15") == "t=1" and noise_label("951", "sd15") == "t=951"
    assert noise_label("1.0", "sd3") == "sigma=0.001" and noise_label("1000.0", "sd3") == "sigma=1.000"


def test_an_unknown_family_or_a_missing_generator_stops_before_anything_is_written(tmp_path: Path) -> None:
    from lpo.reward.toy import demo

    with pytest.raises(InputError, match="generators are sd15, sd3"):
        demo.run(DemoConfig(out=tmp_path / "a", family="flux", models=SHIPPED))
    with pytest.raises(InputError, match="lacks sd3/model_index.json"):
        demo.run(DemoConfig(out=tmp_path / "b", family="sd3", models=tmp_path))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_sd3_mpcf_and_lrm_claims(sd3_run) -> None:
    _, summary = sd3_run
    raw, kept = summary["curate"]["raw"], summary["curate"]["kept"]
    assert 0.6 <= raw["agreement"] <= 0.8 and kept["agreement"] >= 0.9  # the same pairs as the sd15 demo
    mpcf, raw_lrm = summary["lrm-mpcf"]["accuracy"], summary["lrm-raw"]["accuracy"]
    levels = list(mpcf)
    assert [float(t) for t in levels] == sorted(float(t) for t in levels) and float(levels[-1]) == 1000.0
    low, high = levels[0], levels[-1]
    # seeds 0 and 1 of the demo: 0.875 / 0.880 at sigma 0.001; +13.3 / +17.6 points over raw; 0.538 / 0.480 at 1
    assert mpcf[low] >= 0.82
    assert mpcf[low] >= raw_lrm[low] + 0.08
    assert mpcf[low] >= mpcf[high] + 0.2  # pure noise (sigma 1) says nothing: chance
    assert mpcf[low] >= mpcf[levels[2]] >= mpcf[levels[3]]  # accuracy falls with noise


@pytest.mark.slow
def test_sd3_guided_sampling_and_lpo_raise_the_lrm_reward(sd3_run) -> None:
    _, summary = sd3_run
    samples = summary["samples"]
    # seeds 0 and 1: LRM reward +0.90 / +0.74 guided, +0.39 / +0.35 after LPO. The oracle alignment after LPO,
    # +0.018 / +0.000, is within seed noise on this model (README: the flow-matching demo), so it is reported, not
    # asserted: only that LPO does not cost it
    base, guided, lpo = samples["base"], samples["guided"], samples["lpo"]
    assert guided["lrm_reward"] >= base["lrm_reward"] + 0.4
    assert lpo["lrm_reward"] >= base["lrm_reward"] + 0.2
    assert lpo["oracle"] >= base["oracle"] - 0.02


@pytest.mark.slow
def test_sd3_report_gives_the_costs_and_the_noise_levels_as_sigma(sd3_run) -> None:
    config, summary = sd3_run
    costs = summary["costs"]["lpo"]
    assert costs["trajectories"] > 0 and costs["items"] > 0 and costs["train_forwards"] > 0
    assert "grpo" not in summary["costs"] and "grpo" not in summary["samples"]  # --no-grpo
    text = (Path(config.out) / "demo.md").read_text()
    assert "| fine-tuning | trajectories |" in text and "sigma=0.001" in text and "| grpo |" not in text
    assert all(c["holds"] is not None for c in summary["claims"]) and len(summary["claims"]) == 7


def test_a_rerun_with_the_same_settings_is_accepted_and_other_settings_are_refused(tmp_path: Path) -> None:
    """The saved config keeps the family's defaults unset, and a rerun compares like with like."""
    import dataclasses

    from lpo.curate import config as cfg
    from lpo.reward.toy import demo

    config = DemoConfig(out=tmp_path, family="sd3", models=SHIPPED)
    cfg.save(config, tmp_path / demo.CONFIG_FILE)
    demo.validate(config)
    with pytest.raises(InputError, match=r"other settings \(lrm_steps\)"):
        demo.validate(dataclasses.replace(config, lrm_steps=250))
