"""`--revision` and `--variant` of a hub base reach every load of it: each config, tokenizer and scheduler read at the
pinned revision, each weights load with the variant too. The hub is faked: `owner/tiny` is served from the tiny SD1.5
pipeline on disk, and every request for it is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import huggingface_hub
import pytest
import transformers
from typer.testing import CliRunner

from lpo.cli import app
from lpo.core import refs

HUB_ID = "owner/tiny"
WEIGHTS = {"UNet2DConditionModel", "CLIPTextModel", "AutoencoderKL", "StableDiffusionPipeline"}


@pytest.fixture
def hub(tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Serve HUB_ID from the tiny pipeline; returns the log of (what, subfolder or file, revision, variant)."""
    local = tiny_models_dir / "sd15"
    calls: list[tuple] = []

    def download(repo, filename, subfolder=None, revision=None, **_):
        assert repo == HUB_ID, repo
        calls.append(("file", f"{subfolder}/{filename}" if subfolder else filename, revision, None))
        path = local / (subfolder or "") / filename
        if not path.is_file():
            raise huggingface_hub.errors.EntryNotFoundError(f"{path} absent")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    for klass in (diffusers.ModelMixin, diffusers.DiffusionPipeline, diffusers.SchedulerMixin,
                  transformers.PreTrainedModel, transformers.AutoTokenizer, transformers.PretrainedConfig):
        original = klass.from_pretrained.__func__

        def fake(cls, source, *args, _original=original, **kwargs):
            if str(source) == HUB_ID:
                calls.append((cls.__name__, kwargs.get("subfolder"), kwargs.pop("revision", None),
                              kwargs.pop("variant", None)))
                source = str(local)  # the tiny pipeline has no fp16 files: the variant is recorded, not read
            return _original(cls, source, *args, **kwargs)

        monkeypatch.setattr(klass, "from_pretrained", classmethod(fake))
    refs.forget_downloads()
    yield calls
    refs.forget_downloads()


def test_sample_reads_a_pinned_base_at_its_revision_with_its_variant(hub: list[tuple], tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["sample", "--base", HUB_ID, "--revision", "abc", "--variant", "fp16",
                                      "--prompt", "a red circle", "--steps", "1", "--out", str(tmp_path / "s"),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert hub and all(revision == "abc" for _, _, revision, _ in hub), hub
    loads = [(what, variant) for what, _, _, variant in hub if what != "file"]
    assert ("StableDiffusionPipeline", "fp16") in loads
    assert json.loads((tmp_path / "s" / "samples.json").read_text())["base"] == f"{HUB_ID}@abc"


def test_an_lrm_built_on_a_pinned_base_reads_every_part_at_its_revision(hub: list[tuple], tmp_path: Path) -> None:
    from lpo.reward.lrm.config import RewardTrainConfig
    from lpo.reward.lrm.model import LatentRewardModel, export_components

    config = RewardTrainConfig(base=HUB_ID, revision="abc", variant="fp16")
    assert (config.base, config.revision) == (f"{HUB_ID}@abc", None)  # the run records one pinned reference
    LatentRewardModel.from_base(config.base, text_projection_init=None)  # no CLIP from the hub for the projection
    export_components(tmp_path / "lrm", config.base)
    assert all(revision == "abc" for _, _, revision, _ in hub), hub
    seen = {(what, subfolder): variant for what, subfolder, _, variant in hub if what != "file"}
    assert seen[("UNet2DConditionModel", "unet")] == "fp16" and seen[("CLIPTextModel", "text_encoder")] == "fp16"
    assert seen[("AutoencoderKL", "vae")] == "fp16"
    assert seen[("AutoTokenizer", "tokenizer")] is None  # tokenizers and schedulers have no variants
    assert any(what == "DDPMScheduler" for what, *_ in hub)


def test_revision_on_a_local_folder_is_refused_before_anything_loads(tiny_models_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["sample", "--base", str(tiny_models_dir / "sd15"), "--revision", "abc",
                                      "--prompt", "x", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "local folder, which has no revisions" in result.output
    assert not (tmp_path / "s").exists()
