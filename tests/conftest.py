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


# The longest files, run first: on 2 workers (`-n 2 --dist loadfile --no-loadscope-reorder`, the README's command)
# each starts with one of the two demos and the short files fill in around them, instead of a demo starting last.
LONGEST_FIRST = ("tests/reward/toy/test_demo.py", "tests/reward/toy/test_demo_sd3.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: every other file keeps its order


@pytest.fixture(autouse=True)
def _hub_files_read_afresh():
    """Hub files are fetched once per process (`lpo.core.refs`); each test fakes its own hub, so each starts without
    the files an earlier test fetched."""
    from lpo.core.refs import forget_downloads

    forget_downloads()
    yield


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process and refuses another mixed precision in it: a test that
    trains in another precision than the tests before it starts and ends with the state cleared."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one tiny random-weight model per role (pickscore, clip, vqa, aesthetic, sd15, sdxl)."""
    from lpo.reward.toy.random_models import build_tiny_models

    out = tmp_path_factory.mktemp("tiny_models")
    build_tiny_models(out, seed=0)
    return out


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`publish(repo_id, {path in repo: local file or folder})`: files placed in a hub cache of the real layout
    (`models--owner--name/snapshots/<commit>/`, `refs/main`), which huggingface_hub and diffusers read offline
    exactly as they read a downloaded repository, so hub ids and `owner/repo/sub/folder` specs run their real
    code path."""
    import shutil

    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    commit = "0" * 40

    def publish(repo_id: str, files: dict[str, Path]) -> None:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / commit
        for inside, source in files.items():
            target = snapshot / inside
            target.parent.mkdir(parents=True, exist_ok=True)
            if Path(source).is_dir():
                shutil.copytree(source, target, dirs_exist_ok=True)
            else:
                shutil.copy(source, target)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    return publish


def _perturb(module, generator):
    import torch

    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return module


def _write_reference_lrm(base: Path, out: Path, family: str, seed: int = 0) -> dict:
    """A trained-looking LRM in the reference layout: the base's UNet and text encoders with changed weights, and
    state_dict.pt with projections of the reference's shapes."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    generator = torch.Generator().manual_seed(seed)
    unet = _perturb(UNet2DConditionModel.from_pretrained(base, subfolder="unet"), generator)
    unet.save_pretrained(out / "unet")
    text_encoder = _perturb(CLIPTextModel.from_pretrained(base, subfolder="text_encoder"), generator)
    text_encoder.save_pretrained(out / "text_encoder")
    if family == "sdxl":
        second = _perturb(CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2"), generator)
        second.save_pretrained(out / "text_encoder_2")
        text_dim = second.config.projection_dim
    else:
        text_dim = text_encoder.config.hidden_size
    blocks = unet.config.block_out_channels
    width = sum(blocks) + blocks[-1]  # one tap per down block (its last resnet), then the mid block
    state = {"visual_projection": {"weight": 0.02 * torch.randn(text_dim, width, generator=generator)},
             "logit_scale": torch.tensor(2.9)}
    if family == "sd15":
        hidden = text_encoder.config.hidden_size
        state["text_projection"] = {"weight": hidden**-0.5 * torch.randn(text_dim, hidden, generator=generator)}
    torch.save(state, out / "state_dict.pt")
    return state


@pytest.fixture(scope="session")
def write_reference_lrm():
    """`write(base, out, family)`: an LRM in the reference code's layout (unet/, text_encoder/, text_encoder_2/,
    state_dict.pt) made from a tiny pipeline with changed weights; returns the state dict it wrote."""
    return _write_reference_lrm
