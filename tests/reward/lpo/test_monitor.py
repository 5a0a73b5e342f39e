"""The held-out monitor: the stop rule on scripted checks, the held-out split, and runs on the tiny SD1.5 pipeline
(one row per check, the best check kept in OUT/best, a scripted fall stopping the run, a resume continuing the
history)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from lpo.core.errors import InputError
from lpo.reward.lpo import monitor as monitor_module
from lpo.reward.lpo import train as lpo_train
from lpo.reward.lpo.config import LPOConfig
from lpo.reward.lpo.monitor import Verdict, check_monitor, judge, split_prompts


def _checks(held_out: list[float], reward: list[float], std: float = 1.0) -> list[dict]:
    return [{"round": r, "lrm_reward": w, "pick": h, "pick_std": std}
            for r, (h, w) in enumerate(zip(held_out, reward, strict=True))]


def test_the_rule_stops_at_the_kth_check_that_fell_while_the_reward_rose_and_never_before() -> None:
    rows = _checks([0.0, 0.3, 0.2, 0.15, 0.1, 0.05], [1.0, 1.1, 1.2, 1.3, 1.4, 1.5])
    for k in (1, 2, 3, 4, 5):
        for n in range(1, len(rows) + 1):  # the rule reads the checks made so far
            verdict = judge(rows[:n], ["pick"], patience=k, margin=10.0)  # margin out of reach: the hacking rule
            assert verdict.stop == (n - 2 >= k), (k, n)  # the bad checks are rounds 2.. ; k of them from n = k + 2
    verdict = judge(rows[:5], ["pick"], patience=3, margin=10.0)
    assert verdict.best_round == 1 and verdict.best_score == pytest.approx(0.3)
    assert "fell at 3 checks in a row (rounds 2-4) while the LRM reward rose" in verdict.reason


def test_a_fall_without_a_rising_reward_is_not_hacking_until_it_passes_the_margin() -> None:
    falling_together = _checks([0.0, 0.3, 0.2, 0.1, 0.0], [1.0, 1.1, 1.0, 0.9, 0.8])
    assert not judge(falling_together, ["pick"], patience=2, margin=10.0).stop  # both fell: no hacking
    verdict = judge(falling_together, ["pick"], patience=2, margin=0.15)
    assert verdict.stop and verdict.streak == 2 and "more than 0.15" in verdict.reason  # rounds 3, 4 below 0.3-0.15


def test_a_recovery_resets_the_streak_and_moves_the_best() -> None:
    rows = _checks([0.0, 0.1, 0.05, 0.2, 0.1, 0.05], [0, 1, 2, 3, 4, 5])
    verdict = judge(rows, ["pick"], patience=3, margin=10.0)
    assert not verdict.stop and verdict.streak == 2 and verdict.best_round == 3
    assert judge(rows, ["pick"], patience=0, margin=0.0).stop is False  # patience 0: never stop


def test_metrics_count_in_units_of_their_own_spread() -> None:
    rows = [{"round": 0, "lrm_reward": 0.0, "a": 20.0, "a_std": 0.5, "b": 0.2, "b_std": 0.01},
            {"round": 1, "lrm_reward": 0.1, "a": 20.5, "a_std": 0.5, "b": 0.19, "b_std": 0.01}]
    # a rose by one of its stds, b fell by one of its: the held-out score is their mean, 0
    assert judge(rows, ["a", "b"], 3, 1.0).scores == {0: 0.0, 1: pytest.approx(0.0)}
    assert judge(rows, [], 3, 1.0) == Verdict(None, None, {}, 0, False, None)  # no held-out metric: no verdict


def _paired(means: list[float], spread: list[float], reward: list[float], n: int = 16) -> list[dict]:
    """Checks whose per-image scores are a fixed pattern (std 1) plus the check's mean plus a per-image wobble of
    size spread[check]: the same images at every check, as the monitor's fixed prompts and seeds give."""
    rng = np.random.default_rng(0)
    pattern = rng.standard_normal(n)
    pattern = (pattern - pattern.mean()) / pattern.std(ddof=1)
    rows = []
    for r, (mean, wobble, w) in enumerate(zip(means, spread, reward, strict=True)):
        noise = rng.standard_normal(n) * wobble
        images = pattern + mean + noise - noise.mean()  # the check's mean stays exactly `mean`
        rows.append({"round": r, "lrm_reward": w, "pick": float(images.mean()), "pick_std": float(images.std(ddof=1)),
                     "pick_per_image": images.tolist()})
    return rows


