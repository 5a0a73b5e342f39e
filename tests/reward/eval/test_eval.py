"""`lpo eval` on tiny models: every image scored against its own prompt at any batch size, per-image seeds, resume,
`compare` statistics against hand formulas, each new metric's formula on hand-made weights, and exit 2 on bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lpo.cli import app
from lpo.core.errors import InputError
from lpo.curate.scorers import load_scorer
from lpo.reward.eval import run as evaluate
from lpo.reward.eval import score as eval_score
from lpo.reward.eval.config import EvalCompareConfig, EvalConfig, EvalScoreConfig
from lpo.reward.eval.items import EvalItem
from lpo.reward.eval.score import score_existing
from lpo.reward.eval.stats import compare, write_outputs

PROMPTS = ["a red circle on a blue background", "a green square", "three cats on a sofa"]
ALL_METRICS = ["pickscore", "hpsv2", "hpsv21", "imagereward", "aesthetic", "clip", "vqa"]
METRICS = ["pickscore", "hpsv2", "imagereward"]  # text-dependent ones, enough to catch a misaligned prompt
runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    result.text = " ".join(result.output.split())  # rich wraps long messages
    return result


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _config(tiny: Path, prompts: Path, out: Path, **kw) -> EvalConfig:
    defaults = dict(base=str(tiny / "sd15"), prompts=prompts, out=out, metrics=list(METRICS), models_dir=tiny,
                    images_per_prompt=2, steps=1, batch_size=1, score_batch_size=4, device="cpu", grid_prompts=2)
    return EvalConfig(**(defaults | kw))


@pytest.fixture(scope="module")
def runs(tiny_models_dir: Path, prompt_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same run at generation/scoring batch sizes 1 and 3 (batches of 3 mix the prompts' images)."""
    root = tmp_path_factory.mktemp("eval")
    out = {}
    for batch in (1, 3):
        out[batch] = root / f"bs{batch}"
        evaluate.run(_config(tiny_models_dir, prompt_file, out[batch], batch_size=batch, score_batch_size=batch))
    return out


@pytest.fixture(scope="module")
def scorers(tiny_models_dir: Path) -> dict:
    return {metric: load_scorer(metric, str(tiny_models_dir / metric)) for metric in METRICS}


def test_every_image_is_scored_against_its_own_prompt_at_any_batch_size(runs, scorers) -> None:
    for batch, out in runs.items():
        table = pl.read_parquet(out / "images.parquet")
        assert table.height == len(PROMPTS) * 2, batch  # every image of every prompt, not just the first
        assert sorted(table.select("prompt_index", "image_index").rows()) == [(p, i) for p in range(3) for i in (0, 1)]
        assert table["error"].null_count() == table.height
        for row in table.iter_rows(named=True):
            assert row["prompt"] == PROMPTS[row["prompt_index"]]
            image = Image.open(out / row["image_path"])
            for metric, scorer in scorers.items():
                expected = scorer.score([image], [row["prompt"]])[0]
                assert row[metric] == pytest.approx(expected, rel=1e-5, abs=1e-6), (batch, row["image_path"], metric)
                other = PROMPTS[(row["prompt_index"] + 1) % 3]
                if metric != "imagereward":  # the tiny ImageReward MLP barely moves; the others would catch a swap
                    assert scorer.score([image], [other])[0] != pytest.approx(expected, rel=1e-4)
        summary = json.loads((out / "summary.json").read_text())
        for metric in METRICS:
            assert summary["metrics"][metric]["mean"] == pytest.approx(table[metric].mean())
            assert summary["metrics"][metric]["n_images"] == 6
        assert (out / "grid.png").is_file() and Image.open(out / "grid.png").size == (2 * 64, 2 * 64)


