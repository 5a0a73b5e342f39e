"""Model references: the one answer to "is this a local folder or a hub id?", and the one translation of hub errors
into messages that name the fix.

A reference is a local path when it exists or reads as one (it starts with `/`, `./`, `../` or `~`, or holds a
backslash); otherwise it is a hub repository, `owner/repo`, optionally with a folder inside it,
`owner/repo/sub/folder` (the layout of released checkpoints such as `casiatao/LPO/lpo_sd15_merge/unet`). Hub files
are fetched once per process: a second read of the same file does not ask the hub again.
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

    @classmethod
    def parse(cls, spec: str | Path) -> ModelRef:
        spec = str(spec)
        path = Path(spec).expanduser()
        if path.exists() or is_path_like(spec):
            return cls(spec, str(path), None, True)
        parts = spec.strip("/").split("/")
        if len(parts) < 2 or not all(parts):
            raise InputError(f"{spec} is neither an existing folder nor a hub id (owner/repo, or "
                             "owner/repo/sub/folder for a folder inside a repository).")
        return cls(spec, "/".join(parts[:2]), "/".join(parts[2:]) or None, False)

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
        return hub_file(self.root, filename, self.inside(folder or None), spec=self.spec, missing_ok=not required)

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


_FETCHED: dict[tuple[str, str, str | None], str] = {}


def cached_download(repo: str, filename: str, subfolder: str | None = None) -> str:
    """`hf_hub_download`, asked once per process for each file while its local copy exists (a failure is not
    remembered)."""
    key = (repo, filename, subfolder)
    path = _FETCHED.get(key)
    if path is None or not os.path.exists(path):
        path = _FETCHED[key] = huggingface_hub.hf_hub_download(repo, filename, subfolder=subfolder)
    return path


def forget_downloads() -> None:
    """Ask the hub again for every file (a test that fakes the hub starts from here)."""
    _FETCHED.clear()


def hub_file(repo: str, filename: str, subfolder: str | None = None, *, spec: str | None = None,
             missing_ok: bool = False) -> Path | None:
    """A hub file from the local cache or the hub (fetched once per process); an InputError naming the fix when it
    cannot be read, or None when the repository lacks it and `missing_ok`."""
    spec = spec or repo
    # the file as seen from `spec`: a spec that names a folder inside the repository already says where
    shown = f"{subfolder}/{filename}" if subfolder else filename
    inner = spec[len(repo) + 1:] if spec.startswith(f"{repo}/") else ""
    shown = shown[len(inner) + 1:] if inner and shown.startswith(f"{inner}/") else shown
    try:
        return Path(cached_download(repo, filename, subfolder))
    except EntryNotFoundError as err:  # LocalEntryNotFoundError too: offline and not cached is not "absent"
        if missing_ok and not isinstance(err, LocalEntryNotFoundError):
            return None
        raise hub_error(err, spec, shown) from None
    except Exception as err:  # the hub's errors come in many types; hub_error names the fix for each
        raise hub_error(err, spec, shown) from None
