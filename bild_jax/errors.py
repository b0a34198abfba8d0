"""The exception types of bad input, which the `bild-jax` command reports in one line with exit code 2.

Everything else that escapes the command is a bug in bild-jax and is shown with its traceback. Both types
subclass the built-in ones that callers already catch (`ValueError`, `NotImplementedError`).
"""

from __future__ import annotations


class InputError(ValueError):
    """A setting, prompt, file or checkpoint that bild-jax cannot use; the message says what and why."""


class Unsupported(InputError, NotImplementedError):
    """A valid checkpoint or setting that bild-jax does not implement (a rope type, an activation, ...)."""
