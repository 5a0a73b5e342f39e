"""`lpo reward eval` against a computation by hand on six pairs, two of them ties: diffusers' own VAE encode (the
posterior stored at the cache's float16), each pair's seeded draws, the exported scheduler's add_noise, the LRM's
score, and the label rule written out (the winner scored higher: 1; a tie: 0.5 whichever image scores higher). The
per-pair table and the timestep-blind control are checked the same way."""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from lpo.curate import ingest
from lpo.reward.lrm import accuracy
from lpo.reward.lrm.config import RewardEvalConfig
from lpo.reward.toy.world import make_pickapic_table

SEED, LEVELS, TOLD = 7, [1, 501], 1


@pytest.fixture(scope="module")
def six_pairs(tmp_path_factory) -> Path:
    """One prompt's six pairs; pairs 1 and 4 relabelled as ties (the world makes oracle-equal pairs ties too)."""
    import pyarrow as pa

    base = tmp_path_factory.mktemp("six")
    table = make_pickapic_table(1, flip_rate=0.0, tie_rate=0.0, seed=5)
    assert table.num_rows == 6
    half = pa.array([0.5 if i in (1, 4) else None for i in range(6)], pa.float64())
    for name in ("label_0", "label_1"):
        column = table[name].combine_chunks()
        table = table.set_column(table.schema.get_field_index(name), name, pc.if_else(pc.is_null(half), column, half))
    pq.write_table(table, base / "src.parquet")
    ingest.run(ingest.IngestConfig(source=str(base / "src.parquet"), out=base / "cur"))
    return base / "cur"


@pytest.fixture(scope="module")
def lrm_dir(tiny_models_dir, tmp_path_factory) -> Path:
    from lpo.reward.lrm.model import LatentRewardModel, export_components

    directory = tmp_path_factory.mktemp("lrm")
    torch.manual_seed(3)
    LatentRewardModel.from_base(str(tiny_models_dir / "sd15"), text_projection_init=None).save_pretrained(directory)
    export_components(directory, str(tiny_models_dir / "sd15"))
    return directory


def _by_hand(curation: Path, lrm_dir: Path) -> dict[tuple[int, bool], list[float]]:
    """(level, blind) -> each pair's correctness, computed without the toolkit's evaluation code (the pair's seeded
    draws come from `pair_noise`, the one source of them)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from PIL import Image
    from torchvision.transforms import functional as TF

    from lpo.reward.lrm.model import LatentRewardModel

    model = LatentRewardModel.from_pretrained(lrm_dir).eval()
    vae = AutoencoderKL.from_pretrained(lrm_dir / "vae")  # a folder: diffusers would prefer the root's weights.eval()
    scheduler = DDPMScheduler.from_pretrained(lrm_dir / "scheduler")
    pairs = pl.read_parquet(curation / "pairs.parquet")
    images = pl.concat([pl.read_parquet(p) for p in ingest.image_parts(curation)])
    data = dict(zip(images["image_uid"].to_list(), images["image"].to_list()))
    side = model.config.resolution

    def posterior(uid):
        pixels = TF.to_tensor(Image.open(io.BytesIO(data[uid])).convert("RGB").resize((side, side), Image.BILINEAR))
        dist = vae.encode(pixels[None] * 2 - 1).latent_dist
        return dist.mean[0].half().float(), dist.std[0].half().float()  # the cache keeps float16

    out = {}
    with torch.no_grad():
        for level in LEVELS:
            for blind in (False, True):
                correct = []
                for index, row in enumerate(pairs.iter_rows(named=True)):
                    (m0, s0), (m1, s1) = posterior(row["image_0_uid"]), posterior(row["image_1_uid"])
                    eps, noise = accuracy.pair_noise(SEED, level, index, tuple(m0.shape))
                    latents = torch.stack([m0 + s0 * eps[0], m1 + s1 * eps[1]]) * vae.config.scaling_factor
                    steps = torch.tensor([level, level])
                    noisy = scheduler.add_noise(latents, noise, steps)
                    told = torch.tensor([TOLD, TOLD]) if blind else steps
                    score_0, score_1 = model.score(noisy, told, [row["caption"]] * 2).tolist()
                    if row["is_tie"]:
                        correct.append(0.5 if score_0 != score_1 else 0.0)
                    else:
                        correct.append(float((score_0 > score_1) if row["winner"] == 0 else (score_1 > score_0)))
                out[(level, blind)] = correct
    return out


def test_accuracy_and_per_pair_correctness_equal_a_computation_by_hand(six_pairs, lrm_dir, tmp_path) -> None:
    pairs = pl.read_parquet(six_pairs / "pairs.parquet")
    ties = pairs["is_tie"].to_list()
    assert ties[1] and ties[4] and not all(ties)  # the two relabelled (and any the oracle calls equal)
    result = accuracy.run(RewardEvalConfig(lrm=lrm_dir, manifest=six_pairs / "pairs.parquet", out=tmp_path / "eval",
                                           timesteps=LEVELS, seed=SEED, blind_timestep=TOLD, batch_size=4,
                                           device="cpu"))
    expected = _by_hand(six_pairs, lrm_dir)
    assert result["pairs"] == 6
    for level in LEVELS:
        assert result["accuracy"][str(level)] == pytest.approx(sum(expected[(level, False)]) / 6, abs=1e-12)
        assert result["accuracy_blind"][str(level)] == pytest.approx(sum(expected[(level, True)]) / 6, abs=1e-12)
    table = pl.read_parquet(tmp_path / "eval" / accuracy.PER_PAIR_FILE)
    assert table.height == 6 * len(LEVELS) * 2
    for (level, blind), values in expected.items():
        rows = table.filter((pl.col("timestep") == float(level)) & (pl.col("blind") == blind))
        assert rows["pair_id"].to_list() == pairs["pair_id"].to_list()
        assert rows["correct"].to_list() == values
        assert set(rows["told_timestep"].to_list()) == {float(TOLD if blind else level)}
    # the ties earn a half each wherever the two images' scores differ, and at t=1 told t=1 is the LRM itself
    assert {expected[(1, False)][i] for i in (1, 4)} == {0.5}
    assert expected[(1, True)] == expected[(1, False)]
    assert len({v for key, values in expected.items() for v in values}) >= 2  # the pairs tell right from wrong