def test_seeds_are_per_image_and_images_do_not_depend_on_the_batch(runs) -> None:
    one, three = (pl.read_parquet(runs[b] / "images.parquet").sort("prompt_index", "image_index") for b in (1, 3))
    assert one["seed"].to_list() == [42 + 1000 * p + i for p in range(3) for i in (0, 1)]
    assert one["seed"].to_list() == three["seed"].to_list()
    pixels = {}
    for row_one, row_three in zip(one.iter_rows(named=True), three.iter_rows(named=True), strict=True):
        a = np.asarray(Image.open(runs[1] / row_one["image_path"]), dtype=np.int16)
        b = np.asarray(Image.open(runs[3] / row_three["image_path"]), dtype=np.int16)
        assert np.abs(a - b).max() <= 1  # the same seed gives the same image in a batch of 1 or 3
        pixels[(row_one["prompt_index"], row_one["image_index"])] = a
    assert not np.array_equal(pixels[(0, 0)], pixels[(0, 1)])  # two images of one prompt: two seeds


def test_summary_records_sampler_settings_and_each_metric_model_and_scale(runs, tiny_models_dir) -> None:
    summary = json.loads((runs[1] / "summary.json").read_text())
    generation = summary["generation"]
    assert generation["sampler"] == "ddim" and generation["steps"] == 1 and generation["guidance"] == 5.0
    assert generation["eta"] == 0.0 and generation["resolution"] == [64, 64] and generation["seed"] == 42
    assert generation["base"] == str(tiny_models_dir / "sd15") and generation["torch_dtype"] == "float32"
    metrics = summary["metrics"]
    assert "HPS_v2_compressed.pt" in metrics["hpsv2"]["model_id"]
    assert metrics["hpsv2"]["model_id"].endswith("long side to 32 and zero-padded")  # HPS's transform, in the id
    assert "100 x cosine" in metrics["hpsv2"]["scale"]
    assert "exp(logit_scale)" in metrics["pickscore"]["scale"]
    assert "1.0333" in metrics["imagereward"]["scale"]
    for stats in metrics.values():
        low, high = stats["ci95"]
        assert low < stats["mean"] < high and stats["n_prompts"] == 3
    markdown = (runs[1] / "summary.md").read_text()
    assert markdown.startswith("| metric | mean | 95% CI |") and "| hpsv2 |" in markdown


def test_every_metric_end_to_end_through_the_command_line(tiny_models_dir, prompt_file, tmp_path) -> None:
    out = tmp_path / "all"
    result = invoke("eval", "--base", tiny_models_dir / "sd15", "--prompts", prompt_file, "--out", out,
                    "--models-dir", tiny_models_dir, "--metrics", ",".join(ALL_METRICS), "--images-per-prompt", 1,
                    "--max-prompts", 2, "--steps", 1, "--cfg", 7.5, "--batch-size", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    table = pl.read_parquet(out / "images.parquet")
    assert table.height == 2 and table.select(ALL_METRICS).null_count().sum_horizontal().item() == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["metrics"]) == ALL_METRICS and summary["generation"]["guidance"] == 7.5
    assert json.loads((out / "config.json").read_text())["metrics"] == ALL_METRICS


class _Interrupt(Exception):
    pass


