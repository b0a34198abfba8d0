"""Output files written whole or not at all: a temporary file in the target's directory, renamed over it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from bild_jax.errors import InputError

# Temporary files being written now; `discard_partial` removes them when the process stops early.
_in_progress: set[Path] = set()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path next to `path` (same suffix, so that writers that pick a format by the name
    still do); when the block ends without an exception it replaces `path` in one rename, else it is
    removed. A reader never sees a partial file, and an interrupted run leaves the previous file as it was.
    Missing parent directories are created."""
    path = Path(path).expanduser()
    temporary = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    _in_progress.add(temporary)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield temporary
        os.replace(temporary, path)
    finally:
        _in_progress.discard(temporary)
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Writes `text` to `path` through `atomic_path`; a failed write is an OSError naming `path`, not the
    temporary file."""
    with atomic_path(path) as temporary:
        try:
            temporary.write_text(text)
        except OSError as error:
            raise OSError(f"could not write {path}: {error.strerror or error}") from error


def check_writable(path: str | Path, directory: bool = False) -> None:
    """Raises InputError naming `path` where an output could not go: a file path that is a directory, a
    directory path (`directory`) that is a file, or one whose nearest existing ancestor is a file or takes
    no new file. Commands call it before their work, so that a mistyped output path fails at once instead of
    after minutes of decoding."""
    path = Path(path).expanduser()
    if path.is_dir() != directory and path.exists():
        raise InputError(f"{path} is a {'file' if directory else 'directory'}; give a "
                         f"{'directory' if directory else 'file name'} for the output")
    ancestor = path if directory else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"cannot write {path}: {ancestor} is a file")
    try:  # a probe, not os.access: root passes that check everywhere, read-only and virtual file systems too
        tempfile.TemporaryFile(dir=ancestor).close()
    except OSError as error:
        reason = error.strerror or error
        raise InputError(f"cannot write {path}: no file can be made in {ancestor} ({reason})") from None


def discard_partial() -> None:
    """Removes the temporary files of writes still in progress (called by the Ctrl-C handler, which ends
    the process without unwinding the writers)."""
    for temporary in list(_in_progress):
        with contextlib.suppress(OSError):
            temporary.unlink()