def test_a_fall_counts_only_beyond_the_noise_of_the_paired_per_image_change() -> None:
    rows = _paired([0.0, -0.1, -0.2, -0.3], [0.0, 0.5, 0.5, 0.5], [1.0, 1.1, 1.2, 1.3])
    first = rows[0]
    # an independent reading: each fall of 0.1 (in the first check's std) against twice its paired standard error
    for before, after in zip(rows, rows[1:]):
        d = (np.asarray(after["pick_per_image"]) - np.asarray(before["pick_per_image"])) / first["pick_std"]
        assert d.std(ddof=1) / np.sqrt(d.size) > 0.05  # 0.1 is within 2 standard errors: noise
    assert not judge(rows, ["pick"], patience=3, margin=10.0, noise=2.0).stop
    assert judge(rows, ["pick"], patience=3, margin=10.0, noise=0.0).stop  # every fall counts: the old rule
    # the same falls with a small wobble are beyond the noise: three bad checks in a row
    quiet = _paired([0.0, -0.1, -0.2, -0.3], [0.0, 0.01, 0.01, 0.01], [1.0, 1.1, 1.2, 1.3])
    verdict = judge(quiet, ["pick"], patience=3, margin=10.0, noise=2.0)
    assert verdict.stop and "fell at 3 checks in a row (rounds 1-3)" in verdict.reason


def test_sinking_below_the_best_counts_past_the_margin_and_beyond_the_noise() -> None:
    # the best is round 1 (+0.5); rounds 2-4 sit 0.4 below it, past the 0.1 margin, with a per-image wobble whose
    # paired standard error against round 1 is about 0.25: 0.4 < 2 x 0.25 is noise, 0.4 > 2 x 0.01 is not
    noisy = _paired([0.0, 0.5, 0.1, 0.1, 0.1], [0.0, 0.0, 1.0, 1.0, 1.0], [1.0, 0.9, 0.8, 0.7, 0.6])
    se = [np.std(np.subtract(row["pick_per_image"], noisy[1]["pick_per_image"]), ddof=1) / 4.0 for row in noisy[2:]]
    assert all(s > 0.2 for s in se)
    assert not judge(noisy, ["pick"], patience=3, margin=0.1, noise=2.0).stop
    quiet = _paired([0.0, 0.5, 0.1, 0.1, 0.1], [0.0, 0.0, 0.01, 0.01, 0.01], [1.0, 0.9, 0.8, 0.7, 0.6])
    verdict = judge(quiet, ["pick"], patience=3, margin=0.1, noise=2.0)
    assert verdict.stop and verdict.best_round == 1 and "more than 0.1" in verdict.reason
    # beyond the noise but within the margin: not bad
    assert not judge(quiet, ["pick"], patience=3, margin=0.5, noise=2.0).stop


def test_rows_without_per_image_scores_count_every_fall() -> None:
    rows = _paired([0.0, -0.1, -0.2, -0.3], [0.0, 0.5, 0.5, 0.5], [1.0, 1.1, 1.2, 1.3])
    bare = [{k: v for k, v in row.items() if k != "pick_per_image"} for row in rows]  # checks of an older run
    assert judge(bare, ["pick"], patience=3, margin=10.0, noise=2.0).stop