def test_resume_does_not_regenerate_finished_images(tiny_models_dir, prompt_file, runs, tmp_path, monkeypatch):
    from lpo.reward.lpo import sampler

    real_sample = sampler.sample
    made: list[int] = []

    def counting(*args, fail_after=None, **kwargs):
        if fail_after is not None and len(made) >= fail_after:
            raise _Interrupt
        result = real_sample(*args, **kwargs)
        made.append(result["latents"].shape[0])
        return result

    out = tmp_path / "resumed"
    config = _config(tiny_models_dir, prompt_file, out, batch_size=3, score_batch_size=3)
    monkeypatch.setattr(evaluate, "sample", lambda *a, **k: counting(*a, fail_after=1, **k))
    with pytest.raises(_Interrupt):  # interrupted after the first batch of 3 images
        evaluate.run(config)
    assert len((out / "generated.jsonl").read_text().splitlines()) == 3 and not (out / "images.parquet").exists()
    with open(out / "generated.jsonl", "a") as records:
        records.write('{"key": "p00001-i01", "prom')  # a record torn by the interruption
    made.clear()
    monkeypatch.setattr(evaluate, "sample", counting)
    evaluate.run(config)
    assert made == [3]  # only the three images that were not finished
    table = pl.read_parquet(out / "images.parquet").sort("prompt_index", "image_index")
    reference = pl.read_parquet(runs[3] / "images.parquet").sort("prompt_index", "image_index")
    np.testing.assert_allclose(table.select(METRICS).to_numpy(), reference.select(METRICS).to_numpy(), rtol=1e-6)
    for row in table.iter_rows(named=True):
        assert np.array_equal(np.asarray(Image.open(out / row["image_path"])),
                              np.asarray(Image.open(runs[3] / row["image_path"])))
    # a finished run: nothing generated, nothing scored again
    made.clear()
    monkeypatch.setattr(eval_score, "load_scorer", lambda *a, **k: pytest.fail("scored again"))
    evaluate.run(config)
    assert made == []


def test_resume_refuses_to_mix_scores_of_a_changed_scorer(tiny_models_dir, prompt_file, tmp_path) -> None:
    """Scores made before a scorer's computation changed (its model id says how it scores) are not topped up by the
    changed scorer: the rerun stops with the fix, and the scores already written stay as they were."""
    out = tmp_path / "run"
    config = _config(tiny_models_dir, prompt_file, out, metrics=["hpsv2"])
    evaluate.run(config)
    header, lines = out / "scores" / "hpsv2.json", out / "scores" / "hpsv2.jsonl"
    info = json.loads(header.read_text())
    header.write_text(json.dumps({**info, "model_id": info["model_id"].split(", long side")[0]}))  # as before HPS's
    kept = lines.read_text().splitlines()[:-1]  # one image left to score
    lines.write_text("\n".join(kept) + "\n")
    with pytest.raises(InputError, match="were made as .*this run scores as .*long side to 32.*delete"):
        evaluate.run(config)
    assert lines.read_text().splitlines() == kept


def test_resume_refuses_changed_generation_settings(tiny_models_dir, prompt_file, runs) -> None:
    result = invoke("eval", "--base", tiny_models_dir / "sd15", "--prompts", prompt_file, "--out", runs[1],
                    "--models-dir", tiny_models_dir, "--metrics", "pickscore", "--steps", 3, "--device", "cpu")
    assert result.exit_code == 2 and "steps=1 (now 3)" in result.text


# ----------------------------------------------------------------------------------------------------------------
# compare


def _fake_run(out: Path, scores: dict[str, list[list[float]]], model: str = "m") -> None:
    """A run directory with the given scores per metric: scores[metric][prompt][image]."""
    first = next(iter(scores.values()))
    items = [EvalItem(p, i, f"prompt {p}", 42 + 1000 * p + i, out / f"p{p}-i{i}.png")
             for p, images in enumerate(first) for i in range(len(images))]
    by_metric = {metric: {item.key: (values[item.prompt_index][item.image_index], None) for item in items}
                 for metric, values in scores.items()}
    models = {metric: {"model_id": model, "scale": "test"} for metric in scores}
    out.mkdir(parents=True)
    write_outputs(items, by_metric, models, out, {"generation": None}, grid_prompts=0)


