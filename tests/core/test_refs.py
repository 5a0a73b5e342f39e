"""Model references: one parser for local paths and hub ids, hub files read once per process, and each kind of hub
failure turned into a message that names its fix."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from lpo.core import refs
from lpo.core.errors import InputError
from lpo.core.refs import ModelRef


def test_one_rule_for_paths_and_hub_ids(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert ModelRef.parse("a/b") == ModelRef("a/b", "a/b", None, True)  # exists: a local folder
    assert ModelRef.parse("./missing").local and ModelRef.parse("/abs/missing").local
    assert ModelRef.parse("~/x").root == str(Path("~/x").expanduser())
    assert ModelRef.parse("owner/repo") == ModelRef("owner/repo", "owner/repo", None, False)
    ref = ModelRef.parse("casiatao/LPO/lpo_sd15_merge/unet")
    assert (ref.root, ref.subfolder, ref.local) == ("casiatao/LPO", "lpo_sd15_merge/unet", False)
    assert ref.inside("scheduler") == "lpo_sd15_merge/unet/scheduler" and ref.inside(None) == "lpo_sd15_merge/unet"
    for bad in ("justaname", "owner//repo"):
        with pytest.raises(InputError, match="neither an existing folder nor a hub id"):
            ModelRef.parse(bad)


def test_a_hub_file_is_fetched_once_per_process(tmp_path: Path, monkeypatch) -> None:
    calls = []
    target = tmp_path / "config.json"
    target.write_text('{"a": 1}')

    def download(repo, filename, subfolder=None):
        calls.append((repo, filename, subfolder))
        return str(target)

    refs.forget_downloads()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    ref = ModelRef.parse("owner/repo/sub")
    assert ref.read_json("unet/config.json") == {"a": 1}
    assert ref.read_json("unet/config.json") == {"a": 1}
    assert calls == [("owner/repo", "config.json", "sub/unet")]
    refs.forget_downloads()


def _response(status: int) -> SimpleNamespace:
    """What the hub's HTTP errors read of a response."""
    return SimpleNamespace(status_code=status, headers={}, request=None)