def test_held_out_prompts_are_drawn_out_of_training_seeded(tmp_path: Path) -> None:
    prompts = [f"prompt {i}" for i in range(50)]
    config = LPOConfig(seed=1)
    train, held = split_prompts(config, prompts)
    assert len(held) == 5 and not set(held) & set(train) and sorted(train + held) == sorted(prompts)  # one in ten
    assert split_prompts(config, prompts) == (train, held)
    assert len(split_prompts(LPOConfig(seed=1, monitor_held_out=2), prompts)[1]) == 2
    assert split_prompts(config, prompts[:9]) == (prompts[:9], [])  # too few to spare one
    assert split_prompts(LPOConfig(monitor=False), prompts) == (prompts, [])
    file = tmp_path / "held.txt"
    file.write_text("a\nb\n")
    assert split_prompts(LPOConfig(monitor_prompts=file), prompts) == (prompts, ["a", "b"])


def test_monitor_options_are_checked_before_any_model_loads(tiny_models_dir: Path) -> None:
    prompts = [f"prompt {i}" for i in range(20)]
    with pytest.raises(InputError, match="--monitor-images 0 must be >= 1"):
        check_monitor(LPOConfig(monitor_images=0), prompts)
    with pytest.raises(InputError, match=r"--stop-noise -1.0 must be >= 0 \(0: every fall counts\)"):
        check_monitor(LPOConfig(stop_noise=-1.0), prompts)
    with pytest.raises(InputError, match="--monitor-prompts /nowhere.txt does not exist"):
        check_monitor(LPOConfig(monitor_prompts=Path("/nowhere.txt")), prompts)
    with pytest.raises(InputError, match="unknown metric"):
        check_monitor(LPOConfig(monitor_metrics=["pickscor"]), prompts)
    train, held, specs, required = check_monitor(LPOConfig(monitor_metrics=["pickscore"],
                                                           monitor_models_dir=tiny_models_dir), prompts)
    assert specs == {"pickscore": str(tiny_models_dir / "pickscore")} and required and len(held) == 2
    assert check_monitor(LPOConfig(monitor=False), prompts) == (prompts, [], {}, False)
    assert check_monitor(LPOConfig(), prompts[:5]) == (prompts[:5], [], {}, False)  # nothing held out: no metric


def _config(tiny: Path, lrms: dict, prompt_file: Path, held: Path, out: Path, **kw) -> LPOConfig:
    settings = dict(family="sd15", base=str(tiny / "sd15"), lrm=lrms["sd15"], prompts=prompt_file, out=out,
                    epochs=3, sample_batch_size=3, train_batch_size=4, candidates=2, steps=3, threshold=[0.0, 0.0],
                    lora_rank=4, lr=1e-3, device="cpu", validation_images=0, monitor_prompts=held,
                    monitor_metrics=["pickscore"], monitor_models_dir=tiny, monitor_every=1, monitor_images=2)
    return LPOConfig(**(settings | kw))


@pytest.fixture
def held(tmp_path: Path) -> Path:
    path = tmp_path / "held.txt"
    path.write_text("a blue circle\na red square\n")
    return path


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "monitor.jsonl").read_text().splitlines()]


def test_a_monitored_run_checks_every_round_and_keeps_the_best_check(tiny_models_dir, lrms, prompt_file, held,
                                                                     tmp_path) -> None:
    out = tmp_path / "run"
    summary = lpo_train.run(_config(tiny_models_dir, lrms, prompt_file, held, out, stop_patience=0, merge=True))
    rows = _rows(out)
    assert [row["round"] for row in rows] == [0, 1, 2, 3]  # the start, each round, the trained model
    assert (out / "best" / "merged_unet" / "config.json").is_file()  # --merge merges the best check's LoRA too
    assert summary["outputs"]["best_merged_unet"] == str(out / "best" / "merged_unet")
    assert all(row["pickscore_std"] > 0 and np.isfinite(row["lrm_reward"]) for row in rows)
    for row in rows:  # each image's score, kept for the paired comparison of checks (2 prompts x 2 images)
        assert len(row["pickscore_per_image"]) == 4
        assert np.mean(row["pickscore_per_image"]) == pytest.approx(row["pickscore"], abs=1e-5)
        assert np.std(row["pickscore_per_image"], ddof=1) == pytest.approx(row["pickscore_std"], abs=1e-5)
    monitored = summary["monitor"]
    first = rows[0]
    scores = {row["round"]: (row["pickscore"] - first["pickscore"]) / first["pickscore_std"] for row in rows}
    assert monitored["best_round"] == max(scores, key=scores.get)  # an independent reading of the rule's score
    kept = json.loads((out / "best" / "monitor.json").read_text())
    assert kept["round"] == monitored["best_round"] and not monitored["stopped"]
    assert (out / "monitor.png").stat().st_size > 0
    best = load_file(out / "best" / "lora" / "pytorch_lora_weights.safetensors")
    last = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert best.keys() == last.keys()
    if monitored["best_round"] != 3:  # the best check is an earlier policy than the last
        assert any(not np.allclose(best[k].numpy(), last[k].numpy()) for k in best)
    assert json.loads((out / "lpo_summary.json").read_text())["monitor"]["best_round"] == monitored["best_round"]


