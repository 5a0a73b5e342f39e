"""Ingest: every source kind, schema errors, bad rows, dedup of images and resume after an interruption."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lpo.core.errors import InputError
from lpo.curate import ingest
from lpo.curate.manifest import IMAGES_SCHEMA, PAIRS_SCHEMA, check_schema
from lpo.reward.toy.world import make_pickapic_table


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "train-00000-of-00001.parquet"
    path.parent.mkdir()
    pq.write_table(make_pickapic_table(num_prompts=10, seed=3), path)
    return path


def _images(out: Path) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(p) for p in ingest.image_parts(out)]).sort("image_uid")


def test_parquet_ingest_writes_pairs_and_unique_images(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "cur"
    summary = ingest.run(ingest.IngestConfig(source=str(source), out=out, chunk_rows=7))
    table = pq.read_table(source)
    pairs = pl.read_parquet(out / "pairs.parquet")
    check_schema(out / "pairs.parquet", PAIRS_SCHEMA, "pairs", strict_extra=True)
    for part in ingest.image_parts(out):
        check_schema(part, IMAGES_SCHEMA, "images", strict_extra=True)
    assert summary.pairs == pairs.height == table.num_rows
    uids = set(table.column("image_0_uid").to_pylist()) | set(table.column("image_1_uid").to_pylist())
    images = _images(out)
    assert summary.unique_images == images.height == len(uids)  # each image stored once
    assert images["image_uid"].n_unique() == images.height
    # bytes round-trip: the stored image is the source's
    src = pl.from_arrow(table)
    first = src.row(0, named=True)
    stored = dict(zip(images["image_uid"], images["image"]))
    assert stored[first["image_0_uid"]] == first["jpg_0"]
    # labels -> winner / tie, independently of the implementation
    for row, pair in zip(src.iter_rows(named=True), pairs.iter_rows(named=True)):
        assert pair["is_tie"] == (row["label_0"] == row["label_1"] == 0.5)
        expected = None if pair["is_tie"] else (0 if row["label_0"] > row["label_1"] else 1)
        assert pair["winner"] == expected
        assert pair["num_example_per_prompt"] == row["num_example_per_prompt"]
    assert pairs["pair_id"].n_unique() == pairs.height


def test_directory_and_save_to_disk_sources_give_the_same_pairs(source: Path, tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    by_file = ingest.run(ingest.IngestConfig(source=str(source), out=tmp_path / "a"))
    by_dir = ingest.run(ingest.IngestConfig(source=str(source.parent), out=tmp_path / "b"))
    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset(pq.read_table(source))}).save_to_disk(str(saved))
    by_saved = ingest.run(ingest.IngestConfig(source=str(saved), out=tmp_path / "c"))
    columns = ["pair_id", "image_0_uid", "image_1_uid", "winner", "is_tie"]
    frames = [pl.read_parquet(tmp_path / d / "pairs.parquet").select(columns) for d in "abc"]
    assert frames[0].equals(frames[1]) and frames[0].equals(frames[2])
    assert by_file.unique_images == by_dir.unique_images == by_saved.unique_images
    with pytest.raises(InputError, match="no split 'validation'"):
        ingest.run(ingest.IngestConfig(source=str(saved), out=tmp_path / "d", split="validation"))


def test_limit_reads_only_that_many_rows(source: Path, tmp_path: Path) -> None:
    summary = ingest.run(ingest.IngestConfig(source=str(source), out=tmp_path / "cur", limit=13, chunk_rows=5))
    assert summary.rows_read == 13
    assert pl.read_parquet(tmp_path / "cur" / "pairs.parquet").height == 13


def test_missing_column_is_an_input_error_naming_file_and_column(tmp_path: Path) -> None:
    table = make_pickapic_table(num_prompts=2).drop_columns(["label_1"])
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    with pytest.raises(InputError) as err:
        ingest.run(ingest.IngestConfig(source=str(path), out=tmp_path / "cur"))
    assert "label_1" in str(err.value) and str(path) in str(err.value)
    assert not (tmp_path / "cur").exists()  # nothing written on a run-level error


def test_bad_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    table = make_pickapic_table(num_prompts=3, seed=1)
    rows = table.to_pylist()
    rows[0]["caption"] = "  "
    rows[1]["image_1_uid"] = rows[1]["image_0_uid"]
    rows[2]["jpg_0"] = None
    rows[3]["label_0"] = rows[3]["label_1"] = 0.0  # no decision: kept as an unlabelled pair
    rows.append(dict(rows[5]))  # an exact duplicate row
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    summary = ingest.run(ingest.IngestConfig(source=str(path), out=tmp_path / "cur"))
    assert dict(summary.skipped) == {"empty_caption": 1, "same_image": 1, "missing_image": 1, "duplicate_pair": 1}
    pairs = pl.read_parquet(tmp_path / "cur" / "pairs.parquet")
    assert pairs.height == len(rows) - 4
    unlabelled = pairs.filter(pl.col("image_0_uid") == rows[3]["image_0_uid"],
                              pl.col("image_1_uid") == rows[3]["image_1_uid"])
    assert unlabelled["winner"].to_list() == [None] and unlabelled["is_tie"].to_list() == [False]


def test_interrupted_ingest_resumes_to_identical_output(source: Path, tmp_path: Path, monkeypatch) -> None:
    clean = tmp_path / "clean"
    ingest.run(ingest.IngestConfig(source=str(source), out=clean, chunk_rows=8))

    original = ingest.ParquetSource.batches

    def dies_after_three(self, skip, batch_rows):
        for i, batch in enumerate(original(self, skip, batch_rows)):
            if i == 3:
                raise KeyboardInterrupt
            yield batch

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(ingest.ParquetSource, "batches", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        ingest.run(ingest.IngestConfig(source=str(source), out=resumed, chunk_rows=8))
    assert not (resumed / "pairs.parquet").exists()
    assert len(list((resumed / "ingest").glob("pairs-*.parquet"))) == 3
    monkeypatch.setattr(ingest.ParquetSource, "batches", original)
    ingest.run(ingest.IngestConfig(source=str(source), out=resumed, chunk_rows=8))
    assert pl.read_parquet(clean / "pairs.parquet").equals(pl.read_parquet(resumed / "pairs.parquet"))
    assert _images(clean).equals(_images(resumed))
    # a finished ingest reruns as a no-op; a different source into the same directory is refused
    ingest.run(ingest.IngestConfig(source=str(source), out=resumed, chunk_rows=8))
    assert pl.read_parquet(resumed / "pairs.parquet").height == pq.read_metadata(source).num_rows
    with pytest.raises(InputError, match="holds an ingest of"):
        ingest.run(ingest.IngestConfig(source=str(source), out=resumed, chunk_rows=8, limit=5))


def test_unknown_source_is_an_input_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="could not open 'no-such-org/no-such-dataset'"):
        ingest.run(ingest.IngestConfig(source="no-such-org/no-such-dataset", out=tmp_path / "cur"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no parquet files"):
        ingest.run(ingest.IngestConfig(source=str(empty), out=tmp_path / "cur"))


def test_check_schema_names_the_column_and_type(tmp_path: Path) -> None:
    path = tmp_path / "pairs.parquet"
    frame = pl.from_arrow(PAIRS_SCHEMA.empty_table()).with_columns(pl.col("winner").cast(pl.String))
    frame.write_parquet(path)
    with pytest.raises(InputError) as err:
        check_schema(path, PAIRS_SCHEMA, "pairs")
    expected = PAIRS_SCHEMA.field("winner").type
    assert f"column 'winner' has type large_string, expected {expected}" in str(err.value)
    assert str(path) in str(err.value)
    pl.from_arrow(PAIRS_SCHEMA.empty_table()).drop("caption").write_parquet(path)
    with pytest.raises(InputError, match=f"lacks column 'caption' \\(expected {PAIRS_SCHEMA.field('caption').type}"):
        check_schema(path, PAIRS_SCHEMA, "pairs")
    pl.from_arrow(PAIRS_SCHEMA.empty_table()).write_parquet(path)
    check_schema(path, PAIRS_SCHEMA, "pairs")  # the schema itself passes