def test_compare_matches_hand_computed_paired_statistics(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(20, 1, (5, 4)).tolist()
    b = (np.asarray(a) + rng.normal(0.3, 0.5, (5, 4))).tolist()
    b[2] = list(a[2])  # one prompt unchanged: a tie in the win rate
    _fake_run(tmp_path / "a", {"pickscore": a})
    _fake_run(tmp_path / "b", {"pickscore": b})
    result = compare(EvalCompareConfig(run_a=tmp_path / "a", run_b=tmp_path / "b", out=tmp_path / "c.md"))
    m = result["metrics"]["pickscore"]
    # Independent formulas: with 4 images per prompt, the prompt-clustered standard error of the mean difference is
    # the std of the 5 per-prompt mean differences over sqrt(5); the interval is normal (z = 1.959964).
    diffs = [[b[p][i] - a[p][i] for i in range(4)] for p in range(5)]
    delta = sum(sum(row) for row in diffs) / 20
    per_prompt = [sum(row) / 4 for row in diffs]
    sd = math.sqrt(sum((x - delta) ** 2 for x in per_prompt) / 4)
    half = 1.959964 * sd / math.sqrt(5)
    assert m["delta"] == pytest.approx(delta) and m["mean_b"] - m["mean_a"] == pytest.approx(delta)
    assert m["ci95"] == pytest.approx([delta - half, delta + half], rel=1e-6)
    wins = sum(x > 0 for x in per_prompt)
    assert (m["wins"], m["ties"], m["losses"]) == (wins, 1, 4 - wins)
    assert m["win_rate"] == pytest.approx((wins + 0.5) / 5)
    assert result["pairs"] == 20 and result["prompts"] == 5
    assert (tmp_path / "c.md").read_text().startswith("| metric | A: a | B: b |")
    assert json.loads((tmp_path / "c.json").read_text())["metrics"]["pickscore"]["delta"] == pytest.approx(delta)


def test_summary_interval_is_clustered_by_prompt_with_unequal_sizes(tmp_path: Path) -> None:
    scores = [[1.0, 2.0, 4.0], [3.0], [0.5, 1.5], [2.5, 2.0]]
    _fake_run(tmp_path / "run", {"clip": scores})
    stats = json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"]["clip"]
    flat = [x for row in scores for x in row]
    n, g = len(flat), len(scores)
    mean = sum(flat) / n
    # CR1 sandwich variance of a mean: G/(G-1) * sum over prompts of (sum of residuals)^2 / n^2
    variance = g / (g - 1) * sum(sum(x - mean for x in row) ** 2 for row in scores) / n**2
    assert stats["mean"] == pytest.approx(mean)
    assert stats["std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in flat) / (n - 1)))
    assert stats["ci95"] == pytest.approx([mean - 1.959964 * math.sqrt(variance),
                                           mean + 1.959964 * math.sqrt(variance)], rel=1e-6)


def test_compare_command_and_its_refusals(runs, tmp_path) -> None:
    result = invoke("eval", "compare", runs[1], runs[3], "--out", tmp_path / "cmp.md")
    assert result.exit_code == 0, result.output
    assert "| metric | A: bs1 | B: bs3 |" in result.text and (tmp_path / "cmp.md").is_file()
    _fake_run(tmp_path / "x", {"pickscore": [[1.0]]}, model="model-x")
    _fake_run(tmp_path / "y", {"pickscore": [[1.0]]}, model="model-y")
    bad = invoke("eval", "compare", tmp_path / "x", tmp_path / "y")
    assert bad.exit_code == 2 and "not comparable" in bad.text
    _fake_run(tmp_path / "z", {"clip": [[1.0]]})
    bad = invoke("eval", "compare", runs[1], tmp_path / "z")
    assert bad.exit_code == 2 and "share no metric" in bad.text
    bad = invoke("eval", "compare", runs[1], tmp_path)
    assert bad.exit_code == 2 and "not an evaluation run" in bad.text


def test_lrm_guided_generation_and_prompts_from_a_curation_dir(tiny_models_dir, tmp_path) -> None:
    from lpo.reward.lrm.model import LatentRewardModel, export_components

    lrm = tmp_path / "lrm"
    torch.manual_seed(0)
    LatentRewardModel.from_base(str(tiny_models_dir / "sd15"), text_projection_init=None).save_pretrained(lrm)
    export_components(lrm, str(tiny_models_dir / "sd15"))
    curation = tmp_path / "pap-val"
    curation.mkdir()
    pl.DataFrame({"caption": [PROMPTS[0], PROMPTS[1], PROMPTS[0]]}).write_parquet(curation / "pairs.parquet")
    summary = evaluate.run(_config(tiny_models_dir, curation, tmp_path / "guided", lrm=lrm, candidates=4, steps=3,
                                   metrics=["pickscore"], images_per_prompt=1, batch_size=2))
    assert summary["images"] == 2 and summary["prompts"] == 2  # captions of the manifest, each once
    assert summary["generation"]["lrm"] == str(lrm) and summary["generation"]["candidates"] == 4
    assert summary["generation"]["eta"] == 1.0  # guided sampling needs a stochastic step
    # the same prompts, seeds and step noise without the LRM: other images (guidance chose other children)
    evaluate.run(_config(tiny_models_dir, curation, tmp_path / "plain", metrics=["pickscore"], images_per_prompt=1,
                         batch_size=2, eta=1.0, steps=3))
    guided, plain = (pl.read_parquet(tmp_path / run / "images.parquet").sort("prompt_index")
                     for run in ("guided", "plain"))
    assert guided["seed"].to_list() == plain["seed"].to_list()
    pixels = {run: [np.asarray(Image.open(tmp_path / run / path)) for path in table["image_path"]]
              for run, table in (("guided", guided), ("plain", plain))}
    assert all(not np.array_equal(a, b) for a, b in zip(pixels["guided"], pixels["plain"]))


def test_base_and_lora_runs_compare(tiny_models_dir, prompt_file, tmp_path) -> None:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_models_dir / "sd15")
    torch.manual_seed(0)
    pipeline.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                         init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(
        pipeline.unet))
    common = ["--base", tiny_models_dir / "sd15", "--prompts", prompt_file, "--models-dir", tiny_models_dir,
              "--metrics", "pickscore", "--images-per-prompt", 1, "--steps", 1, "--device", "cpu"]
    assert invoke("eval", *common, "--out", tmp_path / "eval-base").exit_code == 0
    assert invoke("eval", *common, "--lora", tmp_path / "lora", "--out", tmp_path / "eval-lpo").exit_code == 0
    result = compare(EvalCompareConfig(run_a=tmp_path / "eval-base", run_b=tmp_path / "eval-lpo"))
    assert result["pairs"] == 3 and result["metrics"]["pickscore"]["delta"] != 0
    summary = json.loads((tmp_path / "eval-lpo" / "summary.json").read_text())
    assert summary["generation"]["lora"] == str(tmp_path / "lora")


