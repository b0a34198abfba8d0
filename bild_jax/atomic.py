"""Output files written whole or not at all: a temporary file in the target's directory, renamed over it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

# Temporary files being written now; `discard_partial` removes them when the process stops early.
_in_progress: set[Path] = set()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path next to `path` (same suffix, so that writers that pick a format by the name
    still do); when the block ends without an exception it replaces `path` in one rename, else it is
    removed. A reader never sees a partial file, and an interrupted run leaves the previous file as it was."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    _in_progress.add(temporary)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        _in_progress.discard(temporary)
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Writes `text` to `path` through `atomic_path`."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def discard_partial() -> None:
    """Removes the temporary files of writes still in progress (called by the Ctrl-C handler, which ends
    the process without unwinding the writers)."""
    for temporary in list(_in_progress):
        with contextlib.suppress(OSError):
            temporary.unlink()
