"""matplotlib for the figures runs write (filter gaps, LRM accuracy by noise level, suite tables, the demo)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend (files only, no display).

    Imported here, on first use, not at the top of the modules that draw: choosing a backend at import would switch
    the backend of every notebook or program that imports lpo, and the commands that only compute never need it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, rect: tuple[float, float, float, float] | None = None) -> Path:
    """Lay `fig` out (within `rect`, when given), write it to `path` (its folder made) at 100 dpi, close it."""
    fig.tight_layout(**({"rect": rect} if rect else {}))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return Path(path)