# ----------------------------------------------------------------------------------------------------------------
# scoring existing images


def test_score_folder_manifest_and_run_dir_pair_images_with_their_prompts(runs, scorers, tiny_models_dir,
                                                                           prompt_file, tmp_path) -> None:
    table = pl.read_parquet(runs[3] / "images.parquet")
    folder = tmp_path / "folder"
    folder.mkdir()
    for row in table.iter_rows(named=True):
        shutil.copy(runs[3] / row["image_path"], folder / f"{row['prompt_index']}_{row['image_index']}.png")
    csv = tmp_path / "manifest.csv"
    pl.DataFrame({"path": [f"folder/{p}_{i}.png" for p, i in table.select("prompt_index", "image_index").rows()],
                  "prompt": table["prompt"]}).write_csv(csv)
    for name, images, prompts in (("folder", folder, prompt_file), ("csv", csv, None), ("rundir", runs[3], None)):
        out = tmp_path / f"scored-{name}"
        score_existing(EvalScoreConfig(images=images, prompts=prompts, out=out, metrics=["pickscore"],
                                                models_dir=tiny_models_dir, score_batch_size=5, device="cpu"))
        scored = pl.read_parquet(out / "images.parquet").sort("prompt", "image_index")
        expected = table.sort("prompt", "image_index")
        assert scored["prompt"].to_list() == expected["prompt"].to_list(), name
        np.testing.assert_allclose(scored["pickscore"].to_numpy(), expected["pickscore"].to_numpy(), rtol=1e-5)
    assert pl.read_parquet(tmp_path / "scored-rundir" / "images.parquet")["seed"].null_count() == 0


