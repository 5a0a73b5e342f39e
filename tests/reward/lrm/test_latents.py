"""The VAE-latent cache: rows read back as written, resident memory bounded whatever the cache's size, one cache per
VAE weights (not path), and a 2-process build that encodes each image exactly once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lpo.core.errors import InputError
from lpo.curate import ingest
from lpo.reward.lrm.latents import LatentCache, build_cache, cache_dir, check_meta, vae_fingerprint
from lpo.reward.toy.world import write_pickapic_parquet

REPO = Path(__file__).resolve().parents[3]


def test_rows_read_back_as_written(tmp_path: Path) -> None:
    cache = LatentCache(tmp_path)
    generator = torch.Generator().manual_seed(0)
    written = {}
    for part in range(3):
        uids = [f"img{part}-{i}" for i in range(5)]
        mean, std = torch.randn(5, 4, 3, 3, generator=generator), torch.rand(5, 4, 3, 3, generator=generator)
        cache.write_part(uids, mean, std, rank=part % 2)
        written.update({u: (m.half().float(), s.half().float()) for u, m, s in zip(uids, mean, std)})
    reread = LatentCache(tmp_path)  # a fresh process's view: headers only
    order = ["img2-4", "img0-0", "img1-3", "img0-0", "img2-1"]
    mean, std = reread.get(order)
    assert mean.dtype == torch.float32 and mean.shape == (5, 4, 3, 3)
    for row, uid in enumerate(order):
        assert torch.equal(mean[row], written[uid][0]) and torch.equal(std[row], written[uid][1])
    draw = reread.sample(order[:2], torch.Generator().manual_seed(1))
    eps = torch.randn((2, 4, 3, 3), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(draw, mean[:2] + std[:2] * eps)


READER = """
import sys, time
from lpo.reward.lrm.latents import LatentCache

def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024

cache = LatentCache(sys.argv[1])
uids = list(cache.index)
cache.get(uids[:64])  # warm the allocator with one batch
before = rss()
for _ in range(3):  # every entry, three times
    for start in range(0, len(uids), 64):
        cache.get(uids[start:start + 64])
print(before, rss())
"""


@pytest.mark.slow  # several processes (or a server) started: in the full run, not the quick loop
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from /proc")
def test_resident_memory_does_not_grow_with_the_cache(tmp_path: Path) -> None:
    writer = textwrap.dedent("""
        import sys, torch
        from lpo.reward.lrm.latents import LatentCache
        cache = LatentCache(sys.argv[1])
        for part in range(8):
            uids = [f"img{part}-{i}" for i in range(256)]
            cache.write_part(uids, torch.randn(256, 4, 64, 64), torch.rand(256, 4, 64, 64))
    """)
    subprocess.run([sys.executable, "-c", writer, str(tmp_path)], check=True, timeout=300)
    size = sum(p.stat().st_size for p in tmp_path.glob("part-*"))
    assert size > 128e6  # 2048 SD1.5-sized entries (mean and std, 4x64x64 in float16)
    result = subprocess.run([sys.executable, "-c", READER, str(tmp_path)], check=True, capture_output=True,
                            text=True, timeout=300)
    before, after = map(int, result.stdout.split())
    budget = 32e6  # a quarter of the cache
    grew = (after - before) / 1e6
    assert after - before < budget, f"resident memory grew by {grew:.0f} MB reading {size / 1e6:.0f} MB"


def test_a_cache_is_keyed_by_the_vae_weights_not_its_path(tiny_models_dir: Path, tmp_path: Path) -> None:
    base = tiny_models_dir / "sd15"
    copy = tmp_path / "copy"
    shutil.copytree(base / "vae", copy)
    assert vae_fingerprint(str(base), "vae") == vae_fingerprint(str(copy))
    from diffusers import AutoencoderKL

    changed = AutoencoderKL.from_pretrained(copy)
    with torch.no_grad():
        changed.encoder.conv_in.weight.add_(1.0)
    changed.save_pretrained(tmp_path / "changed")
    assert vae_fingerprint(str(tmp_path / "changed")) != vae_fingerprint(str(base), "vae")
    check_meta(tmp_path / "cache", {"vae_fingerprint": "a", "resolution": 64})
    with pytest.raises(InputError, match="another VAE or resolution"):
        check_meta(tmp_path / "cache", {"vae_fingerprint": "b", "resolution": 64})
    with pytest.raises(InputError, match="not a diffusers VAE folder"):
        vae_fingerprint(str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("cached")
    source = write_pickapic_parquet(base / "src.parquet", num_prompts=4, flip_rate=0.0, corrupt_images=0, seed=5)
    ingest.run(ingest.IngestConfig(source=str(source), out=base / "cur"))
    return base / "cur" / "pairs.parquet"


@pytest.mark.slow  # several processes (or a server) started: in the full run, not the quick loop
def test_two_processes_encode_each_image_exactly_once(curated: Path, tiny_models_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    base = str(tiny_models_dir / "sd15")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lpo",
           "reward", "cache", "--manifest", str(curated), "--base", base, "--out", str(tmp_path / "two"),
           "--device", "cpu"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    directory = cache_dir(tmp_path / "two", vae_fingerprint(base, "vae"), 64)
    per_part = {}
    for part in sorted(directory.glob("part-*.safetensors")):
        from safetensors import safe_open

        with safe_open(part, framework="pt") as handle:
            per_part[part.name] = json.loads(handle.metadata()["uids"])
    every = [uid for uids in per_part.values() for uid in uids]
    assert len(every) == len(set(every)) == 16  # 4 prompts x 4 images, each encoded by one process
    assert {name.split("-")[1] for name in per_part} == {"r000", "r001"}  # both processes took a share
    from lpo.reward.lrm.latents import manifest_sources

    one = build_cache(tmp_path / "one", manifest_sources([curated]), base, 64)
    two = LatentCache(directory)
    order = sorted(every)
    for a, b in zip(one.get(order), two.get(order)):
        # float16 rows of the same images encoded in other batches: float32 values a rounding apart may be stored one
        # float16 step apart, 2^-10 of the value; near zero the float32 sums themselves differ by their rounding,
        # about 2^-23 of their terms (of order 1 to 10 here): 1e-6
        torch.testing.assert_close(a, b, rtol=2**-10, atol=1e-6)
