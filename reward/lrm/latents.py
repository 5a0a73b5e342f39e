"""VAE latents computed once per unique image and cached on disk, so training never holds or runs the VAE.

The cache stores each image's posterior (mean and std of the VAE's latent distribution), so training can draw a
fresh latent sample every step, as encoding per step would, without running the encoder again. Part files are
written atomically; a rerun encodes only the images no part holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import polars as pl
import torch

from lpo.curate import images as curate_images
from lpo.curate.errors import InputError
from lpo.reward.images import image_to_tensor

logger = logging.getLogger(__name__)

META_FILE = "cache.json"


def cache_dir(root: str | Path, vae_source: str, resolution: int) -> Path:
    """One cache per (VAE, resolution); other settings share it."""
    key = hashlib.blake2b(f"{vae_source}|{resolution}".encode(), digest_size=6).hexdigest()
    return Path(root) / f"vae-{key}-{resolution}px"


class LatentCache:
    """uid -> (mean, std) of the VAE posterior, stored in `part-*.safetensors` files under `directory`."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.index: dict[str, tuple[Path, int]] = {}
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}
        from safetensors import safe_open

        for part in sorted(self.directory.glob("part-*.safetensors")):
            with safe_open(part, framework="pt") as handle:
                uids = json.loads(handle.metadata()["uids"])
            self.index.update((uid, (part, row)) for row, uid in enumerate(uids))

    def __contains__(self, uid: str) -> bool:
        return uid in self.index

    def __len__(self) -> int:
        return len(self.index)

    def _part(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._loaded:
            from safetensors.torch import load_file

            self._loaded[path] = load_file(path)
        return self._loaded[path]

    def get(self, uids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked float32 (mean, std) for `uids`."""
        means, stds = [], []
        for uid in uids:
            path, row = self.index[uid]
            part = self._part(path)
            means.append(part["mean"][row])
            stds.append(part["std"][row])
        return torch.stack(means).float(), torch.stack(stds).float()

    def sample(self, uids: list[str], scaling_factor: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """A latent sample z = (mean + std * eps) * scaling_factor per uid."""
        mean, std = self.get(uids)
        eps = torch.randn(mean.shape, generator=generator)
        return (mean + std * eps) * scaling_factor

    def write_part(self, uids: list[str], mean: torch.Tensor, std: torch.Tensor) -> Path:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        digest = hashlib.blake2b("".join(uids).encode(), digest_size=6).hexdigest()
        path = self.directory / f"part-{len(list(self.directory.glob('part-*'))):06d}-{digest}.safetensors"
        fd, tmp = tempfile.mkstemp(prefix=".part-", suffix=".tmp", dir=self.directory)
        os.close(fd)
        save_file({"mean": mean.to(torch.float16).contiguous(), "std": std.to(torch.float16).contiguous()}, tmp,
                  metadata={"uids": json.dumps(uids)})
        os.replace(tmp, path)
        self.index.update((uid, (path, row)) for row, uid in enumerate(uids))
        return path


def build_cache(directory: Path, curation_dir: Path, uids: Iterable[str], vae_source: str, resolution: int,
                device: str = "cpu", batch_size: int = 16, subfolder: str | None = "vae",
                flush_every: int = 512) -> LatentCache:
    """Encode every uid not yet cached and return the cache; an image that cannot be decoded or found stays out of
    it (logged), so its pairs are left out by `only_encoded`."""
    cache = LatentCache(directory)
    todo = set(uids) - set(cache.index)
    failures: dict[str, str] = {}
    meta = {"vae": vae_source, "resolution": resolution}
    if directory.exists() and (directory / META_FILE).exists():
        if json.loads((directory / META_FILE).read_text()) != meta:
            raise InputError(f"latent cache {directory} was made with another VAE or resolution; delete it.")
    if not todo:
        return cache
    from diffusers import AutoencoderKL

    logger.info("encoding %d images with the VAE of %s at %d px (cached in %s)", len(todo), vae_source, resolution,
                directory)
    kwargs = {"subfolder": subfolder} if subfolder else {}
    vae = AutoencoderKL.from_pretrained(vae_source, **kwargs).to(device).eval()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).write_text(json.dumps(meta))
    pending: dict[str, list] = {"uids": [], "mean": [], "std": []}

    def flush() -> None:
        if pending["uids"]:
            cache.write_part(pending["uids"], torch.cat(pending["mean"]), torch.cat(pending["std"]))
            pending.update(uids=[], mean=[], std=[])

    batches = curate_images.prefetch(curate_images.iter_images(curation_dir, todo, batch_size, workers=2))
    with torch.inference_mode():
        for batch in batches:
            good = [i for i, image in enumerate(batch.images) if image is not None]
            failures.update((batch.uids[i], batch.errors[i]) for i in range(len(batch.uids)) if i not in good)
            if not good:
                continue
            pixels = torch.stack([image_to_tensor(batch.images[i], resolution) for i in good]).to(device, vae.dtype)
            posterior = vae.encode(pixels).latent_dist
            pending["uids"] += [batch.uids[i] for i in good]
            pending["mean"].append(posterior.mean.float().cpu())
            pending["std"].append(posterior.std.float().cpu())
            if len(pending["uids"]) >= flush_every:
                flush()
    flush()
    missing = todo - set(cache.index) - set(failures)
    failures.update((uid, "image not found in the curation directory") for uid in missing)
    if failures:
        uid, why = next(iter(failures.items()))
        logger.warning("%d images could not be encoded (e.g. %s: %s); their pairs are left out", len(failures), uid,
                       why)
    return cache


def pair_uids(pairs: pl.DataFrame) -> set[str]:
    """Every image uid of a pairs manifest."""
    return set(pairs["image_0_uid"]) | set(pairs["image_1_uid"])


def only_encoded(pairs: pl.DataFrame, cache: LatentCache) -> pl.DataFrame:
    """The pairs whose two images are both in the cache."""
    cached = list(cache.index)
    return pairs.filter(pl.col("image_0_uid").is_in(cached) & pl.col("image_1_uid").is_in(cached))