@pytest.mark.parametrize(("error", "fix"), [
    (LocalEntryNotFoundError("not cached"), "HF_HUB_OFFLINE is set"),
    (GatedRepoError("gated", response=_response(403)), "hf auth login"),
    (RevisionNotFoundError("no rev", response=_response(404)), "existing branch, tag or commit"),
    (RepositoryNotFoundError("no repo", response=_response(404)), "check the id"),
    (RemoteEntryNotFoundError("no file", response=_response(404)), "name the folder that holds the model"),
])
def test_each_hub_failure_names_its_fix(error, fix, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def download(*args, **kwargs):
        raise error

    refs.forget_downloads()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(InputError) as refused:
        ModelRef.parse("owner/repo/sub").file("config.json")
    message = str(refused.value)
    assert message.startswith(f"could not read config.json of 'owner/repo/sub' ({type(error).__name__})")
    assert fix in message
    # a file the repository lacks is None when optional; offline-and-uncached is never "absent"
    if isinstance(error, RemoteEntryNotFoundError):
        assert ModelRef.parse("owner/repo").file("x.json", required=False) is None
    if isinstance(error, LocalEntryNotFoundError):
        with pytest.raises(InputError, match="HF_HUB_OFFLINE"):
            ModelRef.parse("owner/repo").file("x.json", required=False)
    refs.forget_downloads()


def test_a_hub_reference_may_be_pinned_to_a_revision(tmp_path: Path, monkeypatch) -> None:
    ref = ModelRef.parse("owner/repo@v1.0")
    assert (ref.root, ref.subfolder, ref.revision, ref.local) == ("owner/repo", None, "v1.0", False)
    ref = ModelRef.parse("casiatao/LPO/lpo_sd15_merge/unet@0123abc")
    assert (ref.root, ref.subfolder, ref.revision) == ("casiatao/LPO", "lpo_sd15_merge/unet", "0123abc")
    with pytest.raises(InputError, match="owner/repo@revision"):
        ModelRef.parse("owner/repo@")
    (tmp_path / "run@2").mkdir()
    monkeypatch.chdir(tmp_path)
    assert ModelRef.parse("run@2").local  # an existing folder is a folder, whatever its name holds


def test_with_revision_pins_a_hub_id_once(tmp_path: Path) -> None:
    assert refs.with_revision("owner/repo", "abc") == "owner/repo@abc"
    assert refs.with_revision("owner/repo@abc", "abc") == "owner/repo@abc"
    assert refs.with_revision("owner/repo", None) == "owner/repo" and refs.with_revision(None, "abc") is None
    with pytest.raises(InputError, match="pinned to abc, and --revision says def"):
        refs.with_revision("owner/repo@abc", "def")
    with pytest.raises(InputError, match="local folder, which has no revisions"):
        refs.with_revision(str(tmp_path), "abc")


def test_load_args_carry_the_folder_revision_and_chosen_variant(tmp_path: Path) -> None:
    refs.forget_downloads()
    assert refs.load_args(str(tmp_path), "unet") == (str(tmp_path), {"subfolder": "unet"})
    assert refs.load_args("owner/repo") == ("owner/repo", {})
    assert refs.load_args("owner/repo/sub@abc", "vae") == ("owner/repo", {"subfolder": "sub/vae", "revision": "abc"})
    assert refs.weight_args("owner/repo@abc", "unet") == ("owner/repo", {"subfolder": "unet", "revision": "abc"})
    refs.use_variant("owner/repo@abc", "fp16")
    assert refs.weight_args("owner/repo@abc", "unet")[1]["variant"] == "fp16"
    assert "variant" not in refs.load_args("owner/repo@abc", "scheduler")[1]  # configs have no variants
    assert "variant" not in refs.weight_args("owner/other", "unet")[1]  # chosen for one model only
    refs.forget_downloads()


def test_a_pinned_hub_file_is_read_at_its_revision(tmp_path: Path, monkeypatch) -> None:
    calls = []
    target = tmp_path / "config.json"
    target.write_text('{"a": 1}')

    def download(repo, filename, subfolder=None, revision=None):
        calls.append((repo, filename, subfolder, revision))
        return str(target)

    refs.forget_downloads()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert ModelRef.parse("owner/repo@abc").read_json("unet/config.json") == {"a": 1}
    assert ModelRef.parse("owner/repo").read_json("unet/config.json") == {"a": 1}  # another revision: asked again
    assert calls == [("owner/repo", "config.json", "unet", "abc"), ("owner/repo", "config.json", "unet", None)]
    refs.forget_downloads()


def test_a_pinned_metric_model_is_read_from_its_revisions_snapshot(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def snapshot(repo, revision=None, **_):
        calls.append((repo, revision))
        (tmp_path / "snap" / "sub").mkdir(parents=True, exist_ok=True)
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    assert refs.pinned_snapshot("owner/model@v2") == str(tmp_path / "snap")
    assert refs.pinned_snapshot("hf-hub:owner/clip@abc") == str(tmp_path / "snap")  # open_clip's hub spelling
    assert refs.pinned_snapshot("owner/repo/sub@abc") == str(tmp_path / "snap" / "sub")
    assert calls == [("owner/model", "v2"), ("owner/clip", "abc"), ("owner/repo", "abc")]
    for unpinned in ("owner/model", "hf-hub:owner/clip", "ViT-H-14:laion2b", str(tmp_path)):
        assert refs.pinned_snapshot(unpinned) == unpinned
    assert len(calls) == 3

    def missing(repo, revision=None, **_):
        raise RevisionNotFoundError("no such revision", response=_response(404))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    with pytest.raises(InputError, match="the revision does not exist"):
        refs.pinned_snapshot("owner/model@nope")
