"""Shared fixtures: tests run offline on tiny models built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before transformers/huggingface_hub are imported anywhere: they read it at import time.
os.environ["HF_HUB_OFFLINE"] = "1"


def pytest_configure(config: pytest.Config) -> None:
    # The test models are tiny: one thread is as fast as two on a quiet machine, and many times faster when the
    # cores are shared (a second thread then mostly waits for its turn).
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one tiny random-weight model per role (pickscore, clip, vqa, aesthetic, sd15, sdxl)."""
    from lpo.reward.toy.random_models import build_tiny_models

    out = tmp_path_factory.mktemp("tiny_models")
    build_tiny_models(out, seed=0)
    return out
