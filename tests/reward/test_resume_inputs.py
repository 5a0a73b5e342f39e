"""A resumed run compares its inputs by content: the same manifest by a relative path, or after the run directory
moved, continues; a manifest whose content changed is refused, naming the setting."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from lpo.core import config as cfg
from lpo.core.errors import InputError
from lpo.reward import checkpoints


@dataclass
class Run:
    manifest: Path
    base: str
    out: Path
    lr: float
    resume: bool = False


def test_resume_keys_inputs_by_content_not_by_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = tmp_path / "data" / "filtered.parquet"
    manifest.parent.mkdir()
    manifest.write_bytes(b"the pairs")
    (tmp_path / "pipeline").mkdir()
    out = tmp_path / "run"
    out.mkdir()
    first = Run(manifest, str(tmp_path / "pipeline"), out, 1e-3)
    cfg.save(first, out / "config.json")
    checkpoints.save_inputs(first, out)
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    out.rename(moved)
    monkeypatch.chdir(tmp_path)
    again = Run(Path("data/filtered.parquet"), "pipeline", moved, 1e-3, resume=True)
    checkpoints.check_run_dir(again, moved, "config.json", {"resume"}, "step")  # the same inputs: accepted
    with pytest.raises(InputError, match=r"different \['lr'\]"):
        checkpoints.check_run_dir(Run(again.manifest, "pipeline", moved, 2e-3, resume=True), moved, "config.json",
                                  {"resume"}, "step")
    manifest.write_bytes(b"other pairs")
    with pytest.raises(InputError, match=r"different \['manifest'\]"):
        checkpoints.check_run_dir(again, moved, "config.json", {"resume"}, "step")
