"""VAE latents computed once per unique image and cached on disk, so training never holds or runs the VAE.

The cache stores each image's posterior (mean and std of the VAE's latent distribution, float16), so training can
draw a fresh latent sample every step, as encoding per step would, without running the encoder again.

- One cache per (VAE weights, resolution): its folder is named by a hash of the VAE's weights file, not its path,
  so runs that share `--latent-cache` (the demo's three LRMs, an ablation sweep, `lpo reward cache`) encode each
  image once.
- Built by every process together: each encodes the images of its shard (a stable hash of `image_uid`, as scoring
  does) and writes its own part files, atomically; a rerun encodes only the images no part holds.
- Read by row: a part file is a safetensors file whose header gives each tensor's offset, and a row is read with
  one positioned read. Nothing is memory-mapped or kept, so a process's resident memory does not grow with the
  cache: the processes of a node share the operating system's page cache instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import torch
from accelerate import PartialState
from accelerate.utils import InitProcessGroupKwargs
from diffusers import AutoencoderKL
from huggingface_hub import hf_hub_download
from safetensors.torch import save_file

from lpo.core.device import resolve_device
from lpo.core.errors import InputError
from lpo.core.files import write_text_atomic
from lpo.core.parts import Parts
from lpo.core.progress import progress
from lpo.core.refs import weight_args
from lpo.curate import images as curate_images
from lpo.curate.manifest import PAIRS_SCHEMA, check_schema, curation_dir_of, read_pairs
from lpo.curate.score import shard_of
from lpo.reward.backbones import family_of
from lpo.reward.backbones.family import base_resolution
from lpo.reward.images import image_to_tensor
from lpo.reward.lrm.config import RewardCacheConfig

logger = logging.getLogger(__name__)

META_FILE = "cache.json"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
HASH_CHUNK = 8 << 20
ROW_DTYPES = {"F16": np.float16, "F32": np.float32}


def vae_fingerprint(source: str, subfolder: str | None = None) -> str:
    """A hash of a VAE's config and weights files (a local folder or a hub id): the cache key follows the
    weights, whatever the path they are read from."""
    folder = Path(source) / (subfolder or "")
    if folder.is_dir():
        files = [folder / "config.json"] + [folder / name for name in WEIGHT_FILES if (folder / name).is_file()][:1]
    else:
        repo, where = weight_args(source, subfolder)
        variant = where.pop("variant", None)
        files = [Path(hf_hub_download(repo, "config.json", **where))]
        for name in WEIGHT_FILES:
            name = name.replace(".", f".{variant}.", 1) if variant else name
            try:
                files.append(Path(hf_hub_download(repo, name, **where)))
                break
            except Exception:  # the next format, or the VAE load reports it
                continue
    if len(files) < 2 or not all(f.is_file() for f in files):
        raise InputError(f"{folder} is not a diffusers VAE folder (config.json and {WEIGHT_FILES[0]}); pass the VAE "
                         "of a pipeline (its vae/) or a VAE repository.")
    digest = hashlib.blake2b(digest_size=8)
    for file in files:
        with open(file, "rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def cache_dir(root: str | Path, fingerprint: str, resolution: int) -> Path:
    """One cache per (VAE weights, resolution) under `root`; other settings share it."""
    return Path(root) / f"vae-{fingerprint}-{resolution}px"


@dataclass(frozen=True)
class _Part:
    """Where a part file's rows are: byte offset of each tensor's first row, and the bytes and shape of a row."""

    path: Path
    offsets: dict[str, int]
    row_bytes: int
    row_shape: tuple[int, ...]
    dtype: type


def _read_header(path: Path) -> tuple[_Part, list[str]]:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    uids = json.loads(header["__metadata__"]["uids"])
    mean, std = header["mean"], header["std"]
    if mean["shape"] != std["shape"] or mean["dtype"] != std["dtype"] or mean["dtype"] not in ROW_DTYPES:
        raise InputError(f"{path} is not a latent cache part (mean and std of one shape, float16 or float32); "
                         "delete it and build the cache again.")
    rows, *row_shape = mean["shape"]
    row_bytes = int(np.prod(row_shape)) * np.dtype(ROW_DTYPES[mean["dtype"]]).itemsize
    start = 8 + length
    part = _Part(path, {"mean": start + mean["data_offsets"][0], "std": start + std["data_offsets"][0]}, row_bytes,
                 tuple(row_shape), ROW_DTYPES[mean["dtype"]])
    return part, uids


class LatentCache:
    """uid -> (mean, std) of the VAE posterior, stored in `part-*.safetensors` files under `directory`."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.parts = Parts(self.directory, "part-*.safetensors", keys=lambda path: _read_header(path)[1])
        self.index: dict[str, tuple[_Part, int]] = {}  # what is done: every uid a part holds, and where
        self.refresh()

    def refresh(self) -> LatentCache:
        """Index the part files on disk (those other processes wrote too); reads headers only."""
        for path in self.parts.paths():
            part, uids = _read_header(path)
            self.index.update((uid, (part, row)) for row, uid in enumerate(uids))
        return self

    def __contains__(self, uid: str) -> bool:
        return uid in self.index

    def __len__(self) -> int:
        return len(self.index)

    def get(self, uids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked float32 (mean, std) for `uids`, each row read from its part file."""
        out = {"mean": [], "std": []}
        by_part: dict[Path, list[tuple[int, int]]] = {}
        for position, uid in enumerate(uids):
            part, row = self.index[uid]
            by_part.setdefault(part.path, []).append((position, row))
        rows: dict[int, dict[str, np.ndarray]] = {}
        for path, wanted in by_part.items():
            part = self.index[uids[wanted[0][0]]][0]
            fd = os.open(path, os.O_RDONLY)
            try:
                for position, row in wanted:
                    rows[position] = {name: np.frombuffer(os.pread(fd, part.row_bytes, offset + row * part.row_bytes),
                                                          dtype=part.dtype).reshape(part.row_shape)
                                      for name, offset in part.offsets.items()}
            finally:
                os.close(fd)
        for position in range(len(uids)):
            for name in out:
                out[name].append(torch.from_numpy(rows[position][name].copy()))
        return torch.stack(out["mean"]).float(), torch.stack(out["std"]).float()

    def sample(self, uids: list[str], generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw z = mean + std * eps of each uid's VAE posterior (unscaled: `LatentRewardModel.to_latents` maps it
        into the denoiser's latent space)."""
        mean, std = self.get(uids)
        eps = torch.randn(mean.shape, generator=generator)
        return mean + std * eps

    def write_part(self, uids: list[str], mean: torch.Tensor, std: torch.Tensor, rank: int = 0) -> Path:
        """Write one part file atomically (a temp file, then a rename); its name is unique to its rank and uids."""

        digest = hashlib.blake2b("\n".join(uids).encode(), digest_size=8).hexdigest()
        path = self.directory / f"part-r{rank:03d}-{digest}.safetensors"
        with self.parts.writing(path.name) as tmp:
            save_file({"mean": mean.to(torch.float16).contiguous(), "std": std.to(torch.float16).contiguous()}, tmp,
                      metadata={"uids": json.dumps(uids)})
        part, _ = _read_header(path)
        self.index.update((uid, (part, row)) for row, uid in enumerate(uids))
        return path


def check_meta(directory: Path, meta: dict) -> None:
    """A cache folder holds one VAE's latents at one resolution: refuse another's, and record it."""
    path = directory / META_FILE
    if path.is_file():
        found = json.loads(path.read_text())
        if {k: found.get(k) for k in ("vae_fingerprint", "resolution")} != \
                {k: meta.get(k) for k in ("vae_fingerprint", "resolution")}:
            raise InputError(f"latent cache {directory} was made with another VAE or resolution ({found}); delete "
                             "it or pass another --latent-cache.")
        return

    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(meta, indent=2) + "\n", path)


