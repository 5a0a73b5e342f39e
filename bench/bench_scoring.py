"""Scoring throughput: work saved by scoring unique images, and how well decoding hides behind the model.

    python bench/bench_scoring.py [--prompts 48] [--size 512] [--arch ViT-B-32] [--batch-size 16]

1. Images scored / (2 x pairs) on a toy sample with Pick-a-Pic's repetition (4 images per prompt, all 6 pairs):
   what `lpo curate score` computes against scoring both images of every pair.
2. End-to-end `lpo curate score` time (parquet read, JPEG decode in background threads, model, part-file writes)
   over the pure `scorer.score` time on the same, already decoded images. The model is an open_clip `--arch` with
   random weights at its real size (no download), run on the CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def upscale_to_jpeg(png: bytes, size: int) -> bytes:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB").resize((size, size), Image.BICUBIC)
    noise = np.random.default_rng(len(png)).normal(0, 6, (size, size, 3))
    image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_source(path: Path, prompts: int, size: int) -> Path:
    from lpo.reward.toy.world import make_pickapic_table

    table = make_pickapic_table(num_prompts=prompts, seed=5)
    for column in ("jpg_0", "jpg_1"):
        jpegs = [upscale_to_jpeg(b, size) for b in table.column(column).to_pylist()]
        table = table.set_column(table.schema.get_field_index(column), column, [jpegs])
    pq.write_table(table, path)
    return path


def write_open_clip_dir(path: Path, arch: str) -> Path:
    import open_clip
    from safetensors.torch import save_file

    model_cfg = open_clip.get_model_config(arch)
    model = open_clip.CLIP(**model_cfg)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "open_clip_model.safetensors")
    preprocess = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--size", type=int, default=512, help="JPEG side in pixels (Pick-a-Pic: 512-1024)")
    parser.add_argument("--arch", default="ViT-B-32", help="open_clip architecture, random weights")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from PIL import Image

    from lpo.curate import ingest, score, scorers
    from lpo.curate.scorers.base import TextFeatureCache

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = write_source(tmp / "src.parquet", args.prompts, args.size)
        work = tmp / "cur"
        ingest.run(ingest.IngestConfig(source=str(source), out=work))
        model_dir = write_open_clip_dir(tmp / "clip", args.arch)
        pairs = pq.read_metadata(work / "pairs.parquet").num_rows
        images = sum(pq.read_metadata(p).num_rows for p in ingest.image_parts(work))

        config = score.ScoreConfig(work_dir=work, metrics=["clip"], models={"clip": str(model_dir)}, device="cpu",
                                   batch_size=args.batch_size)
        scorer = scorers.load_scorer("clip", str(model_dir), device="cpu")
        rows = []
        for part in ingest.image_parts(work):
            table = pq.read_table(part, columns=["caption", "image"])
            rows += zip(table.column("caption").to_pylist(), table.column("image").to_pylist())
        decoded = [(c, Image.open(io.BytesIO(b)).convert("RGB")) for c, b in rows]

        def pure_forward() -> float:
            scorer.text_features = TextFeatureCache(scorer._encode_text)  # text encoded once per caption
            start = time.perf_counter()
            for i in range(0, len(decoded), args.batch_size):
                chunk = decoded[i:i + args.batch_size]
                scorer.score([im for _, im in chunk], [c for c, _ in chunk])
            return time.perf_counter() - start

        def end_to_end() -> float:
            shutil.rmtree(work / "scores", ignore_errors=True)
            (work / "scores.parquet").unlink(missing_ok=True)
            scorer.text_features = TextFeatureCache(scorer._encode_text)
            original = scorers.load_scorer
            scorers.load_scorer = lambda *a, **k: scorer  # the same loaded model in both timings
            try:
                start = time.perf_counter()
                score.run(config)
                return time.perf_counter() - start
            finally:
                scorers.load_scorer = original

        scorer.score([decoded[0][1]], [decoded[0][0]])  # warm-up
        pure, full = [], []
        for _ in range(args.repeats):  # alternate, and keep the best of each, to damp machine noise
            pure.append(pure_forward())
            full.append(end_to_end())
        forward, end_to_end_s = min(pure), min(full)

    print(f"Scoring {images} unique images of {pairs} pairs ({args.size}px JPEG, open_clip {args.arch}, CPU)")
    print(f"  images scored / (2 x pairs):           {images / (2 * pairs):.3f}  "
          f"(scoring per pair would do {2 * pairs / images:.1f}x the model work)")
    print(f"  end-to-end `curate score`:             {end_to_end_s:7.2f} s")
    print(f"  pure scorer.score on decoded images:   {forward:7.2f} s")
    print(f"  end-to-end / pure forward:             {end_to_end_s / forward:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
