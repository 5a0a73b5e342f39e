"""One evaluated image and the files of a run directory (schemas in manifests/README.md).

Every image is an `EvalItem` that carries its own prompt, seed and file from generation through scoring to the
per-image table, so a score can only ever be computed against its own prompt, whatever the batch sizes (the
reference evaluation scored only the first of the four images of each prompt and paired prompts with the wrong
images at batch size > 1; design/method.md section 6).

Run directory:
- `images/p<prompt>-i<image>.png`, each written atomically, and `generated.jsonl`, one record per finished image:
  together the resume unit (an image counts as done when its record names the same prompt and seed and the file
  exists).
- `scores/<metric>.json` (spec, model id, scale) and `scores/<metric>.jsonl` (one score per image key): scoring
  resumes per metric and per image; a changed model spec rescores that metric.
- `images.parquet` (one row per image, one column per metric), `summary.json`, `summary.md`, `grid.png`,
  `config.json` (the resolved config) and `run.json` (the generation settings a resume must match).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

RUN_FILE = "run.json"
RECORDS_FILE = "generated.jsonl"
IMAGES_DIR = "images"
SCORES_DIR = "scores"
TABLE_FILE = "images.parquet"
SUMMARY_FILE = "summary.json"
SUMMARY_MD = "summary.md"
GRID_FILE = "grid.png"


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One image: its prompt, its index among the prompt's images, its seed, its file, and its prompt's benchmark
    record where the prompt file carries one (GenEval's metadata: the task and the objects asked for)."""

    prompt_index: int
    image_index: int
    prompt: str
    seed: int | None
    path: Path
    record: dict | None = dataclasses.field(default=None, compare=False)

    @property
    def key(self) -> str:
        return f"p{self.prompt_index:05d}-i{self.image_index:02d}"

    @property
    def task(self) -> str | None:
        """The benchmark task of the prompt (GenEval's tag), if its record names one."""
        return None if self.record is None else self.record.get("tag")


def table_schema(metrics: Sequence[str], task: bool = True) -> pa.Schema:
    """The per-image table: ids, prompt, seed, file, the prompt's benchmark task (null without one), one float64
    column per metric, error. `task=False`: the columns every run directory has (older runs lack `task`)."""
    return pa.schema([("prompt_index", pa.int32()), ("image_index", pa.int32()), ("prompt", pa.string()),
                      ("seed", pa.int64()), ("image_path", pa.string())] + ([("task", pa.string())] if task else [])
                     + [(m, pa.float64()) for m in metrics] + [("error", pa.string())])
