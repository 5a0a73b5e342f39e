"""Model references: the one answer to "is this a local folder or a hub id?", and the one translation of hub errors
into messages that name the fix.

A reference is a local path when it exists or reads as one (it starts with `/`, `./`, `../` or `~`, or holds a
backslash); otherwise it is a hub repository, `owner/repo`, optionally with a folder inside it,
`owner/repo/sub/folder` (the layout of released checkpoints such as `casiatao/LPO/lpo_sd15_merge/unet`), and
optionally pinned to a revision (a branch, tag or commit), `owner/repo@revision`. A pinned reference travels as one
string into every config and run record that names the model, so a later command that reads it back loads the same
files. Hub files are fetched once per process: a second read of the same file does not ask the hub again.

Loaders take their `from_pretrained` arguments from here: `load_args(spec, subfolder)` gives the source and the
`subfolder`/`revision` keywords, `weight_args` adds the weights' `variant` (diffusers' and transformers'
`model.fp16.safetensors` files) chosen for that model with `use_variant`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from lpo.core.errors import InputError

PATH_PREFIXES = ("/", "./", "../", "~", ".\\")


def is_path_like(spec: str) -> bool:
    """Whether `spec` reads as a local path even when nothing exists there."""
    return spec.startswith(PATH_PREFIXES) or "\\" in spec


@dataclass(frozen=True)
class ModelRef:
    """Where a model lives. `local`: `root` is a path on this machine; else `root` is a hub repository and
    `subfolder` the folder inside it (None: its root)."""

    spec: str
    root: str
    subfolder: str | None
    local: bool
    revision: str | None = None  # a hub reference's branch, tag or commit (None: the default branch)

    @classmethod
    def parse(cls, spec: str | Path) -> ModelRef:
        spec = str(spec)
        path = Path(spec).expanduser()
        if path.exists() or is_path_like(spec):
            return cls(spec, str(path), None, True)
        name, at, revision = spec.partition("@")
        parts = name.strip("/").split("/")
        if len(parts) < 2 or not all(parts) or (at and not revision):
            raise InputError(f"{spec} is neither an existing folder nor a hub id (owner/repo, or "
                             "owner/repo/sub/folder for a folder inside a repository, optionally pinned as "
                             "owner/repo@revision).")
        return cls(spec, "/".join(parts[:2]), "/".join(parts[2:]) or None, False, revision or None)

    def inside(self, name: str | None) -> str | None:
        """The hub subfolder of `name` (a folder inside the model), None for the model's own root."""
        parts = [p for p in (self.subfolder, name) if p]
        return "/".join(parts) or None

    def file(self, name: str, *, required: bool = True) -> Path | None:
        """The path of the model's file `name` (it may hold a folder: `unet/config.json`), from disk or the hub;
        None when the model has no such file and it is not `required`."""
        if self.local:
            path = Path(self.root) / name
            if path.is_file():
                return path
            if required:
                raise InputError(f"{self.spec} has no {name}; pass the folder that holds it.")
            return None
        folder, _, filename = name.rpartition("/")
        return hub_file(self.root, filename, self.inside(folder or None), spec=self.spec, missing_ok=not required,
                        revision=self.revision)

    def read_json(self, name: str, *, required: bool = True) -> dict[str, Any] | None:
        path = self.file(name, required=required)
        return None if path is None else json.loads(path.read_text())


def hub_error(err: Exception, spec: str, filename: str) -> InputError:
    """The InputError for a failed hub read of `filename` of `spec`, naming what to do about this kind of failure."""
    what = f"could not read {filename} of '{spec}' ({type(err).__name__})"
    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        reason = "HF_HUB_OFFLINE is set and the file is not in the local cache" if offline else \
            "the hub is unreachable and the file is not in the local cache"
        return InputError(f"{what}: {reason}; download it first (`hf download {'/'.join(spec.split('/')[:2])}` on "
                          "a machine with access, or unset HF_HUB_OFFLINE), or pass a local folder.")
    if isinstance(err, GatedRepoError):
        return InputError(f"{what}: the repository is gated; accept its licence on the hub and log in (`hf auth "
                          "login`, or set HF_TOKEN), or pass a local folder.")
    if isinstance(err, RevisionNotFoundError):
        return InputError(f"{what}: the revision does not exist; name an existing branch, tag or commit.")
    if isinstance(err, (RepositoryNotFoundError, HFValidationError)):
        return InputError(f"{what}: no such repository (or a private one: log in with `hf auth login`); check the "
                          "id (owner/repo, or owner/repo/sub/folder), or pass a local folder.")
    if isinstance(err, EntryNotFoundError):
        return InputError(f"{what}: the repository has no such file; name the folder that holds the model "
                          "(owner/repo/sub/folder), or pass a local folder.")
    return InputError(f"{what}; pass a local folder or a reachable hub id.")


_FETCHED: dict[tuple[str, str, str | None, str | None], str] = {}
_VARIANTS: dict[str, str] = {}  # model reference -> the weights variant its loaders read (`use_variant`)