def build_cache(root: Path, sources: dict[Path, set[str]], vae_source: str, resolution: int,
                device: str = "cpu", batch_size: int = 16, subfolder: str | None = "vae", flush_every: int = 512,
                rank: int = 0, world: int = 1) -> LatentCache:
    """Encode the images of this process's shard that no part holds, from each curation directory of `sources`
    (curation dir -> uids), into the cache of this VAE and resolution under `root`, and return the cache as this
    process sees it (call `refresh` once every process is done). An image that cannot be decoded or found stays
    out of it (logged), so its pairs are left out by `only_encoded`."""
    fingerprint = vae_fingerprint(vae_source, subfolder)
    directory = cache_dir(root, fingerprint, resolution)
    check_meta(directory, {"vae": vae_source, "vae_subfolder": subfolder, "resolution": resolution,
                           "vae_fingerprint": fingerprint})
    cache = LatentCache(directory)
    todo = {curation_dir: {u for u in uids if u not in cache and shard_of(u, world) == rank}
            for curation_dir, uids in sources.items()}
    if not any(todo.values()):
        return cache

    count = sum(len(uids) for uids in todo.values())
    logger.info("encoding %d images with the VAE of %s at %d px on process %d of %d (cached in %s)", count,
                vae_source, resolution, rank, world, directory)
    source, where = weight_args(vae_source, subfolder)
    vae = AutoencoderKL.from_pretrained(source, **where).to(device).eval()
    pending: dict[str, list] = {"uids": [], "mean": [], "std": []}
    failures: dict[str, str] = {}

    def flush() -> None:
        if pending["uids"]:
            cache.write_part(pending["uids"], torch.cat(pending["mean"]), torch.cat(pending["std"]), rank)
            pending.update(uids=[], mean=[], std=[])

    with torch.inference_mode(), progress(f"VAE latents (process {rank})", count, unit="images") as tracker:
        for curation_dir, uids in todo.items():
            for batch in curate_images.prefetch(curate_images.iter_images(curation_dir, uids, batch_size, workers=2)):
                tracker.advance(len(batch.uids))
                good = [i for i, image in enumerate(batch.images) if image is not None]
                failures.update((batch.uids[i], batch.errors[i]) for i in range(len(batch.uids)) if i not in good)
                if not good:
                    continue
                pixels = torch.stack([image_to_tensor(batch.images[i], resolution) for i in good])
                posterior = vae.encode(pixels.to(device, vae.dtype)).latent_dist
                pending["uids"] += [batch.uids[i] for i in good]
                pending["mean"].append(posterior.mean.float().cpu())
                pending["std"].append(posterior.std.float().cpu())
                if len(pending["uids"]) >= flush_every:
                    flush()
    flush()
    missing = set().union(*todo.values()) - set(cache.index) - set(failures)
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


