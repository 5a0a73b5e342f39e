"""The two kinds of failure the command line tells apart: bad run-level input (exit code 2) and a run that failed
on its own after it started (exit code 1)."""


class InputError(ValueError):
    """A run-level input is unusable. The message names the value, the rule it breaks and the fix."""


class RunFailed(RuntimeError):
    """A run that started with good input failed (training diverged, a service worker died). The message says what
    was kept; the command line prints it and exits with code 1."""


class TrainingDiverged(RunFailed):
    """A training loss became NaN or infinite; the last good checkpoint is left as it was."""