def cached_download(repo: str, filename: str, subfolder: str | None = None, revision: str | None = None) -> str:
    """`hf_hub_download`, asked once per process for each file while its local copy exists (a failure is not
    remembered)."""
    key = (repo, filename, subfolder, revision)
    path = _FETCHED.get(key)
    if path is None or not os.path.exists(path):
        path = _FETCHED[key] = huggingface_hub.hf_hub_download(repo, filename, subfolder=subfolder,
                                                               **({"revision": revision} if revision else {}))
    return path


def forget_downloads() -> None:
    """Ask the hub again for every file, and forget every chosen variant (a test that fakes the hub starts here)."""
    _FETCHED.clear()
    _VARIANTS.clear()


def with_revision(spec: str | None, revision: str | None) -> str | None:
    """`spec` pinned to `revision` (a command's `--revision` for its `--base`): `owner/repo@revision`. A local
    folder has no revisions, and a reference pinned to another revision is two answers to one question."""
    if spec is None or not revision:
        return spec
    ref = ModelRef.parse(spec)
    if ref.local:
        raise InputError(f"--revision {revision}: {spec} is a local folder, which has no revisions; drop --revision "
                         "or pass a hub id.")
    if ref.revision not in (None, revision):
        raise InputError(f"{spec} is pinned to {ref.revision}, and --revision says {revision}; give one.")
    return spec if ref.revision else f"{spec}@{revision}"


def use_variant(spec: str | None, variant: str | None) -> None:
    """Read the weights of `spec` from its `variant` files (`diffusion_pytorch_model.fp16.safetensors`,
    `model.fp16.safetensors`) in this process: a command's `--variant` for its `--base`."""
    if spec is not None and variant:
        _VARIANTS[str(spec)] = variant


REVISION_HELP = ("Hub revision of --base (a branch, tag or commit): the same as --base owner/repo@REVISION, which is "
                 "how the run records it.")
VARIANT_HELP = ("Weights variant of --base to read (the `*.fp16.safetensors` files diffusers and transformers load as "
                "variant fp16; bf16 likewise); default: the full-precision files.")


def pin_base(config: Any) -> None:
    """A config's `__post_init__`: pin `config.base` to `config.revision` (the field then reads None: the revision
    lives in the reference) and choose `config.variant` for it in this process."""
    if config.revision and config.base is not None:
        config.base = with_revision(config.base, config.revision)
        config.revision = None
    use_variant(config.base, config.variant)


def load_args(spec: str | Path, subfolder: str | None = None) -> tuple[str, dict[str, Any]]:
    """(source, keywords) for `from_pretrained` of the folder `subfolder` of `spec`: a local folder as itself, a hub
    reference as its repository with the folder inside it and its revision."""
    ref = ModelRef.parse(spec)
    if ref.local:
        return ref.root, {"subfolder": subfolder} if subfolder else {}
    inside = ref.inside(subfolder)
    return ref.root, {**({"subfolder": inside} if inside else {}), **({"revision": ref.revision} if ref.revision
                                                                         else {})}


def weight_args(spec: str | Path, subfolder: str | None = None) -> tuple[str, dict[str, Any]]:
    """`load_args` for a load that reads weights, with the variant chosen for `spec` (`use_variant`)."""
    source, kwargs = load_args(spec, subfolder)
    variant = _VARIANTS.get(str(spec))
    return source, kwargs | ({"variant": variant} if variant else {})


def pinned_snapshot(spec: str) -> str:
    """A model pinned to a hub revision, `owner/repo@revision` (or open_clip's `hf-hub:owner/repo@revision`), as the
    local folder of that revision's files, downloaded once into the hub cache; any other spec as it is. For loaders
    that take a folder or a hub id but no revision (the metric models: transformers, open_clip's `hf-hub:`)."""
    prefix = "hf-hub:" if spec.startswith("hf-hub:") else ""
    body = spec.removeprefix(prefix)
    if "@" not in body or is_path_like(body) or Path(spec).expanduser().exists():
        return spec
    ref = ModelRef.parse(body)
    try:
        folder = Path(huggingface_hub.snapshot_download(ref.root, revision=ref.revision))
    except Exception as err:  # the hub's errors come in many types; hub_error names the fix for each
        raise hub_error(err, body, f"the files at revision {ref.revision}") from None
    return str(folder / (ref.subfolder or ""))


def hub_file(repo: str, filename: str, subfolder: str | None = None, *, spec: str | None = None,
             missing_ok: bool = False, revision: str | None = None) -> Path | None:
    """A hub file from the local cache or the hub (fetched once per process); an InputError naming the fix when it
    cannot be read, or None when the repository lacks it and `missing_ok`."""
    spec = spec or repo
    # the file as seen from `spec`: a spec that names a folder inside the repository already says where
    shown = f"{subfolder}/{filename}" if subfolder else filename
    inner = spec[len(repo) + 1:] if spec.startswith(f"{repo}/") else ""
    shown = shown[len(inner) + 1:] if inner and shown.startswith(f"{inner}/") else shown
    try:
        return Path(cached_download(repo, filename, subfolder, revision))
    except EntryNotFoundError as err:  # LocalEntryNotFoundError too: offline and not cached is not "absent"
        if missing_ok and not isinstance(err, LocalEntryNotFoundError):
            return None
        raise hub_error(err, spec, shown) from None
    except Exception as err:  # the hub's errors come in many types; hub_error names the fix for each
        raise hub_error(err, spec, shown) from None
