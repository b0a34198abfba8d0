"""Ctrl-C in the `bild-jax` command: at any moment, one line on stderr and exit code 130.

Python's own handling raises KeyboardInterrupt in the main thread at its next bytecode, which waits for a
running XLA compilation to finish and then unwinds into an interpreter shutdown while XLA's threads still
run (a segfault in 3 of 4 interrupted sweeps), or lands inside a library that swallows or re-wraps it.
Here the signal is also written to a pipe (`signal.set_wakeup_fd`) that a watcher thread reads, so the
process stops within milliseconds even while the main thread is inside XLA, and it stops with `os._exit`,
which runs no finalizers and so cannot crash in them. Output files are written through `bild_jax.atomic`:
the partial temporaries are removed and the previous files stay as they were.
"""

from __future__ import annotations

import os
import signal
import threading

from bild_jax.atomic import discard_partial

EXIT_CODE = 128 + signal.SIGINT  # what shells report for a process ended by Ctrl-C
_exiting = threading.Lock()


def exit_on_interrupt(label: str) -> None:
    """From now on, SIGINT prints `{label}: interrupted` and ends the process with EXIT_CODE.

    Call it from the main thread of a program (it replaces the process-wide handler), never from a
    library or a test process."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers belong to the main thread; elsewhere Python's default stays
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.signal(signal.SIGINT, lambda *_: _exit(label))  # runs if the main thread gets there first
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_end, label), name="bild-jax-interrupt", daemon=True).start()


def _watch(read_end: int, label: str) -> None:
    while True:
        if signal.SIGINT in os.read(read_end, 64):
            _exit(label)


def _exit(label: str) -> None:
    if not _exiting.acquire(blocking=False):
        return  # the other path is already ending the process
    discard_partial()
    # os.write: no Python-level stream lock, which the interrupted main thread may hold.
    os.write(2, f"{label}: interrupted\n".encode())
    os._exit(EXIT_CODE)
