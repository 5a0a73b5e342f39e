"""Curation at Pick-a-Pic v2 scale: ingest and MPCF-filter synthetic pairs without image bytes; peak memory.

    python bench/bench_curation_scale.py [--pairs 1000000] [--small 250000] [--chunk-rows 50000]

For each size (--small, then --pairs) a fresh process runs, on a Pick-a-Pic-schema parquet whose `jpg_0`/`jpg_1` are
empty (2 pairs per caption over 3 images, 15% ties, 5% unlabelled): `lpo curate` ingest, a scores table for every
image as `lpo curate score` writes it (the models are not the subject here), and the MPCF filter that writes the
filtered and rejected manifests. Printed per size: seconds and peak resident memory of each stage, and the bytes of
the manifests' own columns in memory (pairs.parquet; filtered + rejected, which hold the pairs with their scores and
gaps). Then the growth of each stage's peak between the two sizes against the growth of those columns: a stage
whose memory follows the manifest grows by about 1-3x the columns it holds; one that kept per-pair Python objects or
copies would grow by many times that.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

METRICS = ("pickscore", "clip", "vqa")


def write_source(path: Path, n_pairs: int, seed: int = 0, rows_per_group: int = 100_000) -> None:
    """n_pairs pairs in Pick-a-Pic's columns, 2 per caption over 3 images, written in row groups."""
    rng = np.random.default_rng(seed)
    schema = pa.schema([("caption", pa.string()), ("image_0_uid", pa.string()), ("image_1_uid", pa.string()),
                        ("label_0", pa.float64()), ("label_1", pa.float64()), ("jpg_0", pa.binary()),
                        ("jpg_1", pa.binary()), ("num_example_per_prompt", pa.int64())])
    with pq.ParquetWriter(path, schema) as writer:
        for first in range(0, n_pairs, rows_per_group):
            rows = np.arange(first, min(n_pairs, first + rows_per_group))
            caption, second = rows // 2, rows % 2
            image_0 = 3 * caption + second
            kind = rng.random(len(rows))
            label_0 = np.where(kind < 0.15, 0.5, np.where(kind < 0.2, 0.0, np.where(kind < 0.6, 1.0, 0.0)))
            label_1 = np.where(kind < 0.15, 0.5, np.where(kind < 0.2, 0.0, np.where(kind < 0.6, 0.0, 1.0)))
            writer.write_table(pa.table({
                "caption": [f"prompt {c} of the synthetic scale benchmark" for c in caption],
                "image_0_uid": [f"{i:08x}-5eed-4a11-9c0d-{i:012x}" for i in image_0],
                "image_1_uid": [f"{i:08x}-5eed-4a11-9c0d-{i:012x}" for i in image_0 + 1],
                "label_0": label_0, "label_1": label_1,
                "jpg_0": pa.array([b""] * len(rows), pa.binary()), "jpg_1": pa.array([b""] * len(rows), pa.binary()),
                "num_example_per_prompt": np.ones(len(rows), dtype=np.int64),
            }, schema=schema))


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); False where that is not possible."""
    try:
        Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    status = Path(f"/proc/{os.getpid()}/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(source: Path, work: Path, chunk_rows: int) -> dict:
    """Ingest, score table, filter; each stage's seconds and peak RSS (MB)."""
    from lpo.curate import ingest, mpcf, score
    from lpo.curate.filter import filter_dir
    from lpo.curate.manifest import scores_schema, write_atomic

    stages = {}
    resettable = _reset_peak()
    start = time.perf_counter()
    summary = ingest.run(ingest.IngestConfig(source=str(source), out=work, chunk_rows=chunk_rows))
    stages["ingest"] = {"s": time.perf_counter() - start, "peak_mb": _peak_mb()}

    _reset_peak()
    start = time.perf_counter()
    uids = pl.concat([pl.read_parquet(p, columns=["image_uid"]) for p in ingest.image_parts(work)])
    rng = np.random.default_rng(1)
    scores = uids.with_columns(**{m: pl.Series(rng.normal(0, 1, uids.height)) for m in METRICS},
                               error=pl.lit(None, pl.String))
    write_atomic(scores.sort("image_uid"), work / score.SCORES_FILE, scores_schema(METRICS))
    del uids, scores
    stages["scores"] = {"s": time.perf_counter() - start, "peak_mb": _peak_mb()}

    _reset_peak()
    start = time.perf_counter()
    result = filter_dir(work, work / "filtered", mpcf.build_rule("all", list(METRICS)))
    stages["filter"] = {"s": time.perf_counter() - start, "peak_mb": _peak_mb()}

    pairs_bytes = pl.read_parquet(work / ingest.PAIRS_FILE).estimated_size()
    scored_bytes = sum(pl.read_parquet(work / "filtered" / name).estimated_size()
                       for name in ("filtered.parquet", "rejected.parquet"))
    return {"pairs": summary.pairs, "images": summary.unique_images, "kept": result["kept"], "stages": stages,
            "pairs_columns_mb": pairs_bytes / 2**20, "scored_columns_mb": scored_bytes / 2**20,
            "peak_resettable": resettable}


def run_size(n_pairs: int, chunk_rows: int, tmp: Path) -> dict:
    source = tmp / f"source-{n_pairs}.parquet"
    write_source(source, n_pairs)
    out = subprocess.run([sys.executable, __file__, "--child", str(source), str(tmp / f"cur-{n_pairs}"),
                          "--chunk-rows", str(chunk_rows)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=250_000, help="the smaller size the growth is measured from")
    parser.add_argument("--chunk-rows", type=int, default=50_000, help="ingest's --chunk-rows")
    parser.add_argument("--child", nargs=2, metavar=("SOURCE", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]), args.chunk_rows)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        runs = {n: run_size(n, args.chunk_rows, Path(tmp)) for n in (args.small, args.pairs)}
    for n, run in runs.items():
        print(f"{n:>9,} pairs, {run['images']:,} images ({run['kept']:,} kept): manifest columns in memory "
              f"{run['pairs_columns_mb']:.0f} MB (pairs), {run['scored_columns_mb']:.0f} MB (filtered + rejected)")
        for stage, row in run["stages"].items():
            print(f"    {stage:7s} {row['s']:7.1f} s   peak RSS {row['peak_mb']:7.0f} MB")
    small, large = runs[args.small], runs[args.pairs]
    grow_pairs = large["pairs_columns_mb"] - small["pairs_columns_mb"]
    grow_scored = large["scored_columns_mb"] - small["scored_columns_mb"]
    print(f"growth from {args.small:,} to {args.pairs:,} pairs: pairs columns +{grow_pairs:.0f} MB, "
          f"filtered + rejected columns +{grow_scored:.0f} MB")
    for stage, columns in (("ingest", grow_pairs), ("filter", grow_scored)):  # "scores" is the bench's own table
        grown = large["stages"][stage]["peak_mb"] - small["stages"][stage]["peak_mb"]
        print(f"    {stage:7s} peak RSS +{grown:6.0f} MB = {grown / columns:4.1f}x the growth of the columns it holds")
    if not small["peak_resettable"]:
        print("(the peak could not be reset between stages here: each stage's figure includes the earlier ones)")


if __name__ == "__main__":
    main()
