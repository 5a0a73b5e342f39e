"""The `lpo` command line end to end on the bundled sample with tiny models, and its exit code 2 on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from lpo.cli import app
from lpo.curate import mpcf
from lpo.curate.manifest import PAIRS_SCHEMA
from lpo.curate.scorers import CURATION_METRICS

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "manifests" / "sample" / "pickapic_sample.parquet"
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def filtered(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("filter") / "sample"
    result = invoke("curate", "filter", SAMPLE, "--out", out, "--models-dir", tiny_models_dir,
                    "--metrics", "pickscore,clip,vqa,aesthetic", "--keep-ties", "--plot", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "MPCF rule 'all'" in result.output
    return out


def test_filter_end_to_end_on_the_bundled_sample(filtered: Path) -> None:
    kept = pl.read_parquet(filtered / "filtered.parquet")
    rejected = pl.read_parquet(filtered / "rejected.parquet")
    summary = json.loads((filtered / "summary.json").read_text())
    source_rows = pq.read_metadata(SAMPLE).num_rows
    assert kept.height + rejected.height == summary["pairs"] == source_rows
    assert summary["kept"] == kept.height
    assert summary["rejected_by_reason"] == dict(rejected.group_by("reason").len().rows())
    assert summary["images_with_errors"] == 1 and summary["rejected_by_reason"]["image_error"] == 3
    assert (filtered / "gaps.png").stat().st_size > 0
    for column in PAIRS_SCHEMA.names + [f"{m}_{s}" for m in CURATION_METRICS for s in ("0", "1", "gap")]:
        assert column in kept.columns
    assert pq.read_schema(filtered / "filtered.parquet").metadata[b"lpo.curation_dir"] == str(filtered).encode()
    # every kept pair passes the rule, checked directly on the written columns
    rule = mpcf.build_rule("all", metrics=list(CURATION_METRICS), keep_ties=True)
    for row in kept.iter_rows(named=True):
        for m in rule.metrics:
            if row["is_tie"]:
                assert abs(row[f"{m}_0"] - row[f"{m}_1"]) < rule.tie_max_gap[m]
            else:
                winner, loser = (row[f"{m}_0"], row[f"{m}_1"])[:: 1 if row["winner"] == 0 else -1]
                assert winner - loser > 0
    config = json.loads((filtered / "filter_config.json").read_text())
    assert config["metrics"] == list(CURATION_METRICS) and config["keep_ties"] is True


def test_refilter_of_a_curation_dir_reuses_its_scores(filtered: Path, tmp_path: Path, tiny_models_dir: Path) -> None:
    before = sorted((filtered / "scores").rglob("part-*.parquet"))
    out = tmp_path / "paper"
    result = invoke("curate", "filter", filtered, "--out", out, "--rule", "lpo-paper", "--models-dir", tiny_models_dir,
                    "--min-gap", "clip=0.001", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert sorted((filtered / "scores").rglob("part-*.parquet")) == before  # nothing rescored
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"] == ["aesthetic", "clip", "vqa"] and summary["min_gap"]["clip"] == 0.001
    assert summary["keep_ties"] is True and summary["pairs"] == pq.read_metadata(SAMPLE).num_rows
    # --models-dir's models, not the rule's own, scored them: the summary and the printout name each one
    assert summary["models"] == {m: str((tiny_models_dir / m).resolve()) for m in ("aesthetic", "clip", "vqa")}
    assert "Scored with: aesthetic" in result.output


def test_the_paper_rules_score_with_the_papers_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --models-dir or a --vqa-model, --rule lpo-paper* scores VQA with the paper's CLIP-FlanT5-XXL: where
    t2v_metrics is not installed, exit 2 naming the install, before anything is written."""
    import importlib.util

    from lpo.curate import filter as curate_filter

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "t2v_metrics" else real(name, *a))
    for rule in ("lpo-paper", "lpo-paper-strict", "lpo-paper-loose"):
        out = tmp_path / rule
        result = invoke("curate", "filter", SAMPLE, "--out", out, "--rule", rule, "--device", "cpu")
        assert result.exit_code == 2, result.output
        text = result.output.replace("\n", "")
        assert "t2v:clip-flant5-xxl" in text and "pip install t2v-metrics==3.0" in text
        assert not out.exists()
    config = curate_filter.FilterConfig(source=str(SAMPLE), out=tmp_path / "x", rule="lpo-paper",
                                        models={"clip": "hf-hub:org/other"})
    models = curate_filter._score_config(config, tmp_path, mpcf.build_rule("lpo-paper")).models
    assert models == {"aesthetic": "trl-lib/ddpo-aesthetic-predictor", "clip": "hf-hub:org/other",
                      "vqa": "t2v:clip-flant5-xxl"}  # the user's choice wins; the rest are the paper's
    config.rule = "all"
    assert curate_filter._score_config(config, tmp_path, mpcf.build_rule("all")).models == {"clip": "hf-hub:org/other"}


