"""The one error type for bad run-level input: the command line turns it into exit code 2."""


class InputError(ValueError):
    """A run-level input is unusable. The message names the value, the rule it breaks and the fix."""
