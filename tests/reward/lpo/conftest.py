"""Fixtures of the LPO and GRPO tests: a random-weight LRM per family, saved as the trainers load it, and a
prompt file, built once per test process (read, never written, by the tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

PROMPTS = ["a red circle on a blue background", "a green square on a white background", "a white triangle"]


@pytest.fixture(scope="session")
def lrms(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from lpo.reward.lrm.model import LatentRewardModel, export_components

    out = {}
    for family in ("sd15", "sdxl", "sd3", "flux"):
        directory = tmp_path_factory.mktemp(f"lrm_{family}")
        torch.manual_seed(0)
        model = LatentRewardModel.from_base(str(tiny_models_dir / family), text_projection_init=None)
        model.save_pretrained(directory)
        export_components(directory, str(tiny_models_dir / family))
        out[family] = directory
    return out


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path
