"""`lpo eval suite` on tiny models: a base row, a LoRA row, a merged-UNet row (both from one `lpo optimize
--merge` run), a row guided by an imported reference-layout LRM and a flow-matching row run offline end to end; the
table's paired differences and intervals equal a hand computation; a rerun reuses every finished row; bad suites
exit 2 before any model loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from lpo.cli import app
from lpo.core.errors import InputError
from lpo.reward.eval import run as evaluation

PROMPTS = ["a red circle on a blue background", "a green square", "three cats on a sofa"]
METRICS = ["pickscore", "clip"]
runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    result.text = " ".join(result.output.split())  # rich wraps long messages
    return result


@pytest.fixture(scope="module")
def weights(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory, write_reference_lrm) -> dict[str, Path]:
    """A prompt file, an LPO run with its LoRA and merged UNet, and an LRM imported from the reference layout."""
    import torch

    from lpo.reward.lpo import train as lpo_train
    from lpo.reward.lpo.config import LPOConfig
    from lpo.reward.lrm.model import LatentRewardModel, export_components

    root = tmp_path_factory.mktemp("suite-weights")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    base = tiny_models_dir / "sd15"
    torch.manual_seed(0)
    LatentRewardModel.from_base(str(base), text_projection_init=None).save_pretrained(root / "lrm")
    export_components(root / "lrm", str(base))
    lpo_train.run(LPOConfig(family="sd15", base=str(base), lrm=root / "lrm", prompts=prompts, out=root / "lpo",
                            epochs=1, sample_batch_size=3, train_batch_size=4, candidates=2, steps=3,
                            threshold=[0.0, 0.0], lora_rank=4, lr=1e-2, device="cpu", validation_images=0,
                            merge=True))
    write_reference_lrm(base, root / "reference", "sd15")
    result = invoke("reward", "import-reference", root / "reference", "--base", base, "--out", root / "imported")
    assert result.exit_code == 0, result.output
    return {"prompts": prompts, "lpo": root / "lpo", "imported": root / "imported"}


def _suite(tiny: Path, weights: dict[str, Path], path: Path, **changes) -> Path:
    suite = {"title": "tiny table", "source": "made up for the test", "base": str(tiny / "sd15"),
             "prompts": str(weights["prompts"]), "metrics": METRICS, "images_per_prompt": 2, "steps": 3, "seed": 7,
             "rows": [{"name": "base", "guidance": 7.5, "paper": {"pickscore": 20.56}},
                      {"name": "LoRA", "lora": str(weights["lpo"] / "lora")},
                      {"name": "merged UNet", "unet": str(weights["lpo"])},
                      {"name": "reference LRM, K=2", "lrm": str(weights["imported"]), "candidates": 2},
                      {"name": "SD3 (flow)", "base": str(tiny / "sd3"), "guidance": 2.0}]}
    suite.update(changes)
    path.write_text(yaml.safe_dump(suite))
    return path


def _clustered(values: np.ndarray, clusters: np.ndarray) -> tuple[float, float]:
    """Mean and CR1 standard error clustered by `clusters`, written out from the formula."""
    mean, n = values.mean(), len(values)
    groups = sorted(set(clusters.tolist()))
    sums = [sum(v - mean for v, c in zip(values, clusters) if c == g) for g in groups]
    return float(mean), math.sqrt(len(groups) / (len(groups) - 1) * sum(s * s for s in sums)) / n


def test_a_suite_runs_every_kind_of_row_and_pairs_them_with_the_first(tiny_models_dir, weights, tmp_path,
                                                                      monkeypatch) -> None:
    suite = _suite(tiny_models_dir, weights, tmp_path / "suite.yaml")
    out = tmp_path / "table"
    result = invoke("eval", "suite", suite, "--out", out, "--models-dir", tiny_models_dir, "--device", "cpu")
    assert result.exit_code == 0, result.output
    table = json.loads((out / "table.json").read_text())
    assert [row["name"] for row in table["rows"]] == ["base", "LoRA", "merged UNet", "reference LRM, K=2",
                                                      "SD3 (flow)"]
    rows = {row["name"]: row for row in table["rows"]}
    assert rows["base"]["guidance"] == 7.5 and rows["LoRA"]["guidance"] == 5.0  # the row's own, else the family's
    assert rows["LoRA"]["weights"]["lora"] == str(weights["lpo"] / "lora")
    assert rows["merged UNet"]["weights"]["denoiser_weights"] == str(weights["lpo"] / "merged_unet")
    assert rows["reference LRM, K=2"]["weights"]["lrm"] == str(weights["imported"])
    assert rows["reference LRM, K=2"]["eta"] == 1.0  # guided: the family's stochastic step
    assert rows["SD3 (flow)"]["weights"]["base"] == str(tiny_models_dir / "sd3")
    # the LoRA and its merge are the same weights: the same images up to rounding
    lora = pl.read_parquet(out / "rows" / "lora" / "images.parquet")
    merged = pl.read_parquet(out / "rows" / "merged-unet" / "images.parquet")
    assert np.allclose(lora["pickscore"].to_numpy(), merged["pickscore"].to_numpy(), atol=1e-3)
    # paired differences and their intervals, by hand from the per-image tables
    first = pl.read_parquet(out / "rows" / "base" / "images.parquet")
    for name, folder in (("LoRA", "lora"), ("reference LRM, K=2", "reference-lrm-k-2"), ("SD3 (flow)", "sd3-flow")):
        other = pl.read_parquet(out / "rows" / folder / "images.parquet")
        joined = first.join(other, on=["prompt_index", "image_index"], suffix="_b")
        assert joined.height == len(PROMPTS) * 2
        for metric in METRICS:
            delta = joined[f"{metric}_b"].to_numpy() - joined[metric].to_numpy()
            mean, sem = _clustered(delta, joined["prompt_index"].to_numpy())
            paired = rows[name]["paired_with_first"][metric]
            assert paired["delta"] == pytest.approx(mean, abs=1e-12)
            assert paired["ci95"] == pytest.approx([mean - 1.959964 * sem, mean + 1.959964 * sem], abs=1e-6)
            assert rows[name]["metrics"][metric]["mean"] == pytest.approx(other[metric].mean(), abs=1e-12)
    assert rows["base"]["paired_with_first"] is None
    markdown = (out / "table.md").read_text()
    assert "The paper's numbers / ours (made up for the test)" in markdown
    assert f"| base | 20.56 / {rows['base']['metrics']['pickscore']['mean']:.4f} |" in markdown
    assert (out / "table.png").stat().st_size > 0

    # a rerun reuses every finished row: no row runs again and the table is the same
    def refuse(config):
        raise AssertionError(f"row {config.out} ran again")

    monkeypatch.setattr(evaluation, "run", refuse)
    again = invoke("eval", "suite", suite, "--out", out, "--models-dir", tiny_models_dir, "--device", "cpu")
    assert again.exit_code == 0, again.output
    assert json.loads((out / "table.json").read_text())["rows"] == table["rows"]


@pytest.mark.parametrize(("change", "needle"), [
    ({"steps": "many"}, "steps = 'many' should be int"),
    ({"colour": 3}, "unknown keys ['colour']"),
    ({"rows": [{"name": "a"}, {"name": "A"}]}, "the name 'A' is used twice"),
    ({"rows": [{"name": "a", "transformer": "x"}]}, "whose denoiser is a unet; give `unet:`"),
    ({"rows": [{"name": "a"}, {"name": "guided", "lrm": "/nowhere/lrm", "candidates": 2}]},
     "row 'guided': /nowhere/lrm does not exist"),
    ({"rows": [{"name": "a", "paper": {"hpsv2": 26.46}}]}, "paper numbers must be numbers for the suite's metrics"),
    ({"rows": [{"name": "a", "cfg": 7.5, "guidance": 5.0}]}, "gives both cfg and guidance, two names of one setting"),
])
def test_bad_suites_exit_2_before_any_model_loads(change, needle, tiny_models_dir, tmp_path, monkeypatch) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one prompt\n")
    suite = _suite(tiny_models_dir, {"prompts": prompts, "lpo": tmp_path, "imported": tmp_path},
                   tmp_path / "suite.yaml", **change)
    monkeypatch.setattr(evaluation, "run", lambda config: pytest.fail("a row ran"))
    result = invoke("eval", "suite", suite, "--out", tmp_path / "out", "--models-dir", tiny_models_dir)
    assert result.exit_code == 2 and needle in result.text, result.text


SHIPPED = ["lpo-sd15", "lpo-sdxl", "lpo-sd3-medium", "geneval-sd15", "geneval-sdxl", "geneval-sd3-medium"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_suites_read_and_the_evaluation_docs_show_their_paper_numbers(name) -> None:
    """Every shipped suite reads, gives the paper's number for every metric of every row, and the table of
    docs/evaluation.md under that suite's name carries the same numbers (in the suite's metric order) beside each
    row's weights."""
    from lpo.reward.eval.suite import read_suite

    root = Path(__file__).parents[3]
    suite = read_suite(root / "manifests" / "suites" / f"{name}.yaml")
    page = (root / "docs" / "evaluation.md").read_text()
    assert f"`{name}.yaml`" in page
    after = page[page.index(f"`{name}.yaml`"):].splitlines()
    start = next(i for i, line in enumerate(after) if line.startswith("|"))
    table = []
    for line in after[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    assert len(table) == len(suite["rows"]) + 2, name  # a header, a rule, a line per row
    for row, line in zip(suite["rows"], table[2:]):
        assert set(row["paper"]) == set(suite["metrics"]), row["name"]
        weights = row.get("unet") or row.get("transformer") or row.get("base") or suite["base"]
        shown = "your run" if weights.startswith("./") else f"`{weights}`"
        assert line.startswith(f"| {row['name'].split(' (')[0]} | {shown} |"), (row["name"], line)
        numbers = [float(cell) for cell in line.strip("|").split("|")[2:]]
        assert numbers == [row["paper"][m] for m in suite["metrics"]], row["name"]


def test_a_shipped_suite_is_found_by_its_name_or_its_repository_path(tmp_path: Path, monkeypatch) -> None:
    from lpo.reward.eval.suite import read_suite

    monkeypatch.chdir(tmp_path)  # outside the checkout: neither name is a path here
    assert read_suite("lpo-sd15") == read_suite("manifests/suites/lpo-sd15.yaml")
    with pytest.raises(InputError):
        read_suite("no-such-suite")


def test_a_suite_takes_cfg_as_the_command_line_does(tmp_path: Path) -> None:
    """`lpo eval --cfg` and `--guidance` are one option; a suite takes both spellings too, at its top and in a row."""
    from lpo.reward.eval.suite import read_suite

    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"prompts": "p.txt", "metrics": ["clip"], "cfg": 4.0, "base": "owner/model",
                                    "rows": [{"name": "base", "cfg": 7.5}, {"name": "other"}]}))
    suite = read_suite(path)
    assert suite["guidance"] == 4.0 and "cfg" not in suite
    assert [row.get("guidance") for row in suite["rows"]] == [7.5, None]
