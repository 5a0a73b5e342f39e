"""Runs a user cannot destroy by mistake: every command that writes a folder owns it by kind, continues its own
run, refuses another command's folder and other settings before writing anything, and replaces only when told to
(`--overwrite`), leaving nothing stale. After each refusal the old output is byte for byte what it was."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from lpo.cli import app
from lpo.core import rundir
from lpo.core.errors import InputError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "manifests" / "sample" / "pickapic_sample.parquet"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file under `folder` by its content."""
    return {str(p.relative_to(folder)): hashlib.blake2b(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_is_claimed_by_one_kind_of_run(tmp_path: Path) -> None:
    assert not rundir.claim(tmp_path / "new", "lrm") and not rundir.claim(tmp_path, "lrm")  # absent, empty
    (tmp_path / "lrm").mkdir()
    (tmp_path / "lrm" / "train_config.json").write_text("{}")
    assert rundir.kind_of(tmp_path / "lrm") == "lrm" and rundir.claim(tmp_path / "lrm", "lrm")
    with pytest.raises(InputError, match=r"is a lrm run directory \(written by `lpo reward train`\); `lpo optimize`"):
        rundir.claim(tmp_path / "lrm", "lpo")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(InputError, match="holds files but no run"):
        rundir.claim(tmp_path / "notes", "eval")
    with pytest.raises(InputError, match="is a file"):
        rundir.claim(tmp_path / "notes" / "todo.txt", "curation")


@pytest.fixture(scope="module")
def filtered(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("filter") / "sample"
    result = invoke("curate", "filter", SAMPLE, "--out", out, "--models-dir", tiny_models_dir, "--metrics",
                    "pickscore,clip", "--plot", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


def test_filter_refuses_other_settings_and_overwrite_leaves_nothing_stale(filtered: Path, tiny_models_dir: Path,
                                                                           tmp_path: Path) -> None:
    run = tmp_path / "sample"
    shutil.copytree(filtered, run)
    before = fingerprint(run)
    other = ("curate", "filter", SAMPLE, "--out", run, "--models-dir", tiny_models_dir, "--metrics",
             "pickscore,clip", "--min-gap", "clip=0.05", "--keep-ties", "--device", "cpu")
    refused = invoke(*other)
    assert refused.exit_code == 2 and "--overwrite" in refused.output and "min_gap" in refused.output
    assert fingerprint(run) == before  # nothing rewritten, nothing removed
    # the same settings by another spelling of the same source: continued, the same manifests
    same = invoke("curate", "filter", SAMPLE.relative_to(Path.cwd()) if SAMPLE.is_relative_to(Path.cwd())
                  else SAMPLE, "--out", run, "--models-dir", tiny_models_dir, "--metrics", "pickscore,clip", "--plot",
                  "--device", "cpu")
    assert same.exit_code == 0, same.output
    assert pl.read_parquet(run / "filtered.parquet").equals(pl.read_parquet(filtered / "filtered.parquet"))
    replaced = invoke(*other, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert not (run / "gaps.png").exists()  # the old run's plot does not outlive it
    config = json.loads((run / "filter_config.json").read_text())
    assert config["min_gap"] == {"clip": 0.05} and config["keep_ties"] is True


def test_commands_refuse_another_kinds_folder_before_writing(filtered: Path, tiny_models_dir: Path,
                                                            tmp_path: Path) -> None:
    lrm_run = tmp_path / "lrm"
    lrm_run.mkdir()
    (lrm_run / "train_config.json").write_text("{}")
    (lrm_run / "metrics.jsonl").write_text('{"update": 1, "loss": 0.7}\n' * 5)
    before = fingerprint(lrm_run)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    base = tiny_models_dir / "sd15"
    cases = [
        ("optimize", "sd15", "--base", base, "--lrm", lrm_run, "--prompts", prompts, "--out", lrm_run),
        ("eval", "--base", base, "--prompts", prompts, "--out", lrm_run, "--device", "cpu"),
        ("sample", "--base", base, "--prompt", "a red circle", "--out", lrm_run),
        ("curate", "ingest", SAMPLE, "--out", lrm_run),
        ("reward", "train", "--manifest", filtered / "filtered.parquet", "--base", base, "--out", filtered),
    ]
    for case in cases:
        result = invoke(*case)
        assert result.exit_code == 2, (case, result.output)
        assert "run directory" in result.output, (case, result.output)
    assert fingerprint(lrm_run) == before  # the LRM's metrics log still has its 5 lines


def test_bad_device_and_a_file_as_output_are_refused_before_anything_is_written(tiny_models_dir: Path,
                                                                               tmp_path: Path) -> None:
    import torch

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    if not torch.cuda.is_available():
        result = invoke("eval", "--base", tiny_models_dir / "sd15", "--prompts", prompts, "--out", tmp_path / "ev",
                        "--device", "cuda")
        assert result.exit_code == 2 and "CUDA is not available" in result.output
        assert not (tmp_path / "ev").exists()
    a_file = tmp_path / "taken.parquet"
    a_file.write_bytes(b"keep me")
    result = invoke("curate", "ingest", SAMPLE, "--out", a_file)
    assert result.exit_code == 2 and "is a file" in result.output
    assert a_file.read_bytes() == b"keep me"
