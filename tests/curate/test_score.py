"""The scoring runner: each unique image once per metric, corrupt images, resume, and a 2-process sharded run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from lpo.core.errors import InputError
from lpo.curate import ingest, score, scorers
from lpo.curate.manifest import check_schema, scores_schema
from lpo.reward.toy.world import write_pickapic_parquet

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ingested toy dataset: 6 prompts, 24 images in 36 pairs, one image undecodable."""
    base = tmp_path_factory.mktemp("curated")
    source = write_pickapic_parquet(base / "src.parquet", num_prompts=6, corrupt_images=1, seed=11)
    ingest.run(ingest.IngestConfig(source=str(source), out=base / "dir", chunk_rows=10))
    return base / "dir"


def _fresh_copy(curated: Path, tmp_path: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(curated, work)
    return work


class CountingScorer:
    """Wraps a real scorer and records every image uid-free call, so tests can count model work."""

    def __init__(self, inner, fail_after_calls: int | None = None):
        self.inner = inner
        self.images_seen = 0
        self.calls = 0
        self.fail_after_calls = fail_after_calls

    def score(self, images, captions):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        self.images_seen += len(images)
        return self.inner.score(images, captions)


@pytest.fixture()
def counting(monkeypatch):
    made: list[CountingScorer] = []
    fail = {"after": None}
    real = scorers.load_scorer

    def load(metric, spec=None, **kwargs):
        wrapped = CountingScorer(real(metric, spec, **kwargs), fail["after"])
        made.append(wrapped)
        return wrapped

    monkeypatch.setattr(score, "load_scorer", load)
    return made, fail


def _config(work: Path, tiny: Path, metrics=("pickscore", "clip"), **kw) -> score.ScoreConfig:
    return score.ScoreConfig(work_dir=work, metrics=list(metrics), models_dir=tiny, device="cpu", **kw)


def test_every_unique_image_scored_once_per_metric(curated, tiny_models_dir, tmp_path, counting):
    made, _ = counting
    work = _fresh_copy(curated, tmp_path)
    score.run(_config(work, tiny_models_dir, metrics=scorers.CURATION_METRICS, batch_size=5))
    frame = pl.read_parquet(work / "scores.parquet")
    check_schema(work / "scores.parquet", scores_schema(scorers.CURATION_METRICS), "scores", strict_extra=True)
    pairs = pl.read_parquet(work / "pairs.parquet")
    unique = set(pairs["image_0_uid"]) | set(pairs["image_1_uid"])
    assert frame.height == len(unique) == frame["image_uid"].n_unique()
    assert len(unique) < 2 * pairs.height  # images repeat across pairs ...
    decodable = len(unique) - 1
    assert [s.images_seen for s in made] == [decodable] * len(scorers.CURATION_METRICS)  # ... but each is scored once
    broken = frame.filter(pl.col("error").is_not_null())
    assert broken.height == 1 and "undecodable image" in broken["error"][0]
    assert broken.select(scorers.CURATION_METRICS).null_count().row(0) == (1,) * len(scorers.CURATION_METRICS)
    scored = frame.filter(pl.col("error").is_null()).select(scorers.CURATION_METRICS)
    assert scored.null_count().sum_horizontal().item() == 0
    # a rerun has nothing left to score
    made.clear()
    report = score.run(_config(work, tiny_models_dir, metrics=scorers.CURATION_METRICS))
    assert made == [] and all(v["scored_now"] == 0 for v in report["metrics"].values())


def test_scores_equal_direct_scorer_calls(curated, tiny_models_dir, tmp_path):
    from PIL import Image

    work = _fresh_copy(curated, tmp_path)
    score.run(_config(work, tiny_models_dir, metrics=["clip"], batch_size=4))
    frame = pl.read_parquet(work / "scores.parquet").filter(pl.col("error").is_null()).head(3)
    images = pl.concat([pl.read_parquet(p) for p in ingest.image_parts(work)])
    direct = scorers.load_scorer("clip", str(tiny_models_dir / "clip"))
    for uid, value in zip(frame["image_uid"], frame["clip"]):
        row = images.filter(pl.col("image_uid") == uid).row(0, named=True)
        import io

        expected = direct.score([Image.open(io.BytesIO(row["image"])).convert("RGB")], [row["caption"]])[0]
        assert value == pytest.approx(float(expected), abs=1e-5)


def test_killed_run_resumes_without_rescoring_or_losing_work(curated, tiny_models_dir, tmp_path, counting):
    made, fail = counting
    clean = _fresh_copy(curated, tmp_path / "a")
    score.run(_config(clean, tiny_models_dir, batch_size=4, flush_every=4))
    expected = pl.read_parquet(clean / "scores.parquet")

    work = _fresh_copy(curated, tmp_path / "b")
    made.clear()
    fail["after"] = 2  # the pickscore model "dies" on its third batch
    with pytest.raises(KeyboardInterrupt):
        score.run(_config(work, tiny_models_dir, batch_size=4, flush_every=4))
    kept = score.scored_uids(work, "pickscore")
    assert len(kept) == 8  # the two finished batches were flushed to part files
    assert not (work / "scores.parquet").exists()

    made.clear()
    fail["after"] = None
    score.run(_config(work, tiny_models_dir, batch_size=4, flush_every=4))
    corrupt = set(expected.filter(pl.col("error").is_not_null())["image_uid"])
    remaining = set(expected["image_uid"]) - kept - corrupt
    assert made[0].images_seen == len(remaining)  # only what no part file held yet
    got = pl.read_parquet(work / "scores.parquet")
    assert got.select("image_uid", "error").to_dicts() == expected.select("image_uid", "error").to_dicts()
    for metric in ("pickscore", "clip"):
        assert got[metric].to_list() == pytest.approx(expected[metric].to_list(), abs=1e-5, nan_ok=True)


def test_bad_inputs_fail_before_any_model_loads(curated, tiny_models_dir, tmp_path, counting):
    made, _ = counting
    work = _fresh_copy(curated, tmp_path)
    with pytest.raises(InputError, match="unknown metric"):
        score.run(_config(work, tiny_models_dir, metrics=["pickscore", "hpsv3"]))
    with pytest.raises(InputError, match="not a curation directory"):
        score.run(_config(tmp_path / "nowhere", tiny_models_dir))
    with pytest.raises(InputError, match=str(tiny_models_dir / "sd15")):
        score.run(score.ScoreConfig(work_dir=work, metrics=["pickscore"],
                                    models={"pickscore": str(tiny_models_dir / "sd15")}))
    assert made == []


def test_scores_of_another_model_never_mix_into_a_metric(curated, tiny_models_dir, tmp_path, monkeypatch):
    """Each metric's scores record their model; a rerun naming the same model by another path spelling continues,
    one naming another model stops with exit-2 input error before any model loads, and nothing is rescored."""
    work = _fresh_copy(curated, tmp_path)
    report = score.run(_config(work, tiny_models_dir, metrics=["clip"]))
    model = str((tiny_models_dir / "clip").resolve())
    assert report["metrics"]["clip"]["model"] == model and score.recorded_model(work, "clip") == model
    before = sorted((work / "scores").rglob("part-*.parquet"))
    monkeypatch.chdir(tiny_models_dir)
    again = score.run(score.ScoreConfig(work_dir=work, metrics=["clip"], models={"clip": "./clip"}, device="cpu"))
    assert again["metrics"]["clip"] == {"scored_now": 0, "model": model}
    other = tmp_path / "other-clip"
    shutil.copytree(tiny_models_dir / "clip", other)
    monkeypatch.setattr(score, "load_scorer", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(InputError, match=f"were made with {model}, and this run asks for {other}"):
        score.run(score.ScoreConfig(work_dir=work, metrics=["clip"], models={"clip": str(other)}, device="cpu"))
    assert sorted((work / "scores").rglob("part-*.parquet")) == before


@pytest.mark.slow  # several processes (or a server) started: in the full run, not the quick loop
def test_two_process_sharded_run_matches_one_process(curated, tiny_models_dir, tmp_path):
    single = _fresh_copy(curated, tmp_path / "one")
    score.run(_config(single, tiny_models_dir))
    sharded = _fresh_copy(curated, tmp_path / "two")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # torchrun is what `accelerate launch --multi_gpu` starts on GPUs; on CPUs accelerate itself would need mpirun
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lpo", "curate", "score", str(sharded),
           "--metrics", "pickscore,clip", "--models-dir", str(tiny_models_dir), "--device", "cpu", "--batch-size", "4"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    parts = sorted(p.name for p in (sharded / "scores" / "pickscore").glob("part-*.parquet"))
    assert any("-r0000-" in p for p in parts) and any("-r0001-" in p for p in parts)  # both ranks did work
    per_rank = [set(pl.read_parquet(sharded / "scores" / "pickscore" / p)["image_uid"]) for p in parts]
    assert sum(len(s) for s in per_rank) == len(set().union(*per_rank))  # disjoint shards
    one, two = pl.read_parquet(single / "scores.parquet"), pl.read_parquet(sharded / "scores.parquet")
    assert one["image_uid"].to_list() == two["image_uid"].to_list()
    # the same images at another batch size (4 against 32) and thread count: float32 reductions in another order.
    # Scores are cosines of unit vectors (at most 1 in size) times at most exp(logit_scale) = 100: a relative
    # rounding of ~1e-7 per product over the tiny towers' widths stays below 1e-7 x 100 x 64 ~ 1e-5 absolute
    for metric in ("pickscore", "clip"):
        assert two[metric].to_list() == pytest.approx(one[metric].to_list(), abs=1e-5, nan_ok=True)