def test_score_reads_samples_json_of_lpo_sample(runs, tiny_models_dir, tmp_path) -> None:
    table = pl.read_parquet(runs[1] / "images.parquet")
    records = [{"prompt": r["prompt"], "prompt_index": r["prompt_index"], "image_index": r["image_index"],
                "seed": r["seed"], "kind": "plain", "path": str(runs[1] / r["image_path"])}
               for r in table.iter_rows(named=True)]
    samples = tmp_path / "samples.json"
    samples.write_text(json.dumps({"base": "x", "images": records}))
    summary = score_existing(EvalScoreConfig(images=samples, out=tmp_path / "out", metrics=["pickscore"],
                                                      models_dir=tiny_models_dir, device="cpu"))
    assert summary["images"] == 6 and summary["metrics"]["pickscore"]["mean"] == pytest.approx(
        table["pickscore"].mean())


@pytest.mark.parametrize(("files", "needle"), [
    (["0_0.png", "1_0.png", "2_0.png", "5_0.png"], "is for prompt 5"),
    (["0_0.png", "1_0.png"], "have no image"),
    (["0_0.png", "1_0.png", "2_0.png", "cat.png"], "cannot be matched"),
    (["0_0.png", "0.png", "1.png", "2.png"], "both image 0 of prompt 0"),
])
def test_score_refuses_a_folder_that_does_not_match_the_prompts(files, needle, tiny_models_dir, prompt_file,
                                                                 tmp_path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in files:
        Image.new("RGB", (16, 16)).save(folder / name)
    result = invoke("eval", "score", "--images", folder, "--prompts", prompt_file, "--out", tmp_path / "out",
                    "--models-dir", tiny_models_dir, "--metrics", "pickscore")
    assert result.exit_code == 2 and needle in result.text, result.output


# ----------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(("extra", "needle"), [
    (["--metrics", "pickscore,fid"], "unknown metric(s) ['fid']"),
    (["--metrics", "hpsv2", "--hpsv2-model", "/nope/HPS_v2_compressed.pt"], "neither an existing path"),
    (["--images-per-prompt", "0"], "--images-per-prompt 0: must be at least 1"),
    (["--candidates", "2"], "needs --lrm"),
    (["--dtype", "float64"], "--dtype float64 is not one of"),
    (["--metrics", "hpsv21", "--hpsv21-model", "xswu/HPSv2"], "hf download xswu/HPSv2 HPS_v2.1_compressed.pt"),
])
def test_bad_options_exit_2_before_any_model_loads(extra, needle, tiny_models_dir, prompt_file, tmp_path) -> None:
    result = invoke("eval", "--base", tiny_models_dir / "sd15", "--prompts", prompt_file, "--out", tmp_path / "o",
                    "--models-dir", tiny_models_dir, "--device", "cpu", *extra)
    assert result.exit_code == 2 and needle in result.text, result.output
    assert not (tmp_path / "o").exists()


def test_eval_commands_have_help() -> None:
    for command in (["eval"], ["eval", "score"], ["eval", "compare"]):
        result = invoke(*command, "--help")
        assert result.exit_code == 0 and "Usage" in result.output, command