def test_help_prints_every_metrics_default_model() -> None:
    from lpo.curate.scorers.specs import DEFAULT_MODELS

    for command, metrics in ((("curate", "filter"), CURATION_METRICS), (("eval",), tuple(DEFAULT_MODELS))):
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "400"})
        text = " ".join(result.output.split())
        for metric in metrics:
            assert f"Default: {DEFAULT_MODELS[metric]}." in text, (command, metric)
    assert "The lpo-paper filter rules: the paper's t2v:clip-flant5-xxl." in text


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--metrics", "pickscore,hps"], "unknown metric(s) ['hps']"),
        (["--rule", "everything"], "unknown rule 'everything'"),
        (["--min-gap", "clip:0.1"], "metric=value"),
        (["--pickscore-model", "{tiny}/sd15"], "expected a CLIP model (model_type 'clip') (a folder with "
                                                "config.json), found a diffusers pipeline (model_index.json)"),
        (["--clip-model", "/no/such/model"], "clip model path '/no/such/model' does not exist"),
    ],
)
def test_bad_options_exit_2_before_any_work(args, needle, tiny_models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [a.format(tiny=tiny_models_dir) for a in args]
    result = invoke("curate", "filter", SAMPLE, "--out", out, "--models-dir", tiny_models_dir, *args)
    assert result.exit_code == 2
    # the rule broken and the fix, not only the path echoed back (rich wraps the message at spaces)
    assert needle in " ".join(result.output.split())
    assert not out.exists()  # validated before ingest or any model load


def test_source_without_required_columns_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.parquet"
    pq.write_table(pq.read_table(SAMPLE).drop_columns(["jpg_1"]), bad)
    result = invoke("curate", "ingest", bad, "--out", tmp_path / "cur")
    assert result.exit_code == 2
    output = result.output.replace("\n", "")  # rich wraps long paths mid-word (longer ones under pytest-xdist)
    assert "jpg_1" in output and "bad.parquet" in output


def test_ingest_and_score_commands(tmp_path: Path, tiny_models_dir: Path) -> None:
    work = tmp_path / "cur"
    result = invoke("curate", "ingest", SAMPLE, "--out", work, "--limit", "12")
    assert result.exit_code == 0, result.output
    assert pl.read_parquet(work / "pairs.parquet").height == 12
    result = invoke("curate", "score", work, "--metrics", "clip", "--clip-model", tiny_models_dir / "clip",
                    "--device", "cpu", "--batch-size", "3")
    assert result.exit_code == 0, result.output
    scores = pl.read_parquet(work / "scores.parquet")
    assert scores.columns == ["image_uid", "clip", "error"]


def _commands(group: typer.core.TyperGroup, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for name, sub in group.commands.items():
        found += _commands(sub, (*path, name)) if isinstance(sub, typer.core.TyperGroup) else [(*path, name)]
    return found


def test_every_command_has_help() -> None:
    commands = _commands(typer.main.get_command(app))
    assert ("reward", "train") in commands and ("optimize", "sdxl") in commands and ("eval", "compare") in commands
    assert len(commands) >= 22
    for command in commands:
        result = invoke(*command, "--help")
        assert result.exit_code == 0 and "Usage" in result.output, command
        assert "--help" in result.output


def test_options_are_the_config_fields() -> None:
    """Every field of a command's config is an option (or an argument), its help and default from the field."""
    import dataclasses

    from lpo.reward.lrm.config import RewardTrainConfig

    result = runner.invoke(app, ["reward", "train", "--help"], env={"COLUMNS": "300"})
    text = " ".join(result.output.split())
    for field in dataclasses.fields(RewardTrainConfig):
        assert f"--{field.name.replace('_', '-')}" in text, field.name
    assert "(default: 4000)" in text and "--no-gradient-checkpointing" in text


def test_sample_data_command_writes_pickapic_schema(tmp_path: Path) -> None:
    out = tmp_path / "toy.parquet"
    result = invoke("dev", "sample-data", out, "--prompts", "3", "--flip-rate", "0")
    assert result.exit_code == 0, result.output
    table = pl.read_parquet(out)
    assert table.height == 18  # 4 images per prompt, 6 pairs each
    labelled = table.filter(pl.col("label_0") != pl.col("label_1"))
    agree = labelled.filter((pl.col("label_0") > pl.col("label_1")) == (pl.col("oracle_0") > pl.col("oracle_1")))
    assert agree.height == labelled.height  # no flips: labels follow the oracle


def test_version_short_help_and_the_sd2_family_hint() -> None:
    from importlib.metadata import version

    assert invoke("--version").output.strip() == f"lpo {version('lpo')}"
    short, long = invoke("reward", "train", "-h"), invoke("reward", "train", "--help")
    assert short.exit_code == 0 and short.output == long.output
    sd2 = runner.invoke(app, ["optimize", "sd2", "--base", "stabilityai/stable-diffusion-2-1"])
    assert sd2.exit_code == 2 and "belong to the sd15 family" in sd2.output


def test_each_family_command_prints_its_own_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """`lpo optimize <family> --help` shows that family's value of every field whose default is the family's, read
    from the one `Family.lpo_defaults` record (a family that lacks one fails at --help, not silently)."""
    import re

    from lpo.reward.backbones import FAMILIES

    monkeypatch.setenv("COLUMNS", "1000")  # one option per line
    for family in FAMILIES.values():
        text = invoke("optimize", family.name, "--help").output
        shown = dict(re.findall(rf"--([a-z-]+) .*?\(default for {family.name}: ([^)]*)\)", text))
        defaults = family.lpo_defaults
        assert shown["lr"] == str(defaults["lr"]) and shown["lora-rank"] == str(defaults["lora_rank"])
        assert shown["eta"] == str(defaults["eta"]) and shown["sampler"] == defaults["sampler"]
        assert shown["gradient-checkpointing"] == ("on" if defaults["gradient_checkpointing"] else "off")
        if family.thresholds_by_resolution:
            assert shown["threshold"].startswith("0.35,0.5 at 512 px; 0.45,0.6 at 1024 px")
        else:
            assert shown["threshold"] == ",".join(map(str, defaults["threshold"]))
        assert "Default: the family's" not in text and len(shown) == 11
    assert "6e-05" in invoke("optimize", "sd15", "--help").output
    assert "6e-05" not in invoke("optimize", "sdxl", "--help").output


def test_one_prompt_reader_takes_a_curation_directory(filtered: Path) -> None:
    from lpo.curate.prompts import read_prompts

    assert read_prompts(filtered) == read_prompts(filtered / "pairs.parquet") and read_prompts(filtered)