def _scripted(monkeypatch: pytest.MonkeyPatch, means: list[float]) -> None:
    """Each check's pickscore: per-image scores of mean means[check] and std about 1."""
    loaded = monitor_module.load_scorer
    calls = []

    def load(*args, **kwargs):
        scorer = loaded(*args, **kwargs)

        def score(images, captions):
            mean = means[min(len(calls), len(means) - 1)]
            calls.append(mean)
            return np.array([mean + (1.0 if i % 2 else -1.0) for i in range(len(images))])

        scorer.score = score
        return scorer

    monkeypatch.setattr(monitor_module, "load_scorer", load)


def test_a_scripted_fall_stops_the_run_at_the_kth_bad_check(tiny_models_dir, lrms, prompt_file, held, tmp_path,
                                                           monkeypatch) -> None:
    _scripted(monkeypatch, [0.0, 1.0, 0.5, 0.2, -1.0, -2.0])
    out = tmp_path / "run"
    summary = lpo_train.run(_config(tiny_models_dir, lrms, prompt_file, held, out, epochs=8, stop_patience=3,
                                    stop_margin=0.25))
    # best at round 1; rounds 2, 3 and 4 stay more than 0.25 std below it: the third bad check stops the run
    assert summary["rounds"] == 4 and [row["round"] for row in _rows(out)] == [0, 1, 2, 3, 4]
    monitored = summary["monitor"]
    assert monitored["stopped"] and monitored["best_round"] == 1 and "the best check is round 1" in monitored["reason"]
    assert json.loads((out / "best" / "monitor.json").read_text())["round"] == 1
    assert (out / "checkpoints" / "round-4").is_dir()  # where a resume would start
    again = lpo_train.run(_config(tiny_models_dir, lrms, prompt_file, held, out, epochs=8, stop_patience=3,
                                  stop_margin=0.25, resume=True))
    assert again["rounds"] == 4 and len(_rows(out)) == 5  # the rule still says stop: nothing trained, no new check
    # continued past the stop without the rule (as the demo's hacking stage does): the check that fired keeps saying so
    lpo_train.run(_config(tiny_models_dir, lrms, prompt_file, held, out, epochs=6, stop_patience=0, stop_margin=0.25,
                          resume=True))
    assert [row["stopped"] for row in _rows(out)] == [False, False, False, False, True, False, False]


def test_a_resumed_run_continues_the_monitor_without_repeating_a_check(tiny_models_dir, lrms, prompt_file, held,
                                                                       tmp_path) -> None:
    out = tmp_path / "run"
    lpo_train.run(_config(tiny_models_dir, lrms, prompt_file, held, out, epochs=2, stop_patience=0))
    assert [row["round"] for row in _rows(out)] == [0, 1, 2]
    lpo_train.run(_config(tiny_models_dir, lrms, prompt_file, held, out, epochs=4, stop_patience=0, resume=True))
    assert [row["round"] for row in _rows(out)] == [0, 1, 2, 3, 4]