def manifest_sources(manifests: Iterable[Path]) -> dict[Path, set[str]]:
    """Curation directory -> the uids of the usable pairs of each manifest that lives there."""

    sources: dict[Path, set[str]] = {}
    for manifest in manifests:
        pairs = read_pairs(manifest)
        sources.setdefault(curation_dir_of(manifest), set()).update(pair_uids(pairs))
    return sources


def run(config: RewardCacheConfig) -> dict:
    """`lpo reward cache`: encode the images of the manifests once, every process its shard, into the cache of the
    base's VAE (or `--vae`) and resolution under `config.out`; `lpo reward train --latent-cache` reuses it."""

    if not config.manifests or not config.base or not config.out:
        raise InputError("--manifest (one or more), --base and --out are required.")
    for manifest in config.manifests:
        check_schema(manifest, PAIRS_SCHEMA, "pairs")
    if config.batch_size < 1:
        raise InputError("--batch-size must be at least 1.")
    family = family_of(config.base)
    resolution = base_resolution(config.base, family, config.resolution, config.vae)
    vae_source, subfolder = (config.vae, None) if config.vae else (config.base, "vae")
    sources = manifest_sources(config.manifests)
    kwargs = InitProcessGroupKwargs(timeout=timedelta(minutes=config.timeout_minutes)).to_kwargs()
    state = PartialState(cpu=config.device == "cpu", **kwargs)
    device = str(state.device) if state.num_processes > 1 or config.device == "auto" else resolve_device(config.device)
    wanted = set().union(*sources.values())
    directory = cache_dir(Path(config.out), vae_fingerprint(vae_source, subfolder), resolution)
    already = len(wanted & set(LatentCache(directory).index))
    cache = build_cache(Path(config.out), sources, vae_source, resolution, device=device, batch_size=config.batch_size,
                        subfolder=subfolder, rank=state.process_index, world=state.num_processes)
    state.wait_for_everyone()
    cached = len(wanted & set(cache.refresh().index))
    return {"directory": str(cache.directory), "images": len(wanted), "cached": cached,
            "encoded_now": cached - already, "processes": state.num_processes, "resolution": resolution}
