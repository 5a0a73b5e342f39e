"""Training checkpoints shared by the LRM and LPO trainers: accelerate `save_state` plus the trainer's own state,
keeping the newest few."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


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
