"""GenEval and T2I-CompBench++ attribute binding through `lpo eval`, `lpo eval score`, `lpo eval compare` and
`lpo eval suite` on the tiny random-weight detector, colour classifier and BLIP VQA model, offline."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from lpo.cli import app

RECORDS = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}],
     "prompt": "a photo of a cat and a dog"},
    {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
     "prompt": "a photo of two clocks"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
    {"tag": "position", "include": [{"class": "kite", "count": 1},
                                    {"class": "wine glass", "count": 1, "position": ["above", 0]}],
     "prompt": "a photo of a wine glass above a kite"},
    {"tag": "color_attr", "include": [{"class": "bowl", "count": 1, "color": "green"},
                                      {"class": "cup", "count": 1, "color": "white"}],
     "prompt": "a photo of a green bowl and a white cup"},
]
runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    result.text = " ".join(result.output.split())
    return result


@pytest.fixture(scope="module")
def metadata(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("geneval") / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in RECORDS))
    return path


def _by_task_by_hand(table: pl.DataFrame, column: str) -> dict[str, float]:
    return {task: table.filter(pl.col("task") == task)[column].mean() for task in table["task"].unique()}


def test_geneval_and_b_vqa_run_through_eval_score_and_compare(tiny_models_dir, metadata, tmp_path) -> None:
    common = ["--base", tiny_models_dir / "sd15", "--prompts", metadata, "--models-dir", tiny_models_dir,
              "--metrics", "geneval,t2i-color", "--images-per-prompt", 2, "--steps", 1, "--device", "cpu"]
    first = invoke("eval", *common, "--out", tmp_path / "a")
    assert first.exit_code == 0, first.output
    assert "| geneval: counting |" in (tmp_path / "a" / "summary.md").read_text()
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    geneval = summary["metrics"]["geneval"]
    assert list(geneval["tasks"]) == [record["tag"] for record in RECORDS]  # in order of first appearance
    table = pl.read_parquet(tmp_path / "a" / "images.parquet")
    assert table["task"].to_list() == [record["tag"] for record in RECORDS for _ in range(2)]
    assert set(table["geneval"].to_list()) <= {0.0, 1.0}
    by_hand = _by_task_by_hand(table, "geneval")
    for task, stats in geneval["tasks"].items():
        assert stats["mean"] == pytest.approx(by_hand[task])
    assert geneval["mean"] == pytest.approx(sum(by_hand.values()) / len(by_hand))  # GenEval's overall
    assert geneval["image_accuracy"] == pytest.approx(table["geneval"].mean())
    per_prompt = {}
    for index, correct in zip(table["prompt_index"].to_list(), table["geneval"].to_list()):
        per_prompt[index] = per_prompt.get(index, False) or correct == 1.0
    assert geneval["prompt_accuracy"] == pytest.approx(sum(per_prompt.values()) / len(per_prompt))
    markdown = (tmp_path / "a" / "summary.md").read_text()
    assert f"prompts with a correct image {geneval['prompt_accuracy']:.4f}" in markdown
    details = [json.loads(line) for line in (tmp_path / "a" / "scores" / "geneval.jsonl").read_text().splitlines()]
    assert [d["detail"]["task"] for d in details] == table["task"].to_list()
    b_vqa = table["t2i-color"].to_numpy()
    assert ((b_vqa >= 0) & (b_vqa <= 1)).all() and b_vqa.std() > 0
    assert "spaCy" in summary["metrics"]["t2i-color"]["model_id"]  # the noun-phrase splitter is named

    # scoring the same images again from their files gives the same scores, records matched by prompt
    scored = invoke("eval", "score", "--images", tmp_path / "a", "--prompts", metadata, "--models-dir",
                    tiny_models_dir, "--metrics", "geneval,t2i-color", "--out", tmp_path / "rescored",
                    "--device", "cpu")
    assert scored.exit_code == 0, scored.output
    again = pl.read_parquet(tmp_path / "rescored" / "images.parquet")
    assert again["geneval"].to_list() == table["geneval"].to_list()
    assert again["t2i-color"].to_numpy() == pytest.approx(b_vqa, abs=1e-6)

    second = invoke("eval", *common, "--cfg", 2.0, "--out", tmp_path / "b")
    assert second.exit_code == 0
    compared = invoke("eval", "compare", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "ab.md")
    assert compared.exit_code == 0, compared.output
    result = json.loads((tmp_path / "ab.json").read_text())["metrics"]["geneval"]
    other = pl.read_parquet(tmp_path / "b" / "images.parquet")
    deltas = {task: other.filter(pl.col("task") == task)["geneval"].mean() - value for task, value in by_hand.items()}
    assert result["delta"] == pytest.approx(sum(deltas.values()) / len(deltas))
    assert {task: t["mean"] for task, t in result["tasks"].items()} == pytest.approx(deltas)
    assert "geneval: position" in (tmp_path / "ab.md").read_text()


def test_geneval_needs_the_benchmarks_metadata_file(tiny_models_dir, tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a bench\n")
    result = invoke("eval", "--base", tiny_models_dir / "sd15", "--prompts", prompts, "--models-dir",
                    tiny_models_dir, "--metrics", "geneval", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "evaluation_metadata.jsonl as --prompts" in result.text
    broken = tmp_path / "evaluation_metadata.jsonl"
    broken.write_text(json.dumps({**RECORDS[0], "include": [{"class": "unicorn", "count": 1}]}) + "\n")
    result = invoke("eval", "--base", tiny_models_dir / "sd15", "--prompts", broken, "--models-dir",
                    tiny_models_dir, "--metrics", "geneval", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "'unicorn', not one of GenEval's 80 classes" in result.text


def test_a_suite_reports_geneval_as_the_mean_over_tasks(tiny_models_dir, metadata, tmp_path) -> None:
    suite = {"base": str(tiny_models_dir / "sd15"), "prompts": str(metadata), "metrics": ["geneval"],
             "images_per_prompt": 1, "steps": 1, "rows": [{"name": "base"}, {"name": "cfg 2", "guidance": 2.0}]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    result = invoke("eval", "suite", tmp_path / "suite.yaml", "--out", tmp_path / "table", "--models-dir",
                    tiny_models_dir, "--device", "cpu")
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "table" / "table.json").read_text())
    for row, folder in zip(table["rows"], ("base", "cfg-2")):
        images = pl.read_parquet(tmp_path / "table" / "rows" / folder / "images.parquet")
        by_hand = _by_task_by_hand(images, "geneval")
        assert row["metrics"]["geneval"]["mean"] == pytest.approx(sum(by_hand.values()) / len(by_hand))


def test_geneval_overall_is_the_mean_over_tasks_not_over_images() -> None:
    """Three tasks with 8, 4 and 6 images and three correct in two of them: the overall score is the mean of the
    tasks' shares (0.5, 1, 1/6), not the share of all images (9/18), and "% correct prompts" counts the prompts with
    at least one correct image (4 of 6); the interval combines the tasks' standard errors."""
    import math

    from lpo.reward.eval.stats import by_task

    rows = [("single_object", 0, [1, 1, 1, 0]), ("single_object", 1, [1, 0, 0, 0]), ("counting", 2, [1, 1, 1, 1]),
            ("position", 3, [0, 0]), ("position", 4, [0, 1]), ("position", 5, [0, 0])]
    frame = pl.DataFrame([{"task": task, "prompt_index": index, "prompt": f"prompt {index}", "geneval": float(v)}
                          for task, index, values in rows for v in values])
    result = by_task(frame, "geneval")
    shares = {"single_object": 0.5, "counting": 1.0, "position": 1 / 6}
    assert {task: t["mean"] for task, t in result["tasks"].items()} == pytest.approx(shares)
    assert [t["n_images"] for t in result["tasks"].values()] == [8, 4, 6]
    assert result["mean"] == pytest.approx((0.5 + 1.0 + 1 / 6) / 3)
    assert result["image_accuracy"] == pytest.approx(9 / 18) and result["prompt_accuracy"] == pytest.approx(4 / 6)
    # standard errors clustered by prompt, by hand: sqrt(G / (G - 1) * sum of squared cluster residual sums) / n
    single = math.sqrt(2 / 1 * ((3 - 2) ** 2 + (1 - 2) ** 2)) / 8
    position = math.sqrt(3 / 2 * ((0 - 1 / 3) ** 2 + (1 - 1 / 3) ** 2 + (0 - 1 / 3) ** 2)) / 6
    assert result["tasks"]["single_object"]["sem"] == pytest.approx(single)
    assert result["tasks"]["position"]["sem"] == pytest.approx(position)
    assert result["tasks"]["counting"]["sem"] is None  # one prompt: no clustered error, so no overall interval
    assert result["sem"] is None and result["ci95"] is None
    two = by_task(frame.filter(pl.col("task") != "counting"), "geneval")
    half = 1.959963984540054 * math.sqrt(single**2 + position**2) / 2
    assert two["ci95"] == pytest.approx([two["mean"] - half, two["mean"] + half])
