"""What the LRM and LPO trainers keep of a run: accelerate `save_state` checkpoints plus the trainer's own state
(the newest few), and the metrics log, one JSON line per optimizer update."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from lpo.core.config import to_dict
from lpo.core.errors import InputError
from lpo.core.files import write_text_atomic

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"


def _index(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def latest(out: Path, prefix: str) -> Path | None:
    """The newest `out/checkpoints/<prefix>-N`, or None."""
    found = sorted((Path(out) / CHECKPOINTS).glob(f"{prefix}-*"), key=_index)
    return found[-1] if found else None


def save(accelerator: Any, out: Path, prefix: str, index: int, state: dict[str, Any], keep: int = 2) -> Path:
    """save_state to `out/checkpoints/<prefix>-<index>` with the trainer state beside it; drop older ones."""
    checkpoint = Path(out) / CHECKPOINTS / f"{prefix}-{index}"
    accelerator.save_state(str(checkpoint))
    if accelerator.is_main_process:
        (checkpoint / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        for old in sorted((Path(out) / CHECKPOINTS).glob(f"{prefix}-*"), key=_index)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return checkpoint


def load_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())


def resume(accelerator: Any, out: Path, prefix: str, fresh: dict[str, Any]) -> dict[str, Any]:
    """Load the newest checkpoint into the prepared objects and return its trainer state (`fresh` if none)."""
    checkpoint = latest(out, prefix)
    if checkpoint is None:
        return fresh
    accelerator.load_state(str(checkpoint))
    logger.info("resumed from %s", checkpoint)
    return load_state(checkpoint)


INPUTS_FILE = "run_inputs.json"


def input_key(value: Any) -> Any:
    """How a resumed run compares an input: a file by its content, a folder by its resolved path, anything else
    (a hub id, a number) as it is; so the same manifest by a relative or an absolute path, or after the run
    directory moved, is the same input."""
    if isinstance(value, (str, Path)) and str(value) and Path(value).is_file():
        digest = hashlib.blake2b(digest_size=16)
        with open(value, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return f"blake2b:{digest.hexdigest()}"
    if isinstance(value, (str, Path)) and str(value) and Path(value).is_dir():
        return str(Path(value).resolve())
    return value


def save_inputs(config: Any, out: Path) -> None:
    """Beside the run's config: each setting as `input_key` sees it, what a --resume compares."""
    write_text_atomic(json.dumps({k: input_key(v) for k, v in to_dict(config).items()}, indent=2, default=str) + "\n",
                      Path(out) / INPUTS_FILE)


def check_run_dir(config: Any, out: Path, config_file: str, resumable: set[str], prefix: str) -> None:
    """Before any model loads: `--resume` needs a run in `out` made with the same settings (bar the `resumable`
    fields and `out` itself: a run directory may move), inputs compared by content (`input_key`); without it, `out`
    must not hold checkpoints already."""

    path = Path(out) / config_file
    if config.resume:
        if not path.exists():
            raise InputError(f"--resume: {out} holds no run (no {config_file}); drop --resume.")
        skip = resumable | {"out"}
        inputs = Path(out) / INPUTS_FILE
        if inputs.is_file():  # the inputs as they were keyed when the run started
            saved = json.loads(inputs.read_text())
            now = {k: input_key(v) for k, v in to_dict(config).items()}
        else:  # a run started before inputs were keyed: its settings as written
            saved, now = json.loads(path.read_text()), to_dict(config)
        changed = sorted(k for k in saved if k not in skip and saved[k] != now.get(k))
        if changed:
            raise InputError(f"--resume: {out} was run with different {changed}; resume with the same settings, or "
                             "use a new --out.")
    elif latest(out, prefix) is not None:
        raise InputError(f"{out} already holds checkpoints; pass --resume to continue, or a new --out.")


class MetricsLog:
    """`OUT/metrics.jsonl`: one JSON object per optimizer update (`update`, `lr`, `loss`, ...), written by the main
    process. A resumed run first drops the lines after its checkpoint's update (written after the last save, they
    are about to be made again), then appends."""

    def __init__(self, out: Path, main_process: bool, resumed_at: int = 0):
        self.path = Path(out) / METRICS_FILE
        self.main_process = main_process
        if main_process and self.path.is_file():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line torn by the interruption
                if record.get("update", 0) <= resumed_at:
                    kept.append(line)
            write_text_atomic("".join(f"{line}\n" for line in kept), self.path)

    def write(self, record: dict[str, Any]) -> None:
        if self.main_process:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """The records of `OUT/metrics.jsonl`, in order."""
    path = Path(out) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