def test_empty_prompt_file_and_missing_options_exit_2(tiny_models_dir, tmp_path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    result = invoke("eval", "--base", tiny_models_dir / "sd15", "--prompts", empty, "--out", tmp_path / "o",
                    "--models-dir", tiny_models_dir)
    assert result.exit_code == 2 and "holds no prompts" in result.text
    result = invoke("eval", "--base", tiny_models_dir / "sd15")
    assert result.exit_code == 2 and "--prompts and --out are required" in result.text
    result = invoke("eval")
    assert result.exit_code == 0 and "compare" in result.text and "score" in result.text


@pytest.mark.slow  # three eval runs per flow family: in the full run, not the quick loop
@pytest.mark.parametrize(("family", "guidance", "noise"), [("sd3", 4.5, 0.7), ("flux", 3.5, 0.9)])
def test_flow_families_generate_guided_and_with_a_fine_tuned_transformer(family, guidance, noise, tiny_models_dir,
                                                                          prompt_file, tmp_path) -> None:
    """`lpo eval` on the flow-matching families: the family's guidance by default (SD3's CFG, FLUX's embedded
    guidance), LRM-guided sampling at its noise level, and `--transformer DIR` swapping in a fine-tuned transformer
    (which changes the images)."""
    import diffusers

    from lpo.reward.lrm.model import LatentRewardModel, export_components

    base = tiny_models_dir / family
    lrm = tmp_path / "lrm"
    torch.manual_seed(0)
    LatentRewardModel.from_base(str(base), text_projection_init=None).save_pretrained(lrm)
    export_components(lrm, str(base))
    common = ["--base", base, "--prompts", prompt_file, "--models-dir", tiny_models_dir, "--metrics", "pickscore",
              "--images-per-prompt", 1, "--steps", 3, "--max-prompts", 2, "--device", "cpu"]
    assert invoke("eval", *common, "--out", tmp_path / "plain").exit_code == 0
    plain = json.loads((tmp_path / "plain" / "summary.json").read_text())["generation"]
    assert plain["sampler"] == "cps" and plain["guidance"] == guidance and plain["eta"] == 0.0
    assert invoke("eval", *common, "--lrm", lrm, "--candidates", 2, "--out", tmp_path / "guided").exit_code == 0
    guided = json.loads((tmp_path / "guided" / "summary.json").read_text())["generation"]
    assert guided["eta"] == noise and guided["candidates"] == 2
    class_name = json.loads((base / "transformer" / "config.json").read_text())["_class_name"]
    transformer = getattr(diffusers, class_name).from_pretrained(base, subfolder="transformer")
    with torch.no_grad():
        transformer.proj_out.bias.add_(0.5)
    transformer.save_pretrained(tmp_path / "tuned")
    assert invoke("eval", *common, "--transformer", tmp_path / "tuned", "--out", tmp_path / "tuned-run").exit_code == 0
    tuned = json.loads((tmp_path / "tuned-run" / "summary.json").read_text())["generation"]
    assert tuned["denoiser"] == str(tmp_path / "tuned")
    before = np.asarray(Image.open(tmp_path / "plain" / "images" / "p00000-i00.png"), dtype=float)
    after = np.asarray(Image.open(tmp_path / "tuned-run" / "images" / "p00000-i00.png"), dtype=float)
    assert np.abs(before - after).mean() > 1
    bad = invoke("eval", *common, "--transformer", tmp_path, "--out", tmp_path / "bad")
    assert bad.exit_code == 2 and "holds no transformer" in bad.text


@pytest.mark.parametrize(("family", "expected"), [("sd15", torch.float16), ("sd3", torch.float16),
                                                  ("flux", torch.bfloat16)])
def test_auto_dtype_is_the_familys_half_precision_on_cuda(family, expected, tiny_models_dir, prompt_file,
                                                          tmp_path) -> None:
    """FLUX.1 overflows in float16: on CUDA its generation runs in bfloat16 (the CPU stays float32)."""
    config = _config(tiny_models_dir, prompt_file, tmp_path, base=str(tiny_models_dir / family))
    assert evaluate._generation_dtype(config, "cuda") == expected
    assert evaluate._generation_dtype(config, "cpu") == torch.float32
