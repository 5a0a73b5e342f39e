"""Progress that a log file keeps: a rich bar in a terminal, and where the output is not a terminal (a cluster job's
log, a pipe) one plain log line per interval with the items done, the total, the rate and the time left, plus one
at the end. Every long loop (scoring, latent encoding, LRM training, LPO/GRPO rounds, evaluation) reports through
`progress`."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

logger = logging.getLogger("lpo.progress")
LOG_EVERY_SECONDS = 30.0


def is_terminal() -> bool:
    return sys.stderr.isatty()


@dataclass
class Tracker:
    """What a loop reports to: `advance(n)` or `update(completed)`, with an optional short `info` text."""

    label: str
    total: int
    completed: int = 0
    unit: str = "items"
    every: float = LOG_EVERY_SECONDS
    bar: Progress | None = None
    task: int | None = None
    started: float = field(default_factory=time.monotonic)
    start_count: int = 0
    logged_at: float = field(default_factory=time.monotonic)
    info: str = ""

    def advance(self, n: int = 1, info: str | None = None) -> None:
        self.update(self.completed + n, info)

    def update(self, completed: int, info: str | None = None) -> None:
        self.completed = completed
        if info is not None:
            self.info = info
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, info=self.info)
        elif time.monotonic() - self.logged_at >= self.every:
            self.log()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = (self.completed - self.start_count) / elapsed
        left = (self.total - self.completed) / rate if rate > 0 else float("nan")
        eta = "?" if left != left else time.strftime("%H:%M:%S", time.gmtime(left))
        text = f"{self.label}: {self.completed}/{self.total} {self.unit} ({rate:.3g}/s, {eta} left)"
        return f"{text} {self.info}".rstrip()

    def log(self) -> None:
        self.logged_at = time.monotonic()
        logger.info("%s", self.line())


@contextmanager
def progress(label: str, total: int, *, completed: int = 0, unit: str = "items", enabled: bool = True,
             transient: bool = False, every: float = LOG_EVERY_SECONDS) -> Iterator[Tracker]:
    """Track a loop of `total` units (`completed` of them done before: a resumed run). In a terminal a bar; else a
    log line every `every` seconds and one when the loop ends. `enabled=False` (a process other than the main one)
    reports nothing."""
    tracker = Tracker(label, total, completed, unit, every, start_count=completed)
    if not enabled:
        yield tracker
        return
    if is_terminal():
        columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeRemainingColumn())
        with Progress(*columns, transient=transient) as bar:
            tracker.bar, tracker.task = bar, bar.add_task(label, total=total, completed=completed, info="")
            yield tracker
        return
    tracker.log()
    yield tracker
    tracker.log()
