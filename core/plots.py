"""matplotlib for the figures runs write (filter gaps, LRM accuracy by noise level, suite tables, the demo)."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend (files only, no display).

    Imported here, on first use, not at the top of the modules that draw: choosing a backend at import would switch
    the backend of every notebook or program that imports lpo, and the commands that only compute never need it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
