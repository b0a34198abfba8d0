"""Ctrl-C sent to a real `bild-jax generate` while it imports, loads, compiles and decodes: one line, exit
code 130, never a segfault or a traceback (`tests/interrupt_trials.py` runs many trials per moment)."""

from __future__ import annotations

import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from interrupt_trials import run_trial  # noqa: E402

from bild_jax.hub import BUNDLED_DIR  # noqa: E402

pytestmark = pytest.mark.skipif(not (BUNDLED_DIR / "large").is_dir(), reason="the bundled pair is not built")


def test_ctrl_c_at_every_moment_prints_one_line_and_exits_130():
    delays = random.Random(0)
    # From the moment `main` has installed its handling (Python's own KeyboardInterrupt applies in the ~50 ms
    # before it). The four processes run side by side: the test takes as long as the longest, a compile.
    moments = ("library", "loading", "compiling", "decoding")
    with ThreadPoolExecutor(len(moments)) as pool:
        trials = list(pool.map(lambda moment: run_trial(moment, delays.uniform(0, 0.3)), moments))
    for trial in trials:
        assert trial["reached"], trial
        assert trial["returncode"] == 130, trial
        assert trial["stderr_lines"] == ["bild-jax: interrupted"], trial
